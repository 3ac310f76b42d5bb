"""`WindowDataModule`: the shared machinery of every datamodule.

A subclass only says how to get its raw series (`load_series`); this base splits each
series by time, normalises every channel with statistics of the training part, turns
timestamps into per-step gaps in event mode, and serves `SeriesWindows`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lrnn_lightning.data.sampling import EpochShuffle
from lrnn_lightning.data.windows import SeriesWindows, gaps_from_times, split_by_time
from lrnn_lightning.models.validation import check_positive_int


@dataclass
class RawSeries:
    """What a subclass loads: values (one (N_i, H) array per series) and, when it has them,
    sample times (one (N_i,) array per series)."""

    values: list[np.ndarray]
    times: list[np.ndarray] | None = None


def check_times(owner: str, times: list[np.ndarray]) -> None:
    """Raise unless every series' timestamps are finite and strictly increasing (so every dt is positive)."""
    for series, stamps in enumerate(times):
        stamps = np.asarray(stamps, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(stamps))
        if bad.size:
            raise ValueError(f"{owner}: timestamp {float(stamps[bad[0]])!r} of series {series} at sample {bad[0]} is "
                             "not finite. HINT: event mode derives dt from the timestamps; drop or fill such samples.")
        bad = np.flatnonzero(np.diff(stamps) <= 0)
        if bad.size:
            k = int(bad[0]) + 1
            raise ValueError(f"{owner}: timestamps of series {series} must be strictly increasing, but sample {k} "
                             f"has {float(stamps[k])!r} after {float(stamps[k - 1])!r}, which would give dt <= 0. "
                             "HINT: sort the samples by time and drop duplicate timestamps.")


