"""Classical RK4 for the synthetic systems, sampled at regular or irregular times.

Each gap between two samples is integrated with `substeps` RK4 steps of its own size,
so irregular sampling is as accurate as regular sampling. All series advance together
(vectorised over the first axis), which keeps generation to a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lrnn_lightning.models.validation import check_positive_int

Rhs = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (t (S, 1), y (S, D)) -> dy/dt (S, D)


def rk4_step(rhs: Rhs, t: np.ndarray, y: np.ndarray, h: np.ndarray) -> np.ndarray:
    """One RK4 step of per-series size h (S, 1) from y (S, D) at times t (S, 1)."""
    k1 = rhs(t, y)
    k2 = rhs(t + h / 2, y + h / 2 * k1)
    k3 = rhs(t + h / 2, y + h / 2 * k2)
    k4 = rhs(t + h, y + h * k3)
    return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate_sampled(rhs: Rhs, y0: np.ndarray, gaps: np.ndarray, substeps: int) -> tuple[np.ndarray, np.ndarray]:
    """Integrate from y0 (S, D) at t = 0 and sample after every gap.

    Args:
        rhs: the vector field.
        y0: initial states, one row per series.
        gaps: (S, N - 1) positive time gaps between consecutive samples.
        substeps: RK4 steps per gap.

    Returns:
        (times (S, N), states (S, N, D)), the first sample being y0 at t = 0.
    """
    num_series, num_gaps = gaps.shape
    states = np.empty((num_series, num_gaps + 1, y0.shape[1]))
    times = np.zeros((num_series, num_gaps + 1))
    y, t = y0, np.zeros((num_series, 1))
    states[:, 0] = y0
    for k in range(num_gaps):
        h = gaps[:, k:k + 1] / substeps
        for _ in range(substeps):
            y = rk4_step(rhs, t, y, h)
            t = t + h
        states[:, k + 1], times[:, k + 1] = y, t[:, 0]
    return times, states


def sample_gaps(rng: np.random.Generator, num_series: int, num_samples: int, sample_dt: float,
                irregular: bool, jitter: float) -> np.ndarray:
    """Gaps (S, N - 1): all `sample_dt`, or in event mode uniform in sample_dt * [1 - jitter, 1 + jitter]."""
    if not irregular:
        return np.full((num_series, num_samples - 1), float(sample_dt))
    return sample_dt * rng.uniform(1.0 - jitter, 1.0 + jitter, size=(num_series, num_samples - 1))


def check_sampling(owner: str, num_series, num_samples, substeps, sample_dt,
                   dt_jitter) -> tuple[int, int, int, float, float]:
    """Validate the sampling settings shared by the simulated datamodules.

    Returns:
        (num_series, num_samples, substeps, sample_dt, dt_jitter), converted.
    """
    num_series = check_positive_int(num_series, "num_series", owner)
    num_samples = check_positive_int(num_samples, "num_samples", owner)
    substeps = check_positive_int(substeps, "substeps", owner)
    if not float(sample_dt) > 0:
        raise ValueError(f"{owner}: sample_dt must be positive, got {sample_dt!r}.")
    if not 0.0 <= float(dt_jitter) < 1.0:
        raise ValueError(f"{owner}: dt_jitter must lie in [0, 1), got {dt_jitter!r}.")
    return num_series, num_samples, substeps, float(sample_dt), float(dt_jitter)
