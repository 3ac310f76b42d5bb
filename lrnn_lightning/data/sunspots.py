"""`SunspotsDataModule`: the sunspot numbers that ship with statsmodels (no download)."""

from __future__ import annotations

import numpy as np
from typing_extensions import override

from lrnn_lightning.data.base import RawSeries, WindowDataModule


class SunspotsDataModule(WindowDataModule):
    """Yearly mean sunspot numbers, 1700 to 2008: 309 samples of one channel.

    This is the series statsmodels ships (`statsmodels.datasets.sunspots`), and it is
    YEARLY, not monthly, so it is short: with the defaults (`val_fraction=0.25`,
    `stride=1`) the years up to 1931 train and 1932 to 2008 validate. Values are
    normalised with the training years' mean and standard deviation. The solar cycle
    (about 11 years) makes a context of 32 years and a horizon of 16 years a sensible
    default. `event=true` is allowed and yields dt = 1 (one year) throughout.

    Example:
        >>> dm = SunspotsDataModule(context_length=32, horizon=16)
        >>> dm.setup()
        >>> len(dm.val_dataset) > 0
        True
    """

    name = "sunspots"

    def __init__(self, context_length: int = 32, horizon: int = 16, stride: int = 1,
                 val_fraction: float = 0.25, **kwargs):
        super().__init__(context_length=context_length, horizon=horizon, stride=stride,
                         val_fraction=val_fraction, **kwargs)

    @property
    @override
    def num_channels(self) -> int:
        return 1

    @override
    def load_series(self) -> RawSeries:
        from statsmodels.datasets import sunspots

        frame = sunspots.load_pandas().data
        values = frame["SUNACTIVITY"].to_numpy(dtype=np.float64)[:, None]
        return RawSeries(values=[values], times=[frame["YEAR"].to_numpy(dtype=np.float64)])
