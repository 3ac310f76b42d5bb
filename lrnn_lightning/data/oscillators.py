"""`OscillatorsDataModule`: coupled, damped, driven oscillators (the default data)."""

from __future__ import annotations

import numpy as np
from typing_extensions import override

from lrnn_lightning.data.base import RawSeries, WindowDataModule
from lrnn_lightning.data.ode import check_sampling, integrate_sampled, sample_gaps
from lrnn_lightning.models.validation import check_positive_int


class OscillatorsDataModule(WindowDataModule):
    """A chain of `num_oscillators` damped oscillators, each driven by its own sinusoid and
    coupled to its neighbours by springs:

        x_i'' = -w_i^2 x_i - 2 z_i w_i x_i' + k (x_{i-1} - 2 x_i + x_{i+1}) + A_i cos(W_i t + p_i)

    The system (w, z, A, W) is drawn once from `seed`; each of the `num_series` series starts
    from its own random state with its own drive phases p_i, so a model must read the phase and
    amplitude from the context. The channels are the positions x_i. With `event=true` the
    series are sampled at irregular times (gaps uniform in sample_dt * [1 - jitter, 1 + jitter]).

    Args:
        num_oscillators: channels.
        num_series: independent trajectories (each split by time into train and validation).
        num_samples: samples per trajectory.
        sample_dt: time between samples (the mean gap in event mode).
        coupling: spring constant k between neighbours.
        dt_jitter: relative spread of the irregular gaps in event mode, in [0, 1).
        substeps: RK4 steps per gap.
        seed: seeds the system and the trajectories.
        **kwargs: the window options of `WindowDataModule` (context_length, horizon, batch_size, ...).

    Example:
        >>> dm = OscillatorsDataModule(num_oscillators=3, context_length=32, horizon=64)
        >>> dm.setup()
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["context"].shape, batch["future"].shape
        (torch.Size([32, 32, 3]), torch.Size([32, 64, 3]))
    """

    name = "oscillators"

    def __init__(self, num_oscillators: int = 3, num_series: int = 8, num_samples: int = 1000,
                 sample_dt: float = 0.25, coupling: float = 0.2, dt_jitter: float = 0.5, substeps: int = 4,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.num_oscillators = check_positive_int(num_oscillators, "num_oscillators", owner)
        self.num_series, self.num_samples, self.substeps, self.sample_dt, self.dt_jitter = check_sampling(
            owner, num_series, num_samples, substeps, sample_dt, dt_jitter)
        self.coupling, self.seed = float(coupling), int(seed)

    @property
    @override
    def num_channels(self) -> int:
        return self.num_oscillators

    @override
    def load_series(self) -> RawSeries:
        rng = np.random.default_rng(self.seed)
        n = self.num_oscillators
        omega = rng.uniform(0.6, 1.6, n)
        zeta = rng.uniform(0.02, 0.08, n)
        amplitude = rng.uniform(0.3, 1.0, n)
        drive = rng.uniform(0.5, 1.5, n)
        phase = rng.uniform(0.0, 2 * np.pi, (self.num_series, n))
        laplacian = -2 * np.eye(n) + np.eye(n, k=1) + np.eye(n, k=-1)

        def rhs(t: np.ndarray, y: np.ndarray) -> np.ndarray:
            x, v = y[:, :n], y[:, n:]
            accel = (-(omega**2) * x - 2 * zeta * omega * v + self.coupling * x @ laplacian
                     + amplitude * np.cos(drive * t + phase))
            return np.concatenate([v, accel], axis=1)

        y0 = rng.normal(0.0, 1.0, (self.num_series, 2 * n))
        gaps = sample_gaps(rng, self.num_series, self.num_samples, self.sample_dt, self.event, self.dt_jitter)
        times, states = integrate_sampled(rhs, y0, gaps, self.substeps)
        return RawSeries(values=list(states[:, :, :n]), times=list(times))
