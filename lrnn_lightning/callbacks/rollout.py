"""`RolloutCallback`: autoregressive rollouts of the model from validation contexts, at every validation."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lrnn_lightning.callbacks.distributed import Shard, gather_rows, shard, sum_over_processes
from lrnn_lightning.callbacks.result import (
    RankReport,
    RolloutResult,
    SequenceScores,
    score_rows,
    split_sums,
)
from lrnn_lightning.callbacks.wandb_media import log_rollout_media
from lrnn_lightning.models.validation import check_positive_int
from lrnn_lightning.rollout import RolloutEngine
from lrnn_lightning.rollout.fingerprint import model_signature
from lrnn_lightning.rollout.fused import support as fused_checks
from lrnn_lightning.rollout.metrics import channel_scale, constant_channels, valid_prediction_steps

OWNER = "RolloutCallback"
AUTOCAST_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                  "fp16": torch.float16, "half": torch.float16}


@dataclass
class _Windows:
    """This process's share of the fixed rollout subset.

    `context`, `future` and `dt` are the shard's rows on the CPU in the data's dtype (for
    scoring and plots); `engine_context` and `engine_dt` the same on the model's device in
    its dtype (for the engine). `scale` is the per-channel scale of the WHOLE subset, so
    that every process normalises alike.
    """

    shard: Shard
    context: Tensor                 # (S, C, H)
    future: Tensor                  # (S, T, H)
    dt: Tensor | None               # (S, C + T)
    scale: Tensor                   # (H,) float64
    engine_context: Tensor
    engine_dt: Tensor | None


def _positive_int(name: str, value: Any, hint: str = "", allow_none: bool = False) -> int | None:
    if allow_none and value is None:
        return None
    return check_positive_int(value, name, OWNER, "None" if allow_none else "", hint=hint)


def _auto_option(value: Any, name: str, hint: str) -> bool | str:
    """An 'auto' | true | false option (any case, or a bool) -> "auto", True or False."""
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.lower()]
    if value in (True, False) and isinstance(value, bool):
        return value
    raise ValueError(f"{OWNER}: {name} must be 'auto', true or false, got {value!r}. HINT: {hint}")


def _cuda_graph_option(value: Any) -> bool | str:
    return _auto_option(value, "cuda_graph", "'auto' replays a CUDA graph when the model is on a GPU and runs the "
                        "step loop otherwise.")


def _fused_option(value: Any) -> bool | str:
    return _auto_option(value, "fused", "'auto' runs the fused Triton kernel where it covers the model on a GPU, "
                        "and the CUDA graph (or the step loop) otherwise; false never runs it.")


def _autocast_option(value: Any) -> torch.dtype | None:
    if value is None or value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in AUTOCAST_NAMES:
        return AUTOCAST_NAMES[value.lower()]
    raise ValueError(f"{OWNER}: autocast_dtype must be null, 'bfloat16' or 'float16', got {value!r}. HINT: null "
                     "rolls out in the weights' own precision (fp32 under every mixed-precision trainer setting).")


class RolloutCallback(Callback):
    r"""Rolls the model out autoregressively from a fixed, seeded set of validation windows
    at every `every_n_epochs`-th validation and reports the error per horizon step.

    At validation start the callback makes a `RolloutEngine` ready, one per (batch size,
    dtype, device) and kept for the whole run: the captured CUDA graph reads the live
    weights, so it is reused across optimizer steps (the engine re-captures by itself only
    when the weights' storage was replaced). At validation end it prefills each window's
    context, rolls out `horizon` steps (in event mode with the data's per-step dt), and
    compares with the window's true future and with the persistence baseline (the last
    context value repeated), which a useful model must beat.

    Under DDP every process rolls out its own block of the subset on its own device (and
    captures its own graph); the error sums are added over processes before dividing, so
    the logged numbers equal a one-process run's on the same subset. Global rank zero logs
    the media and a line saying which process rolled out how many sequences where.

    Faults do not stop training: a graph capture that fails (an uncapturable op, out of
    memory) warns once with the reason and the rollout continues on the step loop
    (`uses_graph` = 0); a rollout that diverges (NaN/Inf, or an error above
    `divergence_threshold` channel scales) is counted, and from its diverged step on its
    error counts as `divergence_threshold` scales on every channel, so every metric stays
    finite.

    Logged through `pl_module.log` (so ModelCheckpoint, EarlyStopping and Optuna can monitor
    them), under `<prefix>/`: `mse`, `mae`, `nrmse` (averaged over the horizon), `nrmse_final`
    (at the last step), the same with `persistence_`, `skill` (1 - mse / persistence mse:
    above 0 beats doing nothing), `valid_steps` (steps before the normalised RMSE first
    exceeds `threshold`, the "valid prediction time"), `persistence_valid_steps`,
    `diverged_fraction`, `first_diverged_step` (0-based; the horizon when none diverged),
    `steps_per_second` (all processes together), `capture_ms`, `uses_graph` (1 when every
    process replayed a graph), `uses_fused` (1 when every process ran the fused kernel) and
    `uses_loop` (1 when every process ran the plain loop; all three 0: processes differed).
    With a `WandbLogger`, global rank zero also logs the error-vs-horizon chart, sample plots,
    a table of the samples and the timing (with the path, "mixed" when processes took different
    ones, each process's path, and why rank zero took its own); its text line says which path
    each process took ("mixed" when they differ), and why on rank zero.

    The rollout runs in the weights' dtype outside the trainer's autocast (a mixed-precision
    trainer does not change it), or under the engine's own `autocast_dtype`.

    Args:
        num_sequences: validation windows rolled out (a fixed random subset, drawn once from `seed`).
        context: context steps per rollout (the last ones of each window's context); None: all.
        horizon: steps rolled out (the first ones of each window's future); None: all.
        batch_size: rows per captured graph; more sequences are rolled out in slices.
        every_n_epochs: roll out at every n-th epoch's validation. Above 1, a ModelCheckpoint or EarlyStopping
            monitoring `<prefix>/...` must check at those epochs only (an error otherwise).
        chunk: steps per graph replay.
        compile: fuse the step body with torch.compile before capture.
        cuda_graph: "auto" (a graph when the model is on a GPU, else the step loop), True
            (a configuration error without CUDA) or False (always the loop).
        fused: run each rollout as one fused Triton kernel (`RolloutEngine(fused=...)`):
            False, "auto" (where the kernel covers the model on a GPU and the rollout has at
            most two rows per SM, or is an LRU / S5 one of d_model 65 or more on bf16 weights
            (`fused.selection.wide_modal_bf16`), else as `cuda_graph` says; a kernel failure warns once and
            the graph takes over) or True (a
            configuration error for a model the kernel does not cover, or without a GPU).
            `tf32` picks the kernel's "tf32" dots; chunk, compile and batch_size concern
            the graph path only.
        on_capture_error: "fallback" (warn once, continue on the step loop) or "raise".
        event_mode: roll out with the windows' dt; None: whenever the data provides dt (False with data
            that has dt warns once).
        autocast_dtype: None, "bfloat16" or "float16" for the engine's autocast.
        tf32: float32 matmuls of the rollout on TF32 tensor cores (faster small-batch steps,
            ~1e-3 relative error per matmul); False by default; None keeps the global setting.
        threshold: normalised RMSE that ends the valid prediction time.
        divergence_threshold: normalised error (in channel standard deviations) beyond
            which a rollout counts as diverged; above `threshold`.
        seed: seeds the choice of windows (a resumed run keeps the checkpoint's windows, and warns if they differ).
        num_plots: sample plots per validation (W&B).
        plot_channels: channels drawn per sample plot.
        sanity_check: also roll out during the sanity-check validation (captures early).
        prefix: namespace of the logged keys.

    Example:
        >>> rollout = RolloutCallback(num_sequences=16, horizon=128, cuda_graph="auto")
        >>> trainer = Trainer(callbacks=[rollout], logger=WandbLogger(mode="offline"))
        >>> trainer.fit(NextStepModule(model, optimizer), datamodule=LorenzDataModule(event=True))
        >>> trainer.callback_metrics["rollout/nrmse"], rollout.last_result.valid_steps
    """

    def __init__(self, num_sequences: int = 16, context: int | None = None, horizon: int | None = None,
                 batch_size: int = 16, every_n_epochs: int = 1, chunk: int = 16, compile: bool = False,
                 cuda_graph: bool | str = "auto", on_capture_error: str = "fallback",
                 event_mode: bool | None = None, autocast_dtype: str | torch.dtype | None = None,
                 tf32: bool | None = False, threshold: float = 0.5, divergence_threshold: float = 100.0,
                 seed: int = 0, num_plots: int = 4,
                 plot_channels: int = 3, sanity_check: bool = False, prefix: str = "rollout",
                 fused: bool | str = False):
        self.num_sequences = _positive_int("num_sequences", num_sequences, "e.g. generation.num_sequences=16.")
        self.context = _positive_int("context", context, "e.g. generation.context=64.", allow_none=True)
        self.horizon = _positive_int("horizon", horizon, "e.g. generation.horizon=128.", allow_none=True)
        self.batch_size = _positive_int("batch_size", batch_size, "rows per captured graph, e.g. "
                                        "generation.batch_size=16.")
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)
        self.chunk = _positive_int("chunk", chunk, "steps per graph replay, e.g. generation.chunk=16.")
        _positive_int("plot_channels", plot_channels)
        if isinstance(num_plots, bool) or not isinstance(num_plots, int) or num_plots < 0:
            raise ValueError(f"{OWNER}: num_plots must be a non-negative integer, got {num_plots!r}.")
        if not _finite_number(threshold) or not float(threshold) > 0:
            raise ValueError(f"{OWNER}: threshold must be a positive number, got {threshold!r}. HINT: 0.5 is "
                             "customary.")
        if not _finite_number(divergence_threshold) or not float(divergence_threshold) > float(threshold):
            raise ValueError(f"{OWNER}: divergence_threshold must be a finite number above threshold={threshold!r}, "
                             f"got {divergence_threshold!r}. HINT: it is in channel standard deviations; 100 "
                             "catches rollouts that blow up without flagging merely poor ones.")
        if on_capture_error not in ("fallback", "raise"):
            raise ValueError(f"{OWNER}: on_capture_error must be 'fallback' or 'raise', got {on_capture_error!r}. "
                             "HINT: 'fallback' keeps training going on the step loop when a graph cannot be "
                             "captured.")
        if event_mode not in (None, True, False):
            raise ValueError(f"{OWNER}: event_mode must be true, false or null (follow the data), got {event_mode!r}.")
        self.cuda_graph = _cuda_graph_option(cuda_graph)
        if self.cuda_graph is True and not torch.cuda.is_available():
            raise ValueError(f"{OWNER}: cuda_graph=true needs a CUDA GPU, but torch.cuda.is_available() is False "
                             "on this machine. HINT: set generation.cuda_graph=auto (a graph on a GPU, the step "
                             "loop on the CPU) or generation.cuda_graph=false.")
        self.fused = _fused_option(fused)
        if self.fused is True and fused_checks.triton_version() is None:
            raise ValueError(f"{OWNER}: fused=true needs Triton, which does not import here. HINT: pip install "
                             "-e '.[fused]', or set generation.fused=auto or false.")
        if self.fused is True and not torch.cuda.is_available() and not fused_checks.interpreter_active():
            raise ValueError(f"{OWNER}: fused=true needs a CUDA GPU, but torch.cuda.is_available() is False on this "
                             "machine. HINT: set generation.fused=auto (the fused kernel on a GPU, else the graph or "
                             "the step loop) or generation.fused=false.")
        self.compile, self.event_mode, self.on_capture_error = bool(compile), event_mode, on_capture_error
        self.autocast_dtype = _autocast_option(autocast_dtype)
        if tf32 not in (None, True, False):
            raise ValueError(f"{OWNER}: tf32 must be true, false or null (keep the global setting), got {tf32!r}.")
        self.tf32 = tf32
        self.threshold, self.divergence_threshold = float(threshold), float(divergence_threshold)
        self.seed, self.prefix = int(seed), str(prefix)
        self.num_plots, self.plot_channels, self.sanity_check = num_plots, plot_channels, bool(sanity_check)
        self.indices: list[int] | None = None
        self.last_result: RolloutResult | None = None
        self._engines: dict[tuple[int, torch.dtype, torch.device], RolloutEngine] = {}
        self._engine: RolloutEngine | None = None
        # per engine, the model signature its fused call was compiled and captured under
        self._fused_warmed: dict[tuple[int, torch.dtype, torch.device], tuple] = {}
        self._windows: _Windows | None = None
        self._windows_key: tuple | None = None
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # -- hooks -------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_run(trainer, pl_module, trainer.datamodule, fitting=stage == TrainerFn.FITTING)

    def check_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, datamodule: pl.LightningDataModule | None,
                  fitting: bool = True) -> None:
        """Raise, before any training, where this callback's settings cannot serve the run: a graph or the fused
        kernel required where they cannot run, windows too short for the context and horizon, event mode without
        dt, a monitor that `every_n_epochs` would starve; and warn (once) where a fit ends before its first
        rollout. `setup` calls it; `train.py` calls it too, before the loggers start a run."""
        device = trainer.strategy.root_device
        if self.cuda_graph is True and device.type != "cuda":
            raise ValueError(f"{OWNER}: cuda_graph=true needs the model on a CUDA GPU, but the trainer runs it on "
                             f"{device}. HINT: use trainer=gpu, or generation.cuda_graph=auto.")
        model = _rollout_model(pl_module)
        if self.fused is True:  # fail before training; the engine checks the weights' dtype where they live
            covered, why = fused_checks.model_coverage(model)
            if not covered:
                raise ValueError(f"{OWNER}: fused=true, but the fused kernel does not cover this model: {why}. "
                                 "HINT: set generation.fused=auto to fall back to the CUDA graph (or the step loop).")
            if device.type != "cuda" and not fused_checks.interpreter_active():
                raise ValueError(f"{OWNER}: fused=true needs the model on a CUDA GPU, but the trainer runs it on "
                                 f"{device}. HINT: use trainer=gpu, or generation.fused=auto.")
        if datamodule is not None:  # fail before training when the data's windows cannot serve the rollout
            self._check_windows(getattr(datamodule, "context_length", None), getattr(datamodule, "horizon", None),
                                getattr(datamodule, "event", None))
        if fitting:
            self._check_monitors(trainer)
            late = self.first_rollout_after_fit(trainer)
            if late is not None:
                self._warn_once("no rollout in fit", f"{OWNER}: {late}, so this fit logs no {self.prefix}/* "
                                "metrics. HINT: lower generation.every_n_epochs or raise trainer.max_epochs.")

    def first_rollout_epoch(self, trainer: pl.Trainer) -> int | None:
        """The 0-based epoch of a fresh fit's first rollout: the first validation whose epoch `every_n_epochs`
        divides (validations by epoch: every `check_val_every_n_epoch`); None where validation goes by steps."""
        validate_every = trainer.check_val_every_n_epoch
        if validate_every is None:
            return None
        return math.lcm(self.every_n_epochs, int(validate_every)) - 1

    def first_rollout_after_fit(self, trainer: pl.Trainer) -> str | None:
        """Why a fresh fit of `trainer.max_epochs` epochs would end before its first rollout, or None when it
        rolls out (or the length or the validation epochs are not known ahead)."""
        first = self.first_rollout_epoch(trainer)
        if trainer.max_epochs in (None, -1) or first is None or first < trainer.max_epochs:
            return None
        return (f"with every_n_epochs={self.every_n_epochs} and validation every {trainer.check_val_every_n_epoch} "
                f"epoch(s) the first rollout would come after epoch {first}, and the trainer stops after "
                f"{trainer.max_epochs} epochs")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine = None
        if not self._due(trainer):
            return
        model = _rollout_model(pl_module)
        device, dtype = _device_dtype(model)
        self._windows = self._subset(trainer, device, dtype)
        rows = min(self.batch_size, len(self._windows.shard.positions))
        key = (rows, dtype, device)
        if key not in self._engines:
            self._engines[key] = RolloutEngine(
                model, batch_size=rows, chunk=self.chunk, cuda_graph=self.cuda_graph, compile=self.compile,
                event_mode=self._windows.dt is not None, autocast_dtype=self.autocast_dtype,
                on_capture_error=self.on_capture_error, tf32=self.tf32, fused=self.fused)
        self._engine = self._engines[key]
        self._warm_up(key)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is None:
            return
        self.last_result = result = self._rollout(trainer)
        for name, value in result.scalars(self.prefix).items():
            # already the same on every process; sync_dist only keeps Lightning's bookkeeping of epoch metrics
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        rank_zero_info(f"{OWNER}: {result.describe(trainer.global_rank)}")
        if self.compile and result.stats.path != "graph":
            self._warn_once("compile unused", f"{OWNER}: compile=true, but the rollout ran on the {result.stats.path} "
                            "path, where it has no effect (it compiles the step of the CUDA graph path only). "
                            "HINT: drop generation.compile, or roll out on a GPU with generation.fused=false.")
        if result.diverged:
            self._warn_once("diverged", f"{OWNER}: {result.diverged} of {len(result.indices)} rolled-out sequences "
                            f"diverged at epoch {result.epoch} (the first at horizon step {result.first_diverged_step}"
                            f"): NaN/Inf or more than divergence_threshold={self.divergence_threshold:g} channel "
                            "scales off. From that step on they count as divergence_threshold scales off; see "
                            f"{self.prefix}/diverged_fraction. HINT: a lower learning rate, gradient clipping, or "
                            "a model whose recurrence is kept stable (|eigenvalues| < 1).")
        if trainer.is_global_zero:
            self._log_media(trainer, result)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for engine in self._engines.values():
            engine.release()
        self._engines.clear()
        self._fused_warmed.clear()
        self._engine, self._windows, self._windows_key = None, None, None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_sequences": self.num_sequences, "indices": copy.copy(self.indices)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the checkpoint's windows win, so that the rollout curves before and after a resume are comparable
        indices = None if state_dict.get("indices") is None else [int(i) for i in state_dict["indices"]]
        seed = int(state_dict["seed"])
        num_sequences = int(state_dict.get("num_sequences", self.num_sequences if indices is None else len(indices)))
        if (seed, num_sequences) != (self.seed, self.num_sequences):
            self._warn_once("resumed windows", f"{OWNER}: the checkpoint's rollout windows were drawn with seed={seed}"
                            f", num_sequences={num_sequences}, but this callback was given seed={self.seed}, "
                            f"num_sequences={self.num_sequences}; the checkpoint's windows are kept, so the rollout "
                            "curves stay comparable across the resume. HINT: to roll out other windows, start a "
                            "fresh run (no ckpt_path) with the new generation.seed / generation.num_sequences.")
        self.seed, self.num_sequences, self.indices = seed, num_sequences, indices
        self._windows, self._windows_key = None, None

    # -- work --------------------------------------------------------------------------------

    def _due(self, trainer: pl.Trainer) -> bool:
        # depends only on the trainer's progress, so every process takes the same decision (collectives follow)
        if trainer.sanity_checking:
            return self.sanity_check
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _subset(self, trainer: pl.Trainer, device: torch.device, dtype: torch.dtype) -> _Windows:
        """This process's share of the fixed rollout windows, chosen once (or restored from a checkpoint)."""
        dataset = _validation_windows(trainer)
        if self.indices is None:
            count = min(self.num_sequences, len(dataset))
            if count < self.num_sequences:
                rank_zero_warn(f"{OWNER}: num_sequences={self.num_sequences} but the validation set has only "
                               f"{len(dataset)} windows; rolling out all of them.")
            generator = torch.Generator().manual_seed(self.seed)
            self.indices = sorted(torch.randperm(len(dataset), generator=generator)[:count].tolist())
        elif max(self.indices) >= len(dataset):
            raise ValueError(f"{OWNER}: the rollout windows restored from the checkpoint go up to index "
                             f"{max(self.indices)}, but the validation set now has {len(dataset)} windows. HINT: "
                             "resume with the same data settings, or start a fresh run.")
        key = (tuple(self.indices), trainer.world_size, trainer.global_rank, device, dtype, self.context,
               self.horizon, self.event_mode)
        if self._windows_key == key and self._windows is not None:
            return self._windows
        items = [dataset[i] for i in self.indices]
        window_context, window_future = items[0]["context"].shape[0], items[0]["future"].shape[0]
        context = self.context or window_context
        horizon = self.horizon or window_future
        has_dt = "dt" in items[0]
        self._check_windows(window_context, window_future, has_dt)
        use_dt = has_dt if self.event_mode is None else self.event_mode
        if has_dt and self.event_mode is False:
            self._warn_once("dt ignored", f"{OWNER}: event_mode=false, but the validation windows carry per-step dt "
                            "(data.event=true): the rollout ignores the data's dt and steps the model as if the "
                            "samples were evenly spaced, unlike in training. HINT: set generation.event=null (follow "
                            "the data) or true to roll out with the data's dt.")
        stack = lambda name: torch.stack([item[name] for item in items])
        contexts, futures = stack("context")[:, window_context - context:], stack("future")[:, :horizon]
        dts = stack("dt")[:, window_context - context:window_context + horizon] if use_dt else None
        if dts is not None:
            _check_dt_values(dts, self.indices)
        part = shard(len(self.indices), trainer.world_size, trainer.global_rank)
        rows = torch.tensor(part.positions)
        truth = torch.cat([contexts, futures], dim=1)
        constant = constant_channels(truth)
        if constant:
            self._warn_once("constant channels", f"{OWNER}: channel{'s' if len(constant) > 1 else ''} {constant} "
                            f"{'do' if len(constant) > 1 else 'does'} not move in the {len(self.indices)} rolled-out "
                            "windows, so the normalised errors (nrmse, divergence) measure them in the data's unit "
                            "(scale 1) rather than by their deviation. HINT: more generation.num_sequences draw "
                            "more windows; a channel constant over all of validation may be worth dropping.")
        windows = _Windows(
            shard=part, context=contexts[rows], future=futures[rows], dt=None if dts is None else dts[rows],
            scale=channel_scale(truth),
            engine_context=contexts[rows].to(device=device, dtype=dtype),
            engine_dt=None if dts is None else dts[rows].to(device=device, dtype=dtype),
        )
        self._windows, self._windows_key = windows, key
        return windows

    def _check_windows(self, window_context: int | None, window_future: int | None, has_dt: bool | None) -> None:
        """Raise if the windows are too short for `context` / `horizon`, or lack dt in event mode (None: unknown)."""
        for name, wanted, available, data_key in (("context", self.context, window_context, "context_length"),
                                                   ("horizon", self.horizon, window_future, "horizon")):
            if wanted is not None and available is not None and wanted > available:
                raise ValueError(
                    f"{OWNER}: {name}={wanted} is longer than the validation windows' {name} ({available} steps). "
                    f"HINT: lower generation.{name} to at most {available}, or raise data.{data_key}.")
        if self.event_mode and has_dt is False:
            raise ValueError(f"{OWNER}: event_mode=true needs per-step dt from the data, but the validation windows "
                             "have none. HINT: set data.event=true (the data must have timestamps; for data=csv set "
                             "data.timestamp_column), or generation.event=false.")

    def _check_monitors(self, trainer: pl.Trainer) -> None:
        """Raise if a callback reads this callback's metrics at a validation that does not roll out.

        With every_n_epochs > 1 the `<prefix>/` keys are missing at the other validations, where a ModelCheckpoint
        or a strict EarlyStopping monitoring them stops training with Lightning's "could not find the monitored
        key", and later validations read an older rollout's value again (an EarlyStopping, strict or not, counts it
        as no improvement). Fine: a checkpoint that saves every multiple of every_n_epochs epochs (or never by its
        monitor), and a trainer that validates only every multiple of every_n_epochs epochs.
        """
        every = self.every_n_epochs
        validate_every = trainer.check_val_every_n_epoch
        if every == 1 or (isinstance(validate_every, int) and validate_every >= 1 and validate_every % every == 0):
            return
        for callback in trainer.callbacks:
            monitor = getattr(callback, "monitor", None)
            if callback is self or not isinstance(monitor, str) or not monitor.startswith(f"{self.prefix}/"):
                continue
            name, fix = type(callback).__name__, ""
            if isinstance(callback, ModelCheckpoint):
                by_steps = bool(getattr(callback, "_every_n_train_steps", 0))
                by_time = getattr(callback, "_train_time_interval", None) is not None
                if callback.every_n_epochs % every == 0 and (callback.every_n_epochs or not (by_steps or by_time)):
                    continue  # saves only at rollout epochs, or never by its monitor
                name += (f"(monitor={monitor!r}, every_n_epochs={callback.every_n_epochs})" if callback.every_n_epochs
                         else f"(monitor={monitor!r}, saving by training steps or time)")
                fix = f", or give the checkpoint every_n_epochs={every} (or a multiple)"
            else:  # EarlyStopping, strict or not, and any other monitor: read at every validation
                name += f"(monitor={monitor!r})"
            # Lightning keeps an epoch's logged metrics until they are logged again: before the first rollout the
            # key is missing (a strict monitor stops training), after it the older rollout's value is read again
            raise ValueError(
                f"{OWNER}: every_n_epochs={every} rolls out, and logs '{self.prefix}/...', only every {every} epochs, "
                f"but {name} reads {monitor!r} at the other epochs' validations too, where it is missing (before "
                f"the first rollout) or an older rollout's value. HINT: monitor val/loss, or set "
                f"generation.every_n_epochs=1{fix}, or validate only every {every} epochs "
                f"(trainer.check_val_every_n_epoch={every}).")

    def _run_engine(self, context: Tensor, horizon: int, dt: Tensor | None) -> Tensor:
        # the trainer's autocast (mixed precision) must not leak into the rollout: the engine's own setting rules
        with torch.inference_mode(False), torch.autocast(context.device.type, enabled=False):
            return self._engine.rollout(context, horizon=horizon, dt=dt)

    def _warm_up(self, key: tuple[int, torch.dtype, torch.device]) -> None:
        """Keep one-off costs out of the timed rollout at validation end (`steps_per_second`).

        Graph path: a prefill-only rollout of one graph batch captures the graph now (or re-captures it, if the
        weights' storage was replaced), so validation end only replays. Fused path, once per engine and model
        signature (replaced weights drop the captured calls): two rollouts of the real rows and horizon make
        Triton compile the kernel (first) and capture the call as a CUDA graph (second, `fused.call_graph`),
        so validation end only replays that. The loop path has nothing to warm up.
        """
        windows, engine = self._windows, self._engine
        backend = engine.next_backend(windows.engine_context.device, windows.engine_context.shape[0]).backend
        if backend == "graph":
            rows, horizon = engine.batch_size, 1
            context_length = windows.engine_context.shape[1]
            self._run_engine(windows.engine_context[:rows], horizon, None if windows.engine_dt is None else
                             windows.engine_dt[:rows, :context_length + horizon])
        elif backend == "fused" and self._fused_warmed.get(key) != (signature := model_signature(engine.model)):
            self._fused_warmed[key] = signature
            for _ in range(2):
                self._run_engine(windows.engine_context, windows.future.shape[1], windows.engine_dt)

    def _rollout(self, trainer: pl.Trainer) -> RolloutResult:
        """Roll out this process's rows, score them, and combine the scores of all processes."""
        windows, engine = self._windows, self._engine
        part, horizon = windows.shard, windows.future.shape[1]
        start = time.perf_counter()
        prediction = self._run_engine(windows.engine_context, horizon, windows.engine_dt)
        seconds = time.perf_counter() - start
        prediction = prediction.detach().float().cpu()
        sums, per_sequence = score_rows(windows.context, windows.future, prediction, windows.scale, part.weight,
                                        threshold=self.threshold, divergence_limit=self.divergence_threshold)
        model_sums, persistence_sums = split_sums(sum_over_processes(trainer, sums), windows.future.shape[2])
        count = len(self.indices)
        sequences = SequenceScores.from_rows(gather_rows(trainer, per_sequence)[:count])
        # the engine's speed counts the padding rows too; only this process's own sequences count here
        speed = engine.stats.steps_per_second * part.real / len(part.positions)
        device = windows.engine_context.device
        reports = gather_rows(trainer, RankReport.vector(device, part.real, engine.stats, speed)[None])
        model_errors, persistence_errors = model_sums.errors(), persistence_sums.errors()
        own = part.positions[:part.real]
        return RolloutResult(
            epoch=trainer.current_epoch,
            indices=list(self.indices),
            rows=own,
            context=windows.context[:part.real], future=windows.future[:part.real],
            prediction=prediction[:part.real], dt=None if windows.dt is None else windows.dt[:part.real],
            model=model_errors, persistence=persistence_errors,
            sequences=sequences,
            valid_steps=int(valid_prediction_steps(model_errors.nrmse, self.threshold)),
            persistence_valid_steps=int(valid_prediction_steps(persistence_errors.nrmse, self.threshold)),
            diverged=model_sums.diverged,
            first_diverged_step=model_sums.first_diverged_step,
            ranks=[RankReport.from_vector(rank, row, device.type) for rank, row in enumerate(reports)],
            stats=copy.copy(engine.stats),
            seconds=seconds,
        )

    def _log_media(self, trainer: pl.Trainer, result: RolloutResult) -> None:
        """W&B media on global rank zero; a W&B failure is reported once and never stops training."""
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            try:
                log_rollout_media(logger, result, step=trainer.global_step, prefix=self.prefix,
                                  num_plots=self.num_plots, plot_channels=self.plot_channels)
            except Exception as error:  # media are a convenience; the scalars already went to every logger
                self._warn_once("media", f"{OWNER}: logging the rollout media to W&B failed "
                                f"({type(error).__name__}: {error}); the scalars still reach every logger. "
                                "HINT: check the W&B run's directory and disk space.")

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            rank_zero_warn(message)


def _finite_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def _check_dt_values(dt: Tensor, indices: list[int]) -> None:
    """Event timesteps of the rollout windows (N, C + T) must be finite and positive; name the first bad one."""
    bad = ~torch.isfinite(dt) | (dt <= 0)
    if bool(bad.any()):
        row, step = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{OWNER}: validation window {indices[row]} has dt={float(dt[row, step])!r} at step {step}; "
                         "event timesteps must be finite and positive. HINT: dt is the gap between consecutive "
                         "timestamps, so the data's timestamps must be finite and strictly increasing.")


def _rollout_model(pl_module: pl.LightningModule) -> nn.Module:
    """The step-protocol model inside the LightningModule (its `model` attribute, or the module itself)."""
    for candidate in (getattr(pl_module, "model", None), pl_module):
        if isinstance(candidate, nn.Module) and all(callable(getattr(candidate, name, None))
                                                    for name in ("allocate_state", "step", "prefill")):
            return candidate
    raise ValueError(f"{OWNER}: {type(pl_module).__name__} has no model implementing the step protocol "
                     "(allocate_state, step, prefill). HINT: keep it as `self.model`, as NextStepModule does.")


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


def _validation_windows(trainer: pl.Trainer):
    """The validation dataset of windows (dicts with 'context', 'future' and optionally 'dt')."""
    dataset = getattr(trainer.datamodule, "val_dataset", None) if trainer.datamodule is not None else None
    if dataset is None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{OWNER}: found no validation windows to roll out. HINT: use a datamodule from "
                         "lrnn_lightning.data, or one whose `val_dataset` yields dicts with 'context' and 'future'.")
    item = dataset[0]
    if not isinstance(item, dict) or "context" not in item or "future" not in item:
        raise ValueError(f"{OWNER}: validation items must be dicts with 'context' (C, H) and 'future' (T, H) "
                         f"(and 'dt' (C + T,) in event mode), got {type(item).__name__}"
                         f"{' with keys ' + str(sorted(item)) if isinstance(item, dict) else ''}.")
    return dataset
