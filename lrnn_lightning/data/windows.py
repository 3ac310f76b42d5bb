"""Fixed-length windows over time series: the unit every datamodule yields.

A window is a dict of float32 tensors:

    context  (C, H)   the history a rollout starts from
    future   (T, H)   the truth the rollout is scored against
    dt       (C + T,) only in event mode: dt[t] is the gap from sample t to sample t + 1

Training concatenates context and future and predicts each next step; a rollout
prefills the context and generates the future.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class SeriesWindows(Dataset):
    """All windows of `context_length + horizon` consecutive samples, every `stride` samples from each series'
    first sample; with `cover_end`, also (numbered after them) one that ends at each series' last sample where
    that grid misses it (else the last (N_i - C - T) mod stride samples of a series end no window).

    Args:
        series: one array (N_i, H) per independent series.
        dts: one array (N_i,) of per-sample gaps per series, or None (no event mode).
        context_length: C, samples in a window's context.
        horizon: T, samples in a window's future.
        stride: distance between the starts of consecutive windows.
        cover_end: add, for every series that holds a window, the window that ends at its last sample.

    Example:
        >>> windows = SeriesWindows([np.random.randn(100, 2)], None, context_length=16, horizon=8)
        >>> windows[0]["context"].shape, windows[0]["future"].shape
        (torch.Size([16, 2]), torch.Size([8, 2]))
    """

    def __init__(self, series: Sequence[np.ndarray], dts: Sequence[np.ndarray] | None, context_length: int,
                 horizon: int, stride: int = 1, cover_end: bool = False):
        if dts is not None and len(dts) != len(series):
            raise ValueError(f"SeriesWindows: got {len(series)} series but {len(dts)} dt arrays.")
        self.context_length, self.horizon = context_length, horizon
        self.series = [torch.as_tensor(np.asarray(s), dtype=torch.float32) for s in series]
        self.dts = None if dts is None else [torch.as_tensor(np.asarray(d), dtype=torch.float32) for d in dts]
        length = context_length + horizon
        self.index = [(i, start) for i, s in enumerate(self.series)
                      for start in range(0, s.shape[0] - length + 1, stride)]
        if cover_end:  # after the grid's windows, so that their numbers (a callback's checkpointed picks) stay
            self.index += [(i, s.shape[0] - length) for i, s in enumerate(self.series)
                           if s.shape[0] >= length and (s.shape[0] - length) % stride]

    @property
    def window_length(self) -> int:
        return self.context_length + self.horizon

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        i, start = self.index[idx]
        values = self.series[i][start:start + self.window_length]
        item = {"context": values[:self.context_length], "future": values[self.context_length:]}
        if self.dts is not None:
            item["dt"] = self.dts[i][start:start + self.window_length]
        return item


def gaps_from_times(times: np.ndarray) -> np.ndarray:
    """Per-sample gaps to the next sample; the last sample, which has none, repeats the gap before it."""
    gaps = np.diff(np.asarray(times, dtype=np.float64))
    return np.append(gaps, gaps[-1]) if gaps.size else np.ones(1)


def split_by_time(array: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The first `1 - val_fraction` of the samples for training, the rest for validation."""
    n_train = int(round(array.shape[0] * (1.0 - val_fraction)))
    return array[:n_train], array[n_train:]
