"""Rollout sample plots as RGB arrays (matplotlib's Agg canvas: no pyplot, no global backend change)."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def plot_rollout(context: Tensor, future: Tensor, prediction: Tensor, channels: int = 3,
                 title: str = "", times: Tensor | None = None) -> np.ndarray:
    """One window: context, true future and rollout for the first `channels` channels.

    Args:
        context: (C, H) history.
        future: (T, H) truth after the context.
        prediction: (T, H) the rollout.
        channels: how many channels to draw (one panel each).
        title: figure title.
        times: optional (C + T,) sample times (event mode); sample indices otherwise, with
            the first predicted sample at 0.

    Returns:
        The figure as an (height, width, 3) uint8 array.
    """
    context, future, prediction = (t.detach().float().cpu().numpy() for t in (context, future, prediction))
    # a diverged rollout (NaN/Inf, or values far off) must not squash the truth into a flat line
    prediction = np.where(np.isfinite(prediction), prediction, np.nan)
    c, t = context.shape[0], future.shape[0]
    x = np.arange(-c, t) if times is None else times.detach().double().cpu().numpy()
    shown = min(channels, context.shape[1])
    figure = Figure(figsize=(7, 1.6 * shown + 0.6), dpi=80)
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(shown, 1, sharex=True, squeeze=False)[:, 0]
    for k, ax in enumerate(axes):
        ax.plot(x[:c], context[:, k], color="0.5", lw=1.2, label="context")
        ax.plot(x[c - 1:], np.concatenate([context[-1:, k], future[:, k]]), color="black", lw=1.2, label="truth")
        ax.plot(x[c:], prediction[:, k], color="tab:red", lw=1.2, ls="--", label="rollout")
        ax.axvline(x[c], color="0.8", lw=0.8)
        ax.set_ylim(*_y_limits(np.concatenate([context[:, k], future[:, k]]), prediction[:, k]))
        ax.set_ylabel(f"ch {k}")
    axes[0].legend(loc="upper left", fontsize="small", ncol=3, frameon=False)
    axes[-1].set_xlabel("time" if times is not None else "step")
    if title:
        figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _y_limits(truth: np.ndarray, prediction: np.ndarray, reach: float = 2.0) -> tuple[float, float]:
    """The truth's range, widened to the prediction's but at most `reach` truth ranges beyond it."""
    low, high = float(truth.min()), float(truth.max())
    span = max(high - low, 1e-6)
    finite = prediction[np.isfinite(prediction)]
    if finite.size:
        low = max(min(low, float(finite.min())), low - reach * span)
        high = min(max(high, float(finite.max())), high + reach * span)
    margin = 0.05 * (high - low)
    return low - margin, high + margin
