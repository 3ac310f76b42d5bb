"""`LorenzDataModule`: the Lorenz-63 system, integrated with RK4, sampled regularly or at random times."""

from __future__ import annotations

import numpy as np
from typing_extensions import override

from lrnn_lightning.data.base import RawSeries, WindowDataModule
from lrnn_lightning.data.ode import check_sampling, integrate_sampled, sample_gaps


class LorenzDataModule(WindowDataModule):
    """Lorenz-63, x' = s (y - x), y' = x (r - z) - y, z' = x y - b z, on its attractor.

    Each series starts from a random point, is integrated through a burn-in of `burn_in`
    time units so that it lies on the attractor, and is then sampled every `sample_dt`
    (the classical s = 10, r = 28, b = 8/3 by default). Every gap between samples is
    integrated with `substeps` RK4 steps (a step of 0.005 by default, far below the
    system's fastest time scale). With `event=true` the samples are taken at random
    irregular times, gaps uniform in sample_dt * [1 - dt_jitter, 1 + dt_jitter], and the
    windows' dt is the true gap (in units of `dt_unit`; by default the median gap, so
    dt scatters around 1).

    Args:
        num_series: independent trajectories.
        num_samples: samples per trajectory.
        sample_dt: time between samples (the mean gap in event mode).
        dt_jitter: relative spread of the irregular gaps, in [0, 1).
        substeps: RK4 steps per gap.
        burn_in: time integrated before the first sample.
        sigma, rho, beta: the system's parameters.
        seed: seeds the initial states and the sample times.
        **kwargs: the window options of `WindowDataModule`.

    Example:
        >>> dm = LorenzDataModule(event=True, context_length=64, horizon=64)
        >>> dm.setup()
        >>> dm.val_dataset[0]["dt"].shape
        torch.Size([128])
    """

    name = "lorenz"

    def __init__(self, num_series: int = 8, num_samples: int = 2000, sample_dt: float = 0.02,
                 dt_jitter: float = 0.5, substeps: int = 4, burn_in: float = 10.0, sigma: float = 10.0,
                 rho: float = 28.0, beta: float = 8.0 / 3.0, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.num_series, self.num_samples, self.substeps, self.sample_dt, self.dt_jitter = check_sampling(
            owner, num_series, num_samples, substeps, sample_dt, dt_jitter)
        if float(burn_in) < 0:
            raise ValueError(f"{owner}: burn_in must be non-negative, got {burn_in!r}.")
        self.burn_in = float(burn_in)
        self.sigma, self.rho, self.beta, self.seed = float(sigma), float(rho), float(beta), int(seed)

    @property
    @override
    def num_channels(self) -> int:
        return 3

    def rhs(self, t: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The Lorenz vector field for states y (S, 3)."""
        x, yy, z = y[:, 0], y[:, 1], y[:, 2]
        return np.stack([self.sigma * (yy - x), x * (self.rho - z) - yy, x * yy - self.beta * z], axis=1)

    @override
    def load_series(self) -> RawSeries:
        rng = np.random.default_rng(self.seed)
        y0 = rng.normal(0.0, 1.0, (self.num_series, 3)) + np.array([0.0, 0.0, 25.0])
        step = self.sample_dt / self.substeps
        burn_steps = int(np.ceil(self.burn_in / step))
        if burn_steps:
            _, states = integrate_sampled(self.rhs, y0, np.full((self.num_series, 1), burn_steps * step),
                                          burn_steps)
            y0 = states[:, -1]
        gaps = sample_gaps(rng, self.num_series, self.num_samples, self.sample_dt, self.event, self.dt_jitter)
        times, states = integrate_sampled(self.rhs, y0, gaps, self.substeps)
        return RawSeries(values=list(states), times=list(times))
