"""Weights & Biases without a network: offline unless asked otherwise, never a login prompt.

Mode, first match wins: the logger config's `mode`; the WANDB_MODE environment variable;
"online" inside a W&B sweep agent (WANDB_SWEEP_ID set); otherwise "offline". An online
run with no credentials configured falls back to offline with a warning instead of
prompting. An online run whose start fails (no network, server down, rejected key)
starts offline instead, and if even that fails W&B is switched off while the other
loggers carry on: the run is never lost to W&B. Every wait is bounded: the start by
WANDB_INIT_TIMEOUT (60 s), the final upload by WANDB_FINISH_TIMEOUT (300 s), after
which the run's local files remain for `wandb sync`. At the end `finish_wandb` prints
each offline run's directory and the `wandb sync` command that uploads it later.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lrnn_lightning.utils.instantiate import accepted_keys, close_match

MODES = ("online", "offline", "disabled")
FALLBACK = {"online": "offline", "offline": "disabled"}
LOCAL_INIT_TIMEOUT = 90.0  # seconds for starting a run that needs no server


class ResilientWandbLogger(WandbLogger):
    """A `WandbLogger` that never takes the run down with it.

    If the W&B run cannot be started online, it starts offline (upload it later with
    `wandb sync`); if it cannot be started offline either, W&B is disabled for this run.
    Each step down is announced once with the reason. A failure while logging scalars
    is reported once and skipped, so the other loggers and the training go on.
    """

    _failed_logging = False

    @property
    @override
    def experiment(self):
        try:
            return super().experiment
        except Exception as error:
            mode = self._wandb_init.get("mode", "online")
            if self._experiment is not None or mode not in FALLBACK:
                raise
            fallback = FALLBACK[mode]
            rank_zero_warn(_fallback_message(mode, fallback, error, self.save_dir))
            self._wandb_init["mode"], self._log_model = fallback, False
            settings = self._wandb_init.get("settings")
            if settings is not None and hasattr(settings, "model_copy"):
                # a short timeout meant for the server must not cut short the local start of the offline run
                timeout = max(float(settings.init_timeout or 0), LOCAL_INIT_TIMEOUT)
                self._wandb_init["settings"] = settings.model_copy(update={"init_timeout": timeout})
            return self.experiment

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        try:
            super().log_metrics(metrics, step)
        except Exception as error:
            if not self._failed_logging:
                self._failed_logging = True
                rank_zero_warn(f"W&B: logging metrics failed ({_reason(error)}); skipping W&B for those, the other "
                               "loggers still get every metric. HINT: the run's local files stay in its directory "
                               "for `wandb sync`.")


def _reason(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _fallback_message(mode: str, fallback: str, error: Exception, save_dir: str | None) -> str:
    if fallback == "offline":
        return (f"W&B: could not start the online run ({_reason(error)}); logging to an offline run instead, so "
                "nothing is lost. HINT: check the network and WANDB_BASE_URL (WANDB_INIT_TIMEOUT sets how long to "
                "wait), then upload with the `wandb sync` command printed at the end of the run.")
    return (f"W&B: could not start the {mode} run either ({_reason(error)}); W&B is off for this run, the other "
            f"loggers (CSV, TensorBoard) carry on. HINT: check that {save_dir or 'the run directory'} is writable.")


def resolve_mode(mode: str | None = None) -> str:
    """The W&B mode to run in (see the module docstring for the order)."""
    chosen = mode or os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_SWEEP_ID") else "offline")
    chosen = {"dryrun": "offline", "run": "online"}.get(str(chosen).lower(), str(chosen).lower())
    if chosen not in MODES:
        raise ValueError(f"W&B mode must be one of {', '.join(MODES)}, got {chosen!r}. HINT: set logger.wandb.mode "
                         "or the WANDB_MODE environment variable.")
    return chosen


def _has_credentials() -> bool:
    """Whether wandb can authenticate without asking (it never prompts here)."""
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except Exception:
        return False


def _hydra_multirun_names() -> tuple[str | None, str | None]:
    """(group, name) for a job of a Hydra multirun: the sweep directory and the job's overrides."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None, None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None, None
        sweep = Path(str(hydra_cfg.sweep.dir))
        group = f"{hydra_cfg.job.name}-{sweep.name}"
        name = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"
        return group, f"{hydra_cfg.job.num}:{name}"
    except Exception:  # Hydra's runtime config may be partial (e.g. in compose-only tests)
        return None, None


