"""`NextStepModule`: teacher-forced next-step training of a step-protocol sequence model."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR
from typing_extensions import override

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]

LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": F.mse_loss, "mae": F.l1_loss,
                                                         "huber": F.smooth_l1_loss}


def next_step_pair(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Inputs, targets and input timesteps of a window batch for next-step prediction.

    The window is context and future joined, x (B, L, H); the model reads x[:, :-1] (with
    dt[:, :-1], the gap from each input to the sample it predicts) and must output x[:, 1:].
    """
    if not isinstance(batch, dict) or "context" not in batch or "future" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"NextStepModule: expected a batch dict with 'context' and 'future' (and 'dt' in event "
                         f"mode), got {got}. HINT: use a datamodule from lrnn_lightning.data.")
    window = torch.cat([batch["context"], batch["future"]], dim=1)
    dt = batch.get("dt")
    return window[:, :-1], window[:, 1:], None if dt is None else dt[:, :-1]


def _is_cosine(factory: SchedulerFactory | None) -> bool:
    """Whether `factory` is a `partial` of `CosineAnnealingLR` (or a subclass), as Hydra's `_partial_` makes."""
    return (isinstance(factory, partial) and isinstance(factory.func, type)
            and issubclass(factory.func, CosineAnnealingLR))


class NextStepModule(LightningModule):
    """Trains `model` to predict each next sample of a window from all samples before it.

    The whole window goes through the model's parallel `forward` at once (teacher
    forcing); the loss compares the output at position t with the sample at t + 1.
    Logs `train/loss` and `val/loss`. The model must implement the step protocol so that
    `RolloutCallback` can roll it out autoregressively.

    Args:
        model: the sequence model (e.g. `build_model("lru", d_input=3)`), (B, L, H) -> (B, L, H).
        optimizer: a factory taking the parameters, e.g. Hydra's
            `{_target_: torch.optim.AdamW, _partial_: true, lr: 3e-3}`.
        scheduler: an optional factory taking the optimizer (also `_partial_`). A `CosineAnnealingLR`
            factory without `T_max` is given the run's length at `configure_optimizers` time: the
            trainer's epochs for interval "epoch", `trainer.estimated_stepping_batches` for "step".
        scheduler_interval: step the scheduler every "epoch" or every "step".
        loss: "mse", "mae" or "huber".

    Example:
        >>> from functools import partial
        >>> module = NextStepModule(build_model("lru", d_input=3), partial(torch.optim.AdamW, lr=3e-3))
        >>> Trainer(max_epochs=5).fit(module, datamodule=OscillatorsDataModule())
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory, scheduler: SchedulerFactory | None = None,
                 scheduler_interval: str = "epoch", loss: str = "mse"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"NextStepModule: model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(optimizer):
            raise ValueError(f"NextStepModule: optimizer must be a factory of the parameters, got {optimizer!r}. "
                             "HINT: in Hydra configs set `_partial_: true` on the optimizer.")
        if scheduler is not None and not callable(scheduler):
            raise ValueError(f"NextStepModule: scheduler must be a factory of the optimizer or None, got "
                             f"{scheduler!r}. HINT: in Hydra configs set `_partial_: true` on the scheduler.")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"NextStepModule: scheduler_interval must be 'epoch' or 'step', got "
                             f"{scheduler_interval!r}.")
        t_max = scheduler.keywords.get("T_max") if _is_cosine(scheduler) else None
        if t_max is not None and (not isinstance(t_max, (int, float)) or t_max <= 0):
            raise ValueError(f"NextStepModule: the cosine scheduler's T_max must be a positive number of "
                             f"{scheduler_interval}s, got {t_max!r}. HINT: leave module.scheduler.T_max unset to "
                             f"derive it from the trainer, or set it > 0 (`${{trainer.max_epochs}}` gives -1 "
                             f"when trainer.max_epochs=-1).")
        if loss not in LOSSES:
            raise ValueError(f"NextStepModule: unknown loss {loss!r}. Valid names: {', '.join(LOSSES)}.")
        _check_factory_arguments(optimizer, scheduler)
        # factories stay out of the checkpoint's hyperparameters: they would make it unloadable with
        # torch.load(weights_only=True), the default; the run's Hydra config records them instead
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"], logger=False)
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.loss_fn = LOSSES[loss]

    @override
    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        return self.model(x, dt)

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        inputs, targets, dt = next_step_pair(batch)
        return self.loss_fn(self.model(inputs, dt).float(), targets.float())

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch["context"].shape[0])
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=batch["context"].shape[0])
        return loss

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        factory = self.scheduler_factory
        if _is_cosine(factory) and factory.keywords.get("T_max") is None:
            factory = partial(factory, T_max=self._schedule_length())
        scheduler = factory(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval,
                                 "monitor": "val/loss"}}

    def _schedule_length(self) -> int:
        """The run's length in scheduler intervals, from the trainer: T_max of a cosine schedule."""
        interval = self.hparams.scheduler_interval
        hint = ("HINT: set module.scheduler.T_max, or give the trainer a finite length (trainer.max_epochs, or "
                "trainer.max_epochs=-1 with +trainer.max_steps=N).")
        if self._trainer is None:
            raise ValueError(f"NextStepModule: the cosine scheduler has no T_max and the module is not attached "
                             f"to a Trainer to derive it from. {hint}")
        trainer = self.trainer
        max_epochs = trainer.max_epochs
        if interval == "epoch" and max_epochs not in (None, -1) and trainer.max_steps == -1:
            length, source = max(1, max_epochs), "trainer.max_epochs"
        else:
            if max_epochs is None:  # not yet resolved by `fit`: Lightning stops at max_steps, if any
                total_steps = math.inf if trainer.max_steps == -1 else trainer.max_steps
            else:
                total_steps = trainer.estimated_stepping_batches
            if not math.isfinite(total_steps):
                raise ValueError(f"NextStepModule: the cosine scheduler has no T_max and the trainer's run has no "
                                 f"end (max_epochs={max_epochs}, max_steps={trainer.max_steps}). {hint}")
            length, source = max(1, int(total_steps)), "trainer.estimated_stepping_batches"
            if interval == "epoch":  # the run ends at max_steps: count the whole epochs in it, so that a
                # partial last epoch (which gets no epoch-end scheduler step) runs at eta_min, not above it
                if trainer.train_dataloader is None:
                    trainer.fit_loop.setup_data()  # what `estimated_stepping_batches` does when it needs it
                steps_per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
                if not math.isfinite(steps_per_epoch) or steps_per_epoch < 1:
                    raise ValueError(f"NextStepModule: the cosine scheduler has no T_max and the epochs of a "
                                     f"max_steps={trainer.max_steps} run cannot be counted: the training data has "
                                     f"{trainer.num_training_batches} batches an epoch. {hint} Or use "
                                     f"module.scheduler_interval=step.")
                length, source = max(1, int(total_steps // steps_per_epoch)), f"{source} / epoch length"
        rank_zero_info(f"NextStepModule: cosine schedule T_max={length} {interval}s (from {source}).")
        return length


def _check_factory_arguments(optimizer: OptimizerFactory, scheduler: SchedulerFactory | None) -> None:
    """Bind the optimizer's and scheduler's arguments to their signatures, so that a misspelt one fails when the
    module is made, not in `configure_optimizers` after the loggers started a run. Only binding, and partially
    (a cosine's T_max comes from the trainer later): building them here could need what the strategy sets up
    later (a process group for ZeroRedundancyOptimizer)."""
    for name, factory, argument in (("optimizer", optimizer, [nn.Parameter(torch.ones(1))]),
                                    ("scheduler", scheduler, object())):
        if factory is None:
            continue
        target = getattr(factory, "func", factory)  # a functools.partial (Hydra's _partial_) or a plain callable
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # no signature to read (a builtin): left to configure_optimizers
            continue
        try:
            keywords = getattr(factory, "keywords", None) or {}
            signature.bind_partial(*getattr(factory, "args", ()), argument, **keywords)
        except TypeError as error:
            raise ValueError(f"NextStepModule: the {name}'s arguments do not fit "
                             f"{getattr(target, '__name__', repr(target))} ({error}). HINT: check the keys of "
                             f"module.{name}.") from error
