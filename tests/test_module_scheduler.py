"""NextStepModule's cosine schedule spans the whole run, per epoch or per step, whatever bounds the trainer."""

from __future__ import annotations

import math
from functools import partial
from itertools import pairwise
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from torch.optim.lr_scheduler import CosineAnnealingLR

from lrnn_lightning.data import OscillatorsDataModule
from lrnn_lightning.models import build_model
from lrnn_lightning.module import NextStepModule
from lrnn_lightning.utils.training import build

CONF = Path(__file__).resolve().parents[1] / "conf"
LR, ETA_MIN, BATCHES = 1e-2, 1e-4, 3


class LrRecorder(pl.Callback):
    """The learning rate each optimizer step runs with."""

    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def cosine_module(interval: str, scheduler=CosineAnnealingLR, **scheduler_kwargs) -> NextStepModule:
    return NextStepModule(build_model("lru", d_input=3, d_model=8, d_state=4, n_layers=1),
                          partial(torch.optim.AdamW, lr=LR),
                          partial(scheduler, eta_min=ETA_MIN, **scheduler_kwargs), scheduler_interval=interval)


def fit(module: NextStepModule, tmp_path, **overrides) -> tuple[pl.Trainer, list[float]]:
    recorder = LrRecorder()
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=BATCHES, limit_val_batches=1,
                   num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    trainer = pl.Trainer(callbacks=[recorder], **{**options, **overrides})
    data = OscillatorsDataModule(num_series=2, num_samples=300, context_length=16, horizon=24, stride=8,
                                 val_stride=8, batch_size=16)
    trainer.fit(module, datamodule=data)
    return trainer, recorder.lrs


def cosine(position: int, length: int) -> float:
    return ETA_MIN + (LR - ETA_MIN) * (1 + math.cos(math.pi * position / length)) / 2


def assert_one_cosine_over_the_run(trainer: pl.Trainer, lrs: list[float], interval: str, length: int):
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.T_max == length
    positions = [k // BATCHES if interval == "epoch" else k for k in range(len(lrs))]
    assert lrs == pytest.approx([cosine(p, length) for p in positions], rel=1e-6)
    assert all(later <= earlier for earlier, later in pairwise(lrs)), lrs  # never back up
    assert lrs[-1] < 0.3 * LR
    # the scheduler's last step (after the last epoch / optimizer step) lands on eta_min
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(ETA_MIN, rel=1e-6)


@pytest.mark.parametrize("interval, length", [("epoch", 4), ("step", 4 * BATCHES)])
def test_cosine_without_t_max_spans_max_epochs(tmp_path, interval, length):
    trainer, lrs = fit(cosine_module(interval), tmp_path, max_epochs=4)
    assert len(lrs) == 4 * BATCHES
    assert_one_cosine_over_the_run(trainer, lrs, interval, length)


@pytest.mark.parametrize("interval, length", [("epoch", 3), ("step", 9)])
def test_cosine_without_t_max_spans_max_steps_when_they_end_the_run_before_max_epochs(tmp_path, interval, length):
    trainer, lrs = fit(cosine_module(interval), tmp_path, max_epochs=50, max_steps=9)
    assert len(lrs) == 9
    assert_one_cosine_over_the_run(trainer, lrs, interval, length)


@pytest.mark.parametrize("interval, length", [("epoch", 3), ("step", 9)])
def test_cosine_without_t_max_spans_max_steps_when_epochs_are_unbounded(tmp_path, interval, length):
    trainer, lrs = fit(cosine_module(interval), tmp_path, max_epochs=-1, max_steps=9)
    assert len(lrs) == 9
    assert_one_cosine_over_the_run(trainer, lrs, interval, length)


def test_a_cosine_subclass_is_filled_too_and_an_explicit_t_max_is_kept(tmp_path):
    class WarmCosine(CosineAnnealingLR):
        pass

    trainer, lrs = fit(cosine_module("step", WarmCosine), tmp_path, max_epochs=2)
    assert_one_cosine_over_the_run(trainer, lrs, "step", 2 * BATCHES)
    trainer, _ = fit(cosine_module("step", T_max=50), tmp_path, max_epochs=2)
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 50


@pytest.mark.parametrize("t_max", [-1, 0])
def test_a_non_positive_t_max_is_named(t_max):
    with pytest.raises(ValueError, match=rf"T_max must be a positive number of epochs, got {t_max}\. "
                                         r"HINT: leave module.scheduler.T_max unset"):
        cosine_module("epoch", T_max=t_max)


def test_a_cosine_without_t_max_needs_a_run_with_an_end(tmp_path):
    with pytest.raises(ValueError, match=r"has no end \(max_epochs=-1, max_steps=-1\).*HINT: set "
                                         r"module.scheduler.T_max"):
        fit(cosine_module("step"), tmp_path, max_epochs=-1)
    with pytest.raises(ValueError, match=r"not attached to a Trainer.*HINT"):
        cosine_module("epoch").configure_optimizers()


# smoke: max_epochs=2; `length` of the batches an epoch
@pytest.mark.parametrize("overrides, length", [([], lambda batches: 2),
                                               (["module.scheduler_interval=step"], lambda batches: 2 * batches),
                                               (["trainer.max_epochs=-1", "+trainer.max_steps=5"],
                                                lambda batches: 5 // batches),
                                               (["trainer.max_epochs=null", "+trainer.max_steps=5",
                                                 "module.scheduler_interval=step"], lambda batches: 5)])
def test_the_default_module_config_derives_t_max_from_the_trainer(tmp_path, overrides, length):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=["experiment=smoke", "trainer=cpu", "callbacks=none", "logger=none",
                                              "+trainer.enable_checkpointing=false", *overrides])
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.log_dir = str(tmp_path / "logs")
    assert cfg.module.scheduler.T_max is None  # and `module.scheduler.T_max=N` overrides it without a +
    parts = build(cfg)
    trainer = parts["trainer"]
    trainer.fit(parts["module"], datamodule=parts["datamodule"])
    assert trainer.num_training_batches > 1
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, CosineAnnealingLR) and scheduler.T_max == length(trainer.num_training_batches)
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.module.scheduler.eta_min)
