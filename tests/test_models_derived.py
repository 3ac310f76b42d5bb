"""Weight-derived tensors shared within one rollout chunk (`shared_derivations`): the same
numbers as deriving them every step, fewer kernels, and nothing shared past the scope."""

from __future__ import annotations

import pytest
import torch

from lrnn_lightning.models import MIXERS, SequenceModel
from lrnn_lightning.models import derived as derived_module
from lrnn_lightning.models.derived import shared_derivations
from lrnn_lightning.rollout import run_steps
from tests.helpers import perturb_parameters, random_dt
from tests.test_models_kernel_count import count_kernels

# kernels of one 4-layer SequenceModel step without dt: (per step, inside a shared scope)
KERNELS = {"lru": (103, 75), "s4d": (119, 87), "s5": (123, 91), "mamba": (115, 107), "rglru": (115, 107)}


def _model(name):
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=3, d_output=3, d_model=16, d_state=8, n_layers=4)
    perturb_parameters(model)
    return model.eval()


def _loop(model, x0, steps, dt=None, share=True):
    state = model.allocate_state(x0.shape[0], "cpu", torch.float32)
    with torch.no_grad():
        return run_steps(model, x0, state, steps, dt, share_derived=share)


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_sharing_computes_exactly_what_per_step_derivation_computes(name, event):
    model = _model(name)
    x0 = torch.randn(4, 3)
    dt = random_dt(4, 9) if event else None
    shared = _loop(model, x0, 9, dt, share=True)
    assert shared.abs().mean() > 1e-3
    assert torch.equal(shared, _loop(model, x0, 9, dt, share=False))


@pytest.mark.parametrize("name", list(MIXERS))
def test_sharing_saves_the_derivation_kernels(name):
    model = _model(name)
    x = torch.randn(4, 3)
    state = model.allocate_state(4, "cpu", torch.float32)
    with torch.no_grad():
        with count_kernels() as per_step:
            model.step(x, state)
        with shared_derivations():
            model.step(x, state)  # derives
            with count_kernels() as shared:
                model.step(x, state)  # reuses
    assert (per_step.total, shared.total) == KERNELS[name]


def test_a_new_scope_sees_weights_changed_in_place_and_the_scope_always_closes():
    model = _model("lru")
    x0 = torch.randn(4, 3)
    before = _loop(model, x0, 5)
    with torch.no_grad():
        model.layers[0].mixer.nu_log.add_(0.5)  # in place, as an optimizer step does
    after = _loop(model, x0, 5)
    assert (after - before).abs().max() > 1e-4
    assert torch.equal(after, _loop(model, x0, 5, share=False))
    with pytest.raises(RuntimeError, match="boom"), shared_derivations():
        raise RuntimeError("boom")
    assert derived_module._shared is None
