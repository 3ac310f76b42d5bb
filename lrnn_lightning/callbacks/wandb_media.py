"""What `RolloutCallback` shows in Weights & Biases: the error-vs-horizon chart, sample plots,
a table of the samples and the rollout's timing."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lrnn_lightning.callbacks.plotting import plot_rollout

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

    from lrnn_lightning.callbacks.rollout import RolloutResult


def sample_times(dt: torch.Tensor, context_length: int) -> torch.Tensor:
    """Sample times from per-step gaps dt (L,), shifted so the first predicted sample is at 0."""
    times = torch.cat([dt.new_zeros(1), dt[:-1].double().cumsum(0)])
    return times - times[context_length]


def log_rollout_media(logger: WandbLogger, result: RolloutResult, *, step: int, prefix: str, num_plots: int,
                      plot_channels: int) -> None:
    """Log one validation's rollout media to `logger`'s run (call on global rank zero only)."""
    import wandb

    horizon = list(range(1, result.future.shape[1] + 1))
    chart = wandb.plot.line_series(
        xs=horizon,
        ys=[result.model.nrmse.tolist(), result.persistence.nrmse.tolist()],
        keys=["model", "persistence"],
        title=f"Normalised RMSE vs horizon (epoch {result.epoch})",
        xname="horizon step",
    )
    images = []
    context_length = result.context.shape[1]
    # plots of this process's own windows (on rank zero: the first of the subset), table rows for all
    plotted = {}
    for k, position in enumerate(result.rows[:num_plots]):
        window = result.indices[position]
        times = None if result.dt is None else sample_times(result.dt[k], context_length)
        pixels = plot_rollout(result.context[k], result.future[k], result.prediction[k], plot_channels,
                              title=f"validation window {window}, epoch {result.epoch}", times=times)
        plotted[position] = wandb.Image(pixels, caption=f"window {window}")
        images.append(plotted[position])
    scores, horizon_length = result.sequences, result.future.shape[1]
    rows = [[window, plotted.get(position), float(scores.nrmse[position]), float(scores.persistence_nrmse[position]),
             int(scores.valid_steps[position]), int(scores.diverged_at[position]) < horizon_length]
            for position, window in enumerate(result.indices)]
    table = wandb.Table(columns=["window", "plot", "nrmse", "persistence_nrmse", "valid_steps", "diverged"],
                        data=rows)
    logger.experiment.log({
        f"{prefix}/error_vs_horizon": chart,
        f"{prefix}/samples": images,
        f"{prefix}/samples_table": table,
        f"{prefix}/path": result.path,  # "mixed" when processes took different paths
        f"{prefix}/rank_paths": result.rank_paths,
        f"{prefix}/backend_reason": result.stats.backend_reason or "",  # rank zero's
        f"{prefix}/fallback_reason": result.stats.fallback_reason or "",
        f"{prefix}/compiled": result.stats.compiled,
        f"{prefix}/capture_ms": result.stats.capture_ms,
        f"{prefix}/num_captures": result.stats.num_captures,
        f"{prefix}/steps_per_second": sum(report.steps_per_second for report in result.ranks),
        f"{prefix}/processes": len(result.ranks),
        "trainer/global_step": step,
    })