def wandb_logger(project: str = "lrnn_lightning", name: str | None = None, group: str | None = None,
                 save_dir: str | Path = ".", mode: str | None = None, tags: Sequence[str] | None = None,
                 job_type: str = "train", log_model: bool | str = False, console: str | None = None,
                 **kwargs: Any) -> WandbLogger:
    """A `WandbLogger` that is offline by default and never waits for a network or a login.

    In a Hydra multirun each job is its own run, grouped by the sweep directory and named
    after the job's overrides (unless `group` / `name` are given).

    Args:
        project: W&B project.
        name: run name (W&B picks one when None).
        group: run group.
        save_dir: where the `wandb/` directory goes.
        mode: "online", "offline" or "disabled"; None follows WANDB_MODE, else offline.
        tags: run tags.
        job_type: W&B job type.
        log_model: upload checkpoints as artifacts (online only; ignored offline).
        console: W&B console capture; None uses WANDB_CONSOLE or "wrap" (Python-level, safe
            with progress bars).
        **kwargs: passed on to `wandb.init` through the logger.

    Example:
        >>> logger = wandb_logger(project="lrnn", save_dir="logs")          # offline
        >>> logger = wandb_logger(project="lrnn", mode="online")            # online if logged in
    """
    import wandb

    _check_init_keys(kwargs, wandb.init)
    mode = resolve_mode(mode)
    if mode == "online" and not _has_credentials():
        rank_zero_warn("W&B: online mode asked for, but no W&B credentials are configured; logging offline "
                       "instead. HINT: run `wandb login` (or set WANDB_API_KEY), then upload with `wandb sync`.")
        mode = "offline"
    if mode != "online" and log_model:
        rank_zero_warn(f"W&B: log_model={log_model!r} uploads checkpoints and needs online mode; ignored ({mode}).")
        log_model = False
    multirun_group, multirun_name = _hydra_multirun_names()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    timeouts = {"init_timeout": float(os.environ.get("WANDB_INIT_TIMEOUT", 60))}
    if "finish_timeout" in getattr(wandb.Settings, "model_fields", {}):  # recent wandb only
        timeouts["finish_timeout"] = float(os.environ.get("WANDB_FINISH_TIMEOUT", 300))
    settings = kwargs.pop("settings", None) or wandb.Settings(
        silent=os.environ.get("WANDB_SILENT", "true").lower() == "true",
        console=console or os.environ.get("WANDB_CONSOLE", "wrap"), **timeouts)
    logger = ResilientWandbLogger(project=project, name=name or multirun_name, group=group or multirun_group,
                                  save_dir=str(save_dir), mode=mode, tags=list(tags) if tags else None,
                                  job_type=job_type, log_model=log_model, settings=settings, **kwargs)
    # WandbLogger always passes `anonymous`, which recent wandb only warns about (it has no effect)
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def _check_init_keys(kwargs: dict[str, Any], init: Any) -> None:
    """Raise, naming them, for keys neither `WandbLogger` nor `init` (wandb.init) takes: wandb.init would fail
    with a TypeError only once the run starts, which reads like a failed start rather than a misspelt key."""
    init_keys = accepted_keys(init)
    if init_keys is None:  # a wandb.init that takes anything
        return
    parameters = inspect.signature(WandbLogger).parameters.values()
    accepted = init_keys | {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        guesses = [f"{key} -> {match}" for key in unknown if (match := close_match(key, accepted))]
        raise ValueError(f"logger.wandb: wandb.init takes no {', '.join(unknown)}. HINT: fix the spelling"
                         f"{' (' + ', '.join(guesses) + ')' if guesses else ''}; the keys it takes are wandb.init's "
                         "arguments (https://docs.wandb.ai/ref/python/init).")


def wandb_loggers(loggers: Iterable[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def finish_wandb(loggers: Iterable[Logger], exit_code: int = 0) -> list[Path]:
    """Finish every started W&B run and print where offline runs are and how to upload them.

    Returns:
        The run directories of the offline runs.
    """
    offline_dirs = []
    for logger in wandb_loggers(loggers):
        run = logger._experiment  # only runs that were started; `experiment` would start one
        if run is None or not hasattr(run, "finish"):
            continue
        run_dir = Path(run.settings.sync_dir) if getattr(run, "settings", None) is not None else None
        offline = bool(getattr(run.settings, "_offline", False))
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:  # the training is done and saved; W&B's local files remain for `wandb sync`
            rank_zero_warn(f"W&B: finishing the run failed ({_reason(error)}). HINT: its files are in {run_dir}; "
                           f"upload them with `wandb sync {run_dir}`.")
            continue
        if offline and run_dir is not None:
            offline_dirs.append(run_dir)
            rank_zero_info(f"W&B offline run saved in {run_dir}\n    upload it with:  wandb sync {run_dir}")
    return offline_dirs
