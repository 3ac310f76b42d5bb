"""`RolloutCallback`: autoregressive rollouts of the model from validation contexts, at every validation."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lrnn_lightning.callbacks.wandb_media import log_rollout_media
from lrnn_lightning.rollout import RolloutEngine, RolloutStats
from lrnn_lightning.rollout.metrics import (
    HorizonErrors,
    channel_scale,
    horizon_errors,
    per_sequence_nrmse,
    persistence_forecast,
    valid_prediction_steps,
)

OWNER = "RolloutCallback"
AUTOCAST_NAMES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                  "fp16": torch.float16, "half": torch.float16}


@dataclass
class RolloutResult:
    """One validation's rollout: the data, the forecast and its errors (tensors on the CPU)."""

    epoch: int
    indices: list[int]
    context: Tensor                 # (N, C, H)
    future: Tensor                  # (N, T, H), the truth
    prediction: Tensor              # (N, T, H), the rollout
    dt: Tensor | None               # (N, C + T) in event mode
    model: HorizonErrors            # curves (T,)
    persistence: HorizonErrors      # curves (T,) of the last-context-value baseline
    sequence_nrmse: Tensor          # (N, T)
    persistence_sequence_nrmse: Tensor
    sequence_valid_steps: Tensor    # (N,)
    valid_steps: int                # of the mean curve
    persistence_valid_steps: int
    stats: RolloutStats
    seconds: float

    def scalars(self, prefix: str) -> dict[str, float]:
        """The monitorable numbers, keyed `<prefix>/<name>`."""
        out = {f"{prefix}/{name}": value for name, value in self.model.mean().items()}
        out.update({f"{prefix}/persistence_{name}": value for name, value in self.persistence.mean().items()})
        out[f"{prefix}/nrmse_final"] = float(self.model.nrmse[-1])
        out[f"{prefix}/skill"] = 1.0 - out[f"{prefix}/mse"] / max(out[f"{prefix}/persistence_mse"], 1e-12)
        out[f"{prefix}/valid_steps"] = float(self.valid_steps)
        out[f"{prefix}/persistence_valid_steps"] = float(self.persistence_valid_steps)
        out[f"{prefix}/steps_per_second"] = float(self.stats.steps_per_second)
        out[f"{prefix}/capture_ms"] = float(self.stats.capture_ms)
        out[f"{prefix}/uses_graph"] = float(self.stats.path == "graph")
        return out


@dataclass
class _Windows:
    """The fixed rollout subset, stacked and on the model's device."""

    context: Tensor
    future: Tensor
    dt: Tensor | None


def _positive_int(name: str, value: Any, hint: str = "", allow_none: bool = False) -> int | None:
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{OWNER}: {name} must be a positive integer{' or None' if allow_none else ''}, got "
                         f"{value!r}." + (f" HINT: {hint}" if hint else ""))
    return value


