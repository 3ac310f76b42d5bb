"""Datamodules that yield windows (context, future[, dt]) for training and rollouts.

`DATAMODULES` maps the names used by the Hydra config group `data/` to their classes.
"""

from lrnn_lightning.data.base import RawSeries, WindowDataModule
from lrnn_lightning.data.csv_file import CsvDataModule
from lrnn_lightning.data.lorenz import LorenzDataModule
from lrnn_lightning.data.oscillators import OscillatorsDataModule
from lrnn_lightning.data.sampling import EpochShuffle
from lrnn_lightning.data.sunspots import SunspotsDataModule
from lrnn_lightning.data.windows import SeriesWindows

DATAMODULES: dict[str, type[WindowDataModule]] = {
    "oscillators": OscillatorsDataModule,
    "lorenz": LorenzDataModule,
    "sunspots": SunspotsDataModule,
    "csv": CsvDataModule,
}

__all__ = ["DATAMODULES", "CsvDataModule", "EpochShuffle", "LorenzDataModule", "OscillatorsDataModule", "RawSeries",
           "SeriesWindows", "SunspotsDataModule", "WindowDataModule"]
