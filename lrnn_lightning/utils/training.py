"""The training run behind `train.py`: data, model, module, callbacks, loggers, trainer, fit."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import seed_everything
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from lrnn_lightning.callbacks.result import MIXED, SCALAR_NAMES, RolloutResult
from lrnn_lightning.callbacks.rollout import RolloutCallback
from lrnn_lightning.utils.instantiate import (
    accepted_keys,
    check_target_keys,
    check_used_keys,
    close_match,
    instantiate_callbacks,
    instantiate_loggers,
)
from lrnn_lightning.utils.wandb_setup import finish_wandb

# the generation group's own settings: the callback's arguments, `event` standing for its event_mode
GENERATION_KEYS = frozenset(accepted_keys(RolloutCallback) or ()) | {"event"}


def route_lightning_logs_through_hydra() -> None:
    """Stop Lightning printing every message twice under Hydra.

    The `lightning` package gives its logger a console handler of its own, and its
    records also reach the root logger that Hydra configures (console and the run's
    train.log). When the root logger has handlers, drop Lightning's own.
    """
    root, lightning_logger = logging.getLogger(), logging.getLogger("lightning")
    if root.handlers:
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


def build(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate everything a run needs from a composed config (no training).

    Returns:
        dict with `datamodule`, `model`, `module`, `callbacks`, `loggers` and `trainer`.
    """
    check_target_keys(cfg.data, "data")
    check_used_keys(cfg, "generation", GENERATION_KEYS)
    check_target_keys(cfg.model, "model", passed=("d_input",))
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model, d_input=datamodule.num_channels)
    module = hydra.utils.instantiate(cfg.module, model=model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return {"datamodule": datamodule, "model": model, "module": module, "callbacks": callbacks,
            "loggers": loggers, "trainer": trainer}


def check_objective(name: str | None, trainer: Any) -> None:
    """Raise, before any training, where `optimized_metric` names a rollout number this run cannot log: no
    `RolloutCallback` logs under its prefix, the callback logs no such number, or it never rolls out within
    `trainer.max_epochs`. Other metrics (e.g. val/loss) are checked once logged (`metric_value`)."""
    if not name:
        return
    prefix, _, number = str(name).partition("/")
    callback = _rollout_callback(trainer, prefix)
    if callback is None:
        if prefix == "rollout":
            raise ValueError(f"optimized_metric={name!r} is a rollout metric, but this run has no RolloutCallback "
                             "(callbacks group). HINT: keep callbacks=default (or callbacks=rollout), or optimise "
                             "val/loss.")
        return
    if number not in SCALAR_NAMES:
        match = close_match(number, SCALAR_NAMES)
        guess = f"did you mean {prefix}/{match}? " if match else ""
        raise ValueError(f"optimized_metric={name!r}: the rollout callback logs no {number!r}; it logs "
                         f"{', '.join(f'{prefix}/{n}' for n in SCALAR_NAMES)}. HINT: {guess}e.g. "
                         f"optimized_metric={prefix}/nrmse.")
    late = callback.first_rollout_after_fit(trainer)
    if late is not None:
        raise ValueError(f"optimized_metric={name!r}, but {late}, so it is never logged. HINT: lower "
                         "generation.every_n_epochs or raise trainer.max_epochs.")


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value of the metric an optimiser (Optuna) minimises, or None when none is named."""
    if not name:
        return None
    if name not in metrics:
        example = close_match(name, metrics) or ("rollout/nrmse" if "rollout/nrmse" in metrics else None)
        raise ValueError(f"optimized_metric={name!r} was not logged. Logged metrics: {', '.join(sorted(metrics))}. "
                         f"HINT: pick one of those{f', e.g. optimized_metric={example}' if example else ''}.")
    return metrics[name]


def summary_line(metrics: dict[str, float], prefix: str = "rollout", rank_paths: str | None = None,
                 epoch: int | None = None) -> str:
    """One line that says whether the rollout beats doing nothing, and on which path it ran.

    `rank_paths` (e.g. "rank 0 fused, rank 1 graph", `RolloutResult.rank_paths`) is shown when
    the processes took different paths; `epoch`, the epoch of the rollout the metrics come from, when known.
    """
    if f"{prefix}/nrmse" not in metrics:
        return ("No rollout metrics were logged (no RolloutCallback, no validation ran, or none was at a multiple "
                "of generation.every_n_epochs).")
    path = _path_name(metrics, prefix)
    if path == MIXED and rank_paths:
        path = f"{MIXED} ({rank_paths})"
    when = "" if epoch is None else f" at epoch {epoch}"
    # skill compares the MSEs, so it is shown with them: the normalised RMSE weighs channels and steps otherwise
    # and can rank the model and persistence the other way round
    return (f"Rollout{when}: MSE {metrics[f'{prefix}/mse']:.4g} vs persistence "
            f"{metrics[f'{prefix}/persistence_mse']:.4g} (skill {metrics[f'{prefix}/skill']:+.3f}), "
            f"normalised RMSE {metrics[f'{prefix}/nrmse']:.4f} vs {metrics[f'{prefix}/persistence_nrmse']:.4f}, "
            f"valid for {metrics[f'{prefix}/valid_steps']:.0f} steps, "
            f"{metrics[f'{prefix}/steps_per_second']:.0f} steps/s on the {path} path.")


def _path_name(metrics: dict[str, float], prefix: str) -> str:
    """The path every process took, from the `<prefix>/uses_<path>` scalars (1 only when every process
    took it); "mixed" when none is 1 (processes took different paths), never a path that did not run."""
    for path in ("fused", "graph", "loop"):
        if metrics.get(f"{prefix}/uses_{path}"):
            return path
    return MIXED


def _rollout_callback(trainer: Any, prefix: str) -> RolloutCallback | None:
    """The trainer's `RolloutCallback` logging under `prefix`, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, RolloutCallback) and c.prefix == prefix), None)


def _last_rollout(trainer: Any, prefix: str) -> RolloutResult | None:
    """The last result of the trainer's `RolloutCallback` logging under `prefix`, if any ran."""
    callback = _rollout_callback(trainer, prefix)
    return None if callback is None else callback.last_result


def _rank_paths(trainer: Any, prefix: str) -> str | None:
    """Each process's path from the trainer's `RolloutCallback` logging under `prefix`, when they differ."""
    return _differing_paths(_last_rollout(trainer, prefix))


def _differing_paths(result: RolloutResult | None) -> str | None:
    return result.rank_paths if result is not None and result.path == MIXED else None


def stale_rollout_warning(result: RolloutResult | None, last_epoch: int, every_n_epochs: int | None) -> str | None:
    """A warning when the run's last rollout (`result`) is older than its last trained epoch (0-based), else None:
    the final rollout metrics and an `optimized_metric` taken from them then describe an older model."""
    if result is None or result.epoch >= last_epoch:
        return None
    every = "" if every_n_epochs is None else f" (generation.every_n_epochs={every_n_epochs})"
    return (f"The last rollout ran at epoch {result.epoch}, before the last trained epoch {last_epoch}{every}: the "
            "rollout metrics above (and an optimized_metric taken from them) describe the model of epoch "
            f"{result.epoch}. HINT: make trainer.max_epochs a multiple of generation.every_n_epochs.")


def output_dir_warning(cfg: DictConfig) -> str | None:
    """A warning when `paths.output_dir` is not Hydra's run directory, where Hydra keeps the run's log and
    `.hydra/config.yaml`: the run's files would then be split over two places. None where they agree or
    Hydra set no run directory (a composed config)."""
    output = OmegaConf.select(cfg, "paths.output_dir", default=None)
    try:
        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None
    except Exception:  # compose() leaves the runtime directory unset (missing)
        run_dir = None
    if not run_dir or not output or Path(str(output)).resolve() == Path(str(run_dir)).resolve():
        return None
    return (f"paths.output_dir={output} is not Hydra's run directory {run_dir}: checkpoints and logger files "
            "go to the first, Hydra's log and .hydra/config.yaml stay in the second. HINT: override "
            "hydra.run.dir (hydra.sweep.dir in a multirun) to move the whole run.")


def train(cfg: DictConfig) -> tuple[dict[str, float], float | None]:
    """Fit the configured model; return the final metrics and the optimised metric's value."""
    route_lightning_logs_through_hydra()
    split_run = output_dir_warning(cfg)
    if split_run:
        rank_zero_warn(split_run)
    if cfg.get("seed") is not None:
        seed_everything(cfg.seed, workers=True)
    parts = build(cfg)
    trainer, loggers = parts["trainer"], parts["loggers"]
    # settings that cannot run fail before a W&B run starts for them; the objective first, so that a rollout
    # that never comes is one error rather than the callback's warning and then the error
    check_objective(cfg.get("optimized_metric"), trainer)
    for callback in trainer.callbacks:
        if isinstance(callback, RolloutCallback):
            callback.check_run(trainer, parts["module"], parts["datamodule"])
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    exit_code = 1
    try:
        trainer.fit(parts["module"], datamodule=parts["datamodule"], ckpt_path=cfg.get("ckpt_path"))
        exit_code = 0
    finally:
        finish_wandb(loggers, exit_code=exit_code)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    callback = _rollout_callback(trainer, "rollout")
    last = None if callback is None else callback.last_result
    rank_zero_info(summary_line(metrics, rank_paths=_differing_paths(last), epoch=None if last is None else last.epoch))
    # after fit, current_epoch is one past the last epoch that ran
    every = None if callback is None else callback.every_n_epochs
    stale = stale_rollout_warning(last, trainer.current_epoch - 1, every)
    if stale:
        rank_zero_warn(stale)
    if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path:
        rank_zero_info(f"Best checkpoint: {trainer.checkpoint_callback.best_model_path}")
    return metrics, metric_value(metrics, cfg.get("optimized_metric"))