class WindowDataModule(LightningDataModule, abc.ABC):
    """Windows (context, future[, dt]) over series split by time into train and validation.

    Args:
        context_length: samples of history in each window.
        horizon: samples of future in each window (the longest rollout the callback can score).
        batch_size: windows per training batch.
        stride: distance between training window starts.
        val_stride: distance between validation window starts (defaults to `stride`).
        val_cover_end: also score the validation window that ends at each series' last sample, which the
            `val_stride` grid misses unless it divides; False keeps only the grid's windows.
        val_fraction: the last fraction of every series that is held out for validation.
        event: yield per-step timesteps `dt` (event mode).
        dt_unit: the time unit `dt` is expressed in; None uses the median gap of the training
            data, so a regularly sampled series has dt == 1 and irregular gaps scatter around 1.
        num_workers: DataLoader workers.
        shuffle_seed: seeds the order of the training windows, a new order every epoch that
            depends only on (seed, epoch), so a run resumed from a checkpoint trains on the
            same batches as an uninterrupted one; None follows the global seed
            (`seed_everything`).
    """

    name = "series"

    def __init__(self, context_length: int = 64, horizon: int = 128, batch_size: int = 32, stride: int = 1,
                 val_stride: int | None = None, val_fraction: float = 0.2, event: bool = False,
                 dt_unit: float | None = None, num_workers: int = 0, shuffle_seed: int | None = None,
                 val_cover_end: bool = True):
        super().__init__()
        owner = type(self).__name__
        self.context_length = check_positive_int(context_length, "context_length", owner)
        self.horizon = check_positive_int(horizon, "horizon", owner)
        self.batch_size = check_positive_int(batch_size, "batch_size", owner, hint="use e.g. data.batch_size=32.")
        self.stride = check_positive_int(stride, "stride", owner)
        self.val_stride = self.stride if val_stride is None else check_positive_int(val_stride, "val_stride", owner)
        if not isinstance(val_cover_end, bool):
            raise ValueError(f"{owner}: val_cover_end must be true or false, got {val_cover_end!r}.")
        self.val_cover_end = val_cover_end
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"{owner}: val_fraction must lie in (0, 1), got {val_fraction!r}.")
        if dt_unit is not None and not (isinstance(dt_unit, (int, float)) and np.isfinite(dt_unit) and dt_unit > 0):
            raise ValueError(f"{owner}: dt_unit must be a positive, finite number (or None for the median gap), got "
                             f"{dt_unit!r}. HINT: it is the time unit dt is expressed in, e.g. 3600.0 for hours "
                             "when the timestamps are in seconds.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"{owner}: num_workers must be a non-negative integer, got {num_workers!r}.")
        self.val_fraction, self.event, self.dt_unit = float(val_fraction), bool(event), dt_unit
        if shuffle_seed is not None and (isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int)):
            raise ValueError(f"{owner}: shuffle_seed must be an integer or None, got {shuffle_seed!r}.")
        self.num_workers, self.shuffle_seed = num_workers, shuffle_seed
        self.train_dataset: SeriesWindows | None = None
        self.val_dataset: SeriesWindows | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @property
    @abc.abstractmethod
    def num_channels(self) -> int:
        """Channels H per sample (the model's input and output width)."""

    @abc.abstractmethod
    def load_series(self) -> RawSeries:
        """The raw series, in time order."""

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        raw = self.load_series()
        if self.event and raw.times is None:
            raise ValueError(f"{type(self).__name__}: event mode (event=true) needs timestamps, and this data has "
                             "none. HINT: set data.event=false, or give the data its timestamps.")
        if self.event:
            check_times(type(self).__name__, raw.times)
        train_values, val_values = zip(*(split_by_time(v, self.val_fraction) for v in raw.values), strict=True)
        for split, values in (("training", train_values), ("validation", val_values)):
            self._check_split_length(split, values)  # before any statistic of an empty split
        stacked = np.concatenate(train_values, axis=0)
        self.mean = stacked.mean(axis=0)
        self.std = self._scales(stacked)
        normalise = lambda parts: [(p - self.mean) / self.std for p in parts]
        train_dts = val_dts = None
        if self.event:
            gaps = [gaps_from_times(t) for t in raw.times]
            unit = self.dt_unit or float(np.median(np.concatenate([split_by_time(g, self.val_fraction)[0]
                                                                  for g in gaps])))
            train_dts, val_dts = zip(*(split_by_time(g / unit, self.val_fraction) for g in gaps), strict=True)
        self.train_dataset = self._windows(normalise(train_values), train_dts, self.stride)
        self.val_dataset = self._windows(normalise(val_values), val_dts, self.val_stride, self.val_cover_end)

    def _scales(self, train: np.ndarray) -> np.ndarray:
        """Per-channel standard deviations of the training samples (N, H); 1 for a channel constant there."""
        std = train.std(axis=0)
        # a floor like 1e-8 would scale a channel that only moves in validation (a flag, a step) to ~1e8
        constant = np.ptp(train, axis=0) == 0  # exactly: a small move around a large value still scales
        if constant.any():
            names = getattr(self, "columns", None) or [f"channel {i}" for i in range(train.shape[1])]
            which = ", ".join(str(names[i]) for i in np.flatnonzero(constant))
            rank_zero_warn(f"{type(self).__name__}: {which} {'is' if constant.sum() == 1 else 'are'} constant over "
                           "the training split, so the model cannot learn how it moves; it is centred but not "
                           "scaled. HINT: drop constant channels (data.columns), or change data.val_fraction.")
        return np.where(constant, 1.0, std)

    def _check_split_length(self, split: str, values) -> None:
        """Raise unless some series of the split holds one whole window (then `_windows` makes at least one)."""
        longest = max(v.shape[0] for v in values)
        if longest >= self.context_length + self.horizon:
            return
        raise ValueError(
            f"{type(self).__name__}: the {split} split has at most {longest} samples per series, fewer than one "
            f"window of context_length + horizon = {self.context_length} + {self.horizon} = "
            f"{self.context_length + self.horizon}. HINT: lower data.context_length / data.horizon (and "
            "generation.context / generation.horizon with them), or change data.val_fraction.")

    def _windows(self, values, dts, stride: int, cover_end: bool = False) -> SeriesWindows:
        return SeriesWindows(values, dts, self.context_length, self.horizon, stride, cover_end)

    @override
    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        replaced = getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)
        if self.shuffle_seed is not None and trainer is not None and trainer.world_size > 1 and replaced:
            rank_zero_warn(f"{type(self).__name__}: shuffle_seed={self.shuffle_seed} has no effect with "
                           f"{trainer.world_size} processes: Lightning's DistributedSampler orders the training "
                           "windows by the run's seed and the epoch. HINT: set seed to vary the order.")
        seed = torch.initial_seed() if self.shuffle_seed is None else self.shuffle_seed
        sampler = EpochShuffle(self.train_dataset, seed)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                           num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
