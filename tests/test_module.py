"""NextStepModule: teacher-forced next-step loss on the shifted target, dt handling, optimisers."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from lrnn_lightning.models import build_model
from lrnn_lightning.module import NextStepModule, next_step_pair


class Recorder(nn.Module):
    """Returns its input scaled by a learnable factor and remembers what it was called with."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))
        self.calls = []

    def forward(self, x, dt=None):
        self.calls.append((x.clone(), None if dt is None else dt.clone()))
        return x * self.gain


def _batch(event: bool, batch=3, context=5, future=4, width=2):
    out = {"context": torch.randn(batch, context, width), "future": torch.randn(batch, future, width)}
    if event:
        out["dt"] = torch.rand(batch, context + future) + 0.5
    return out


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("event", [False, True])
def test_loss_compares_each_output_with_the_next_sample(event):
    batch = _batch(event)
    model = Recorder()
    module = NextStepModule(model, partial(torch.optim.SGD, lr=0.1))
    loss = module.training_step(batch, 0)
    window = torch.cat([batch["context"], batch["future"]], dim=1)
    # the recorder predicts "no change", so the loss is the mean squared increment
    torch.testing.assert_close(loss, (window[:, 1:] - window[:, :-1]).pow(2).mean())
    seen_x, seen_dt = model.calls[-1]
    torch.testing.assert_close(seen_x, window[:, :-1])
    if event:
        torch.testing.assert_close(seen_dt, batch["dt"][:, :-1])
    else:
        assert seen_dt is None


def test_a_real_model_learns_a_sine_by_teacher_forcing():
    torch.manual_seed(0)
    t = torch.arange(48, dtype=torch.float32) * 0.3
    phases = torch.rand(8, 1) * 6.28
    window = torch.sin(t + phases)[..., None]
    batch = {"context": window[:, :16], "future": window[:, 16:]}
    module = NextStepModule(build_model("lru", d_input=1, d_model=16, d_state=8, n_layers=1),
                            partial(torch.optim.Adam, lr=1e-2))
    optimizer = module.configure_optimizers()
    first = float(module._loss(batch).detach())
    for _ in range(60):
        optimizer.zero_grad()
        module._loss(batch).backward()
        optimizer.step()
    assert float(module._loss(batch).detach()) < 0.1 * first


def test_scheduler_factory_is_wired_with_its_interval():
    module = NextStepModule(Recorder(), partial(torch.optim.AdamW, lr=1e-3),
                            scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=2), scheduler_interval="step")
    config = module.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert config["lr_scheduler"]["interval"] == "step"


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"unknown loss 'l3'. Valid names: mse, mae, huber"):
        NextStepModule(Recorder(), partial(torch.optim.SGD, lr=0.1), loss="l3")
    with pytest.raises(ValueError, match=r"optimizer must be a factory .*_partial_: true"):
        NextStepModule(Recorder(), optimizer="adam")
    with pytest.raises(ValueError, match=r"scheduler_interval must be 'epoch' or 'step', got 'batch'"):
        NextStepModule(Recorder(), partial(torch.optim.SGD, lr=0.1), scheduler_interval="batch")
    # a misspelt argument of the factories fails here, not in configure_optimizers once a run has started
    with pytest.raises(ValueError, match=r"the optimizer's arguments do not fit AdamW \(.*'lrr'.*\)\. HINT: check "
                                         r"the keys of module.optimizer"):
        NextStepModule(Recorder(), partial(torch.optim.AdamW, lrr=0.1))
    with pytest.raises(ValueError, match=r"the scheduler's arguments do not fit StepLR \(.*'gama'.*module.scheduler"):
        NextStepModule(Recorder(), partial(torch.optim.SGD, lr=0.1),
                       partial(torch.optim.lr_scheduler.StepLR, step_size=2, gama=0.5))
    # nothing is built: an optimizer that needs the strategy's process group binds without one
    zero = partial(ZeroRedundancyOptimizer, optimizer_class=torch.optim.AdamW, lr=1e-3)
    assert NextStepModule(Recorder(), zero).optimizer_factory is zero
    cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, eta_min=1e-5)  # T_max from the trainer, later
    assert NextStepModule(Recorder(), partial(torch.optim.SGD, lr=0.1), cosine).scheduler_factory is cosine
    with pytest.raises(ValueError, match=r"expected a batch dict with 'context' and 'future'.*got \['x'\]"):
        next_step_pair({"x": torch.zeros(1)})