def _cuda_graph_option(value: Any) -> bool | str:
    if isinstance(value, str) and value.lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.lower()]
    if value in (True, False) and isinstance(value, bool):
        return value
    raise ValueError(f"{OWNER}: cuda_graph must be 'auto', true or false, got {value!r}. HINT: 'auto' replays a "
                     "CUDA graph when the model is on a GPU and runs the step loop otherwise.")


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

    Logged through `pl_module.log` (so ModelCheckpoint, EarlyStopping and Optuna can monitor
    them), under `<prefix>/`: `mse`, `mae`, `nrmse` (averaged over the horizon), `nrmse_final`
    (at the last step), the same with `persistence_`, `skill` (1 - mse / persistence mse:
    above 0 beats doing nothing), `valid_steps` (steps before the normalised RMSE first
    exceeds `threshold`, the "valid prediction time"), `persistence_valid_steps`,
    `steps_per_second`, `capture_ms` and `uses_graph`. With a `WandbLogger`, global rank zero
    also logs the error-vs-horizon chart, sample plots, a table of the samples and the
    timing (graph or loop path).

    The rollout runs in the weights' dtype outside the trainer's autocast (a mixed-precision
    trainer does not change it), or under the engine's own `autocast_dtype`.

    Args:
        num_sequences: validation windows rolled out (a fixed random subset, drawn once from `seed`).
        context: context steps per rollout (the last ones of each window's context); None: all.
        horizon: steps rolled out (the first ones of each window's future); None: all.
        batch_size: rows per captured graph; more sequences are rolled out in slices.
        every_n_epochs: roll out at every n-th epoch's validation.
        chunk: steps per graph replay.
        compile: fuse the step body with torch.compile before capture.
        cuda_graph: "auto" (a graph when the model is on a GPU, else the step loop), True
            (require one: a configuration error without CUDA) or False (always the loop).
        event_mode: roll out with the windows' dt; None: whenever the data provides dt.
        autocast_dtype: None, "bfloat16" or "float16" for the engine's autocast.
        threshold: normalised RMSE that ends the valid prediction time.
        seed: seeds the choice of windows.
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
                 cuda_graph: bool | str = "auto", event_mode: bool | None = None,
                 autocast_dtype: str | torch.dtype | None = None, threshold: float = 0.5, seed: int = 0,
                 num_plots: int = 4, plot_channels: int = 3, sanity_check: bool = False, prefix: str = "rollout"):
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
        if not float(threshold) > 0:
            raise ValueError(f"{OWNER}: threshold must be positive, got {threshold!r}. HINT: 0.5 is customary.")
        if event_mode not in (None, True, False):
            raise ValueError(f"{OWNER}: event_mode must be true, false or null (follow the data), got {event_mode!r}.")
        self.cuda_graph = _cuda_graph_option(cuda_graph)
        if self.cuda_graph is True and not torch.cuda.is_available():
            raise ValueError(f"{OWNER}: cuda_graph=true needs a CUDA GPU, but torch.cuda.is_available() is False "
                             "on this machine. HINT: set generation.cuda_graph=auto (a graph on a GPU, the step "
                             "loop on the CPU) or generation.cuda_graph=false.")
        self.compile, self.event_mode = bool(compile), event_mode
        self.autocast_dtype = _autocast_option(autocast_dtype)
        self.threshold, self.seed, self.prefix = float(threshold), int(seed), str(prefix)
        self.num_plots, self.plot_channels, self.sanity_check = num_plots, plot_channels, bool(sanity_check)
        self.indices: list[int] | None = None
        self.last_result: RolloutResult | None = None
        self._engines: dict[tuple[int, torch.dtype, torch.device], RolloutEngine] = {}
        self._engine: RolloutEngine | None = None
        self._windows: _Windows | None = None
        self._windows_key: tuple | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # -- hooks -------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if self.cuda_graph is True and device.type != "cuda":
            raise ValueError(f"{OWNER}: cuda_graph=true needs the model on a CUDA GPU, but the trainer runs it on "
                             f"{device}. HINT: use trainer=gpu, or generation.cuda_graph=auto.")
        _rollout_model(pl_module)
        datamodule = trainer.datamodule
        if datamodule is not None:  # fail before training when the data's windows cannot serve the rollout
            self._check_windows(getattr(datamodule, "context_length", None), getattr(datamodule, "horizon", None),
                                getattr(datamodule, "event", None))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._engine = None
        if not self._due(trainer):
            return
        model = _rollout_model(pl_module)
        device, dtype = _device_dtype(model)
        self._windows = self._subset(trainer, device, dtype)
        rows = min(self.batch_size, self._windows.context.shape[0])
        key = (rows, dtype, device)
        if key not in self._engines:
            self._engines[key] = RolloutEngine(
                model, batch_size=rows, chunk=self.chunk, cuda_graph=self.cuda_graph, compile=self.compile,
                event_mode=self._windows.dt is not None, autocast_dtype=self.autocast_dtype,
                on_capture_error="raise" if self.cuda_graph is True else "fallback")
        self._engine = self._engines[key]
        if device.type == "cuda" and self.cuda_graph is not False:
            self._warm_up()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._engine is None:
            return
        self.last_result = result = self._rollout(trainer)
        for name, value in result.scalars(self.prefix).items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    log_rollout_media(logger, result, step=trainer.global_step, prefix=self.prefix,
                                      num_plots=self.num_plots, plot_channels=self.plot_channels)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for engine in self._engines.values():
            engine.release()
        self._engines.clear()
        self._engine, self._windows, self._windows_key = None, None, None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_sequences": self.num_sequences, "indices": copy.copy(self.indices)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict["seed"])
        self.indices = None if state_dict.get("indices") is None else [int(i) for i in state_dict["indices"]]
        self._windows, self._windows_key = None, None

    # -- work --------------------------------------------------------------------------------

    def _due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return self.sanity_check
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _subset(self, trainer: pl.Trainer, device: torch.device, dtype: torch.dtype) -> _Windows:
        """The fixed rollout windows, chosen once (or restored from a checkpoint) and cached on the device."""
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
        key = (tuple(self.indices), device, dtype, self.context, self.horizon, self.event_mode)
        if self._windows_key == key and self._windows is not None:
            return self._windows
        items = [dataset[i] for i in self.indices]
        window_context, window_future = items[0]["context"].shape[0], items[0]["future"].shape[0]
        context = self.context or window_context
        horizon = self.horizon or window_future
        has_dt = "dt" in items[0]
        self._check_windows(window_context, window_future, has_dt)
        use_dt = has_dt if self.event_mode is None else self.event_mode
        stack = lambda name: torch.stack([item[name] for item in items]).to(device=device, dtype=dtype)
        windows = _Windows(
            context=stack("context")[:, window_context - context:],
            future=stack("future")[:, :horizon],
            dt=stack("dt")[:, window_context - context:window_context + horizon] if use_dt else None,
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

    def _run_engine(self, context: Tensor, horizon: int, dt: Tensor | None) -> Tensor:
        # the trainer's autocast (mixed precision) must not leak into the rollout: the engine's own setting rules
        with torch.inference_mode(False), torch.autocast(context.device.type, enabled=False):
            return self._engine.rollout(context, horizon, dt=dt)

    def _warm_up(self) -> None:
        """Capture now (or re-capture, if the weights' storage was replaced), so validation end only replays."""
        windows, rows = self._windows, self._engine.batch_size
        context_length = windows.context.shape[1]
        self._run_engine(windows.context[:rows], 1, None if windows.dt is None else
                         windows.dt[:rows, :context_length + 1])

    def _rollout(self, trainer: pl.Trainer) -> RolloutResult:
        windows, engine = self._windows, self._engine
        horizon = windows.future.shape[1]
        start = time.perf_counter()
        prediction = self._run_engine(windows.context, horizon, windows.dt)
        seconds = time.perf_counter() - start
        context, future, prediction = (t.detach().float().cpu() for t in (windows.context, windows.future,
                                                                          prediction))
        scale = channel_scale(torch.cat([context, future], dim=1))
        persistence = persistence_forecast(context, horizon)
        model_errors = horizon_errors(prediction, future, scale)
        persistence_errors = horizon_errors(persistence, future, scale)
        sequence_nrmse = per_sequence_nrmse(prediction, future, scale)
        return RolloutResult(
            epoch=trainer.current_epoch,
            indices=list(self.indices),
            context=context, future=future, prediction=prediction,
            dt=None if windows.dt is None else windows.dt.detach().float().cpu(),
            model=model_errors, persistence=persistence_errors,
            sequence_nrmse=sequence_nrmse,
            persistence_sequence_nrmse=per_sequence_nrmse(persistence, future, scale),
            sequence_valid_steps=valid_prediction_steps(sequence_nrmse, self.threshold),
            valid_steps=int(valid_prediction_steps(model_errors.nrmse, self.threshold)),
            persistence_valid_steps=int(valid_prediction_steps(persistence_errors.nrmse, self.threshold)),
            stats=copy.copy(engine.stats),
            seconds=seconds,
        )


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
