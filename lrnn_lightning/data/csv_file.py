"""`CsvDataModule`: a user's own time series from a CSV file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lrnn_lightning.data.base import RawSeries, WindowDataModule

_SHOWN = 5  # problem rows named in an error message


def _rows(positions: Sequence[int]) -> str:
    """'rows 3, 8 (file lines 5, 10)': 0-based data rows and the 1-based file lines (header is line 1)."""
    shown = [int(p) for p in positions[:_SHOWN]]
    more = f" and {len(positions) - _SHOWN} more" if len(positions) > _SHOWN else ""
    return (f"row{'s' if len(shown) > 1 else ''} {', '.join(map(str, shown))}{more} "
            f"(file line{'s' if len(shown) > 1 else ''} {', '.join(str(p + 2) for p in shown)})")


def _show(value) -> str:
    """repr of a cell, without NumPy's type wrapper (3, not np.int64(3))."""
    return repr(value.item() if hasattr(value, "item") else value)


class CsvDataModule(WindowDataModule):
    """Windows over the value columns of a CSV file, split by time (the last rows validate).

    Args:
        path: the CSV file (with a header row). A relative path is taken from the directory
            train.py is started in.
        columns: the value columns (channels); None takes every numeric column except
            the timestamp column.
        timestamp_column: optional column of strictly increasing times, numbers or dates.
            In event mode (`event=true`) dt is derived from it: the gap to the next row, in
            units of `dt_unit` (by default the median gap).
        **kwargs: the window options of `WindowDataModule`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a named column is missing (the message lists the available ones), a value
            is missing or not a number (the message names the rows), the timestamps do not
            strictly increase (the message names where), or `event=true` without a
            timestamp column.

    Example:
        >>> dm = CsvDataModule(path="my_series.csv", columns=["load", "temperature"],
        ...                    timestamp_column="time", event=True, context_length=48, horizon=24)
    """

    name = "csv"

    def __init__(self, path: str | Path | None = None, columns: Sequence[str] | str | None = None,
                 timestamp_column: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if path is None or str(path).strip() == "":
            raise ValueError("CsvDataModule: data.path is required. HINT: python train.py data=csv "
                             "data.path=/path/to/series.csv data.columns=[a,b].")
        self.path = Path(path).expanduser()
        self.columns = [columns] if isinstance(columns, str) else (None if columns is None else
                                                                     [str(c) for c in columns])
        if self.columns is not None and len(self.columns) == 0:
            raise ValueError("CsvDataModule: data.columns is empty. HINT: name at least one value column, "
                             "or set data.columns=null to use every numeric column.")
        self.timestamp_column = timestamp_column
        if self.event and timestamp_column is None:
            raise ValueError("CsvDataModule: event mode (data.event=true) needs timestamps, but "
                             "data.timestamp_column is not set. HINT: set data.timestamp_column=<your time "
                             "column>, or data.event=false.")
        self._frame = None

    def _read(self):
        if self._frame is None:
            import pandas as pd

            if not self.path.is_file():
                raise FileNotFoundError(
                    f"CsvDataModule: data.path={str(self.path)!r} does not exist (resolved to "
                    f"{self.path.resolve()}). HINT: relative paths are taken from the directory train.py runs in.")
            frame = pd.read_csv(self.path)
            if len(frame) == 0:
                raise ValueError(f"CsvDataModule: {self.path} has a header but no data rows. HINT: check the file; "
                                 "it needs at least context_length + horizon rows for each split.")
            wanted = list(self.columns or []) + ([self.timestamp_column] if self.timestamp_column else [])
            missing = [c for c in wanted if c not in frame.columns]
            if missing:
                raise ValueError(
                    f"CsvDataModule: column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} not in "
                    f"{self.path}. Available columns: {', '.join(map(str, frame.columns))}.")
            if self.columns is None:
                self.columns = self._numeric_columns(frame)
            self._frame = frame
        return self._frame

    def _numeric_columns(self, frame) -> list[str]:
        """The value columns when data.columns is not given: every numeric column but the timestamp and a
        written-out index ("Unnamed: 0"); a text column whose cells are mostly numbers is an error (a stray
        token would otherwise drop a channel silently)."""
        import pandas as pd

        chosen, skipped = [], []
        for column in frame.columns:
            if column == self.timestamp_column:
                continue
            if str(column).startswith("Unnamed: "):
                skipped.append(f"{column!r} (an index written with the file)")
                continue
            if pd.api.types.is_numeric_dtype(frame[column]):
                chosen.append(str(column))
                continue
            cells = frame[column].dropna()
            numeric = pd.to_numeric(cells, errors="coerce")
            if len(cells) and numeric.notna().mean() >= 0.5:
                bad = np.flatnonzero(numeric.isna().to_numpy())
                raise ValueError(f"CsvDataModule: column {column!r} is mostly numbers but not at "
                                 f"{_rows(cells.index[bad].to_numpy())}, e.g. {_show(cells.iloc[bad[0]])}. HINT: fix "
                                 "those cells, or name the value columns with data.columns.")
            skipped.append(f"{column!r} (text)")
        if not chosen:
            raise ValueError(f"CsvDataModule: {self.path} has no numeric column. Available columns: "
                             f"{', '.join(map(str, frame.columns))}. HINT: set data.columns.")
        ramps = [c for c in chosen if len(frame) > 2 and bool((np.diff(frame[c].to_numpy(dtype=np.float64)) > 0).all())]
        if ramps:  # a time or index column taken as a channel: validation would push it beyond anything trained on
            one = len(ramps) == 1
            rank_zero_warn(f"CsvDataModule: column{'' if one else 's'} {', '.join(map(repr, ramps))} "
                           f"{'increases' if one else 'increase'} at every row, like a time or an index, and "
                           f"{'is' if one else 'are'} used as {'a channel' if one else 'channels'}. HINT: "
                           f"data.timestamp_column={ramps[0]} if it is the time, or name the value columns with "
                           "data.columns.")
        rank_zero_info(f"CsvDataModule: value columns {', '.join(chosen)}"
                       + (f"; skipped {', '.join(skipped)}" if skipped else "") + " (data.columns picks them).")
        return chosen

    @property
    @override
    def num_channels(self) -> int:
        if self.columns is None:
            self._read()
        return len(self.columns)

    def _values(self, frame) -> np.ndarray:
        import pandas as pd

        for column in self.columns:
            numeric = pd.to_numeric(frame[column], errors="coerce")
            bad = np.flatnonzero(numeric.isna() & frame[column].notna())
            if bad.size:
                raise ValueError(f"CsvDataModule: column {column!r} is not numeric at {_rows(bad)}, e.g. "
                                 f"{_show(frame[column].iloc[bad[0]])}.")
            nans = np.flatnonzero(numeric.isna().to_numpy())
            if nans.size:
                raise ValueError(f"CsvDataModule: column {column!r} has {nans.size} missing value(s) (NaN) at "
                                 f"{_rows(nans)} of {self.path}. HINT: fill or drop them before training.")
        values = frame[self.columns].apply(pd.to_numeric).to_numpy(dtype=np.float64)
        rows, columns = np.nonzero(~np.isfinite(values))
        if rows.size:
            column = self.columns[int(columns[0])]
            raise ValueError(f"CsvDataModule: column {column!r} has an infinite value at {_rows(rows[:1])} of "
                             f"{self.path}. HINT: fix or drop the row before training.")
        return values

    def _times(self, frame) -> np.ndarray:
        import pandas as pd

        raw = frame[self.timestamp_column]
        as_numbers = pd.to_numeric(raw, errors="coerce")
        if pd.api.types.is_numeric_dtype(raw) or as_numbers.notna().mean() >= 0.5:
            # numbers (with perhaps a stray token, reported below by its row): not dates
            times = as_numbers.to_numpy(dtype=np.float64)
        else:
            try:  # utc: offsets that change within the file (daylight saving) are one time axis
                parsed = pd.to_datetime(raw, errors="coerce", utc=True)
            except (ValueError, TypeError) as error:
                raise ValueError(f"CsvDataModule: timestamp column {self.timestamp_column!r} could not be read as "
                                 f"dates: {error}. HINT: write ISO 8601 times, or numbers.") from error
            bad = np.flatnonzero(parsed.isna().to_numpy())
            if bad.size:
                raise ValueError(f"CsvDataModule: timestamp column {self.timestamp_column!r} has values that are "
                                 f"neither numbers nor dates at {_rows(bad)}, e.g. {_show(raw.iloc[bad[0]])}.")
            times = (parsed - parsed.iloc[0]).dt.total_seconds().to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(times))
        if bad.size:
            raise ValueError(f"CsvDataModule: timestamp column {self.timestamp_column!r} has missing, non-numeric "
                             f"or infinite values at {_rows(bad)}, e.g. {_show(raw.iloc[bad[0]])}. HINT: fill or drop "
                             "those rows; event mode derives dt from the gaps between timestamps.")
        bad = np.flatnonzero(np.diff(times) <= 0) + 1
        if bad.size:
            first = int(bad[0])
            raise ValueError(
                f"CsvDataModule: timestamps in column {self.timestamp_column!r} must be strictly increasing, but "
                f"{_rows(bad)} {'do' if bad.size > 1 else 'does'} not come after the row before; first: row "
                f"{first} has {_show(raw.iloc[first])} after {_show(raw.iloc[first - 1])}. HINT: sort the file by "
                "time and drop duplicate timestamps.")
        return times

    @override
    def load_series(self) -> RawSeries:
        frame = self._read()
        values = self._values(frame)
        times = self._times(frame) if self.timestamp_column else None
        return RawSeries(values=[values], times=None if times is None else [times])
