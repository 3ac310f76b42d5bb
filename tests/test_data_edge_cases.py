"""Data that used to go silently wrong or fail unclearly: a channel constant in training, stray text in a CSV,
a written-out index, a header-only file, daylight-saving offsets, an empty training split, shuffle seeds."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from lrnn_lightning.data import CsvDataModule
from lrnn_lightning.data.sampling import EpochShuffle

WINDOW = dict(context_length=4, horizon=2, val_fraction=0.2)


def write(tmp_path, frame: pd.DataFrame, **options) -> str:
    path = tmp_path / "series.csv"
    frame.to_csv(path, **{"index": False, **options})
    return str(path)


def test_a_channel_constant_in_training_is_centred_not_blown_up(tmp_path):
    rng = np.random.default_rng(0)
    flag = np.r_[np.zeros(48), np.ones(12)]  # moves only in the validation split
    path = write(tmp_path, pd.DataFrame({"x": rng.normal(size=60), "flag": flag}))
    dm = CsvDataModule(path=path, **WINDOW)
    with pytest.warns(UserWarning, match=r"CsvDataModule: flag is constant over the training split.*HINT"):
        dm.setup("fit")
    future = dm.val_dataset[len(dm.val_dataset) - 1]["future"]
    assert float(future[:, 1].abs().max()) == pytest.approx(1.0)  # its raw step, not 1e8
    assert dm.std[1] == 1.0
    assert 0.5 < dm.std[0] < 2.0  # the moving channel is scaled as before


def test_a_tiny_but_moving_channel_is_still_scaled(tmp_path):
    rng = np.random.default_rng(1)
    path = write(tmp_path, pd.DataFrame({"x": 1e-9 * rng.normal(size=60)}))
    dm = CsvDataModule(path=path, **WINDOW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no constant-channel warning
        dm.setup("fit")
    assert dm.std[0] == pytest.approx(float(np.std(pd.read_csv(path)["x"].to_numpy()[:48])))


def test_a_mostly_numeric_column_with_a_stray_token_is_named_not_dropped(tmp_path):
    values = np.round(np.sin(np.arange(60)), 3).astype(object)
    values[7] = "?"
    path = write(tmp_path, pd.DataFrame({"x": np.cos(np.arange(60)), "a": values}))
    with pytest.raises(ValueError, match=r"column 'a' is mostly numbers but not at row 7 \(file line 9\), "
                                         r"e\.g\. '\?'\. HINT"):
        CsvDataModule(path=path, **WINDOW).setup("fit")


def test_a_written_out_index_and_text_columns_are_skipped_and_said(tmp_path, caplog):
    frame = pd.DataFrame({"x": np.cos(np.arange(60)), "site": ["a"] * 60})
    path = write(tmp_path, frame, index=True)  # adds "Unnamed: 0", a 0..59 ramp
    dm = CsvDataModule(path=path, **WINDOW)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert dm.columns == ["x"] and dm.num_channels == 1
    assert "value columns x; skipped 'Unnamed: 0' (an index written with the file), 'site' (text)" in caplog.text


def test_a_header_only_file_is_named(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("t,x\n")
    with pytest.raises(ValueError, match=r"has a header but no data rows"):
        CsvDataModule(path=str(path), timestamp_column="t", event=True, **WINDOW).setup("fit")


def test_timestamps_across_a_daylight_saving_change_are_one_time_axis(tmp_path):
    times = pd.date_range("2026-03-29 00:00", periods=60, freq="15min", tz="Europe/Berlin")
    stamps = [t.isoformat() for t in times]  # +01:00, then +02:00 after 02:00
    assert {s[-6:] for s in stamps} == {"+01:00", "+02:00"}
    path = write(tmp_path, pd.DataFrame({"t": stamps, "x": np.sin(np.arange(60))}))
    dm = CsvDataModule(path=path, timestamp_column="t", event=True, **WINDOW)
    dm.setup("fit")
    dt = dm.train_dataset[0]["dt"]
    assert np.allclose(dt.numpy(), 1.0)  # every gap is the median 15 minutes


def test_numeric_timestamps_with_a_stray_token_name_its_row(tmp_path):
    stamps = np.arange(60).astype(object)
    stamps[10] = "-"
    path = write(tmp_path, pd.DataFrame({"t": stamps, "x": np.sin(np.arange(60))}))
    with pytest.raises(ValueError, match=r"timestamp column 't' has missing, non-numeric or infinite values at "
                                         r"row 10 \(file line 12\), e\.g\. '-'"):
        CsvDataModule(path=path, timestamp_column="t", event=True, **WINDOW).setup("fit")


def test_an_empty_training_split_fails_clearly_without_numpy_warnings(tmp_path):
    path = write(tmp_path, pd.DataFrame({"x": np.sin(np.arange(30))}))
    dm = CsvDataModule(path=path, context_length=4, horizon=2, val_fraction=0.96)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Mean of empty slice" and the like would raise here first
        with pytest.raises(ValueError, match=r"the training split has at most 1 samples per series, fewer than one "
                                             r"window of context_length \+ horizon = 4 \+ 2 = 6"):
            dm.setup("fit")


def test_shuffle_orders_of_neighbouring_seeds_do_not_repeat_a_shifted_epoch():
    def order(seed, epoch):
        sampler = EpochShuffle(range(50), seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) != order(1, 0) and order(3, 2) != order(5, 0)
    assert order(0, 1) == order(0, 1) and sorted(order(7, 4)) == list(range(50))


def test_a_shuffle_seed_that_ddp_ignores_is_said(tmp_path):
    from types import SimpleNamespace

    path = write(tmp_path, pd.DataFrame({"x": np.sin(np.arange(60))}))
    dm = CsvDataModule(path=path, shuffle_seed=123, **WINDOW)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2)  # what Lightning sets before asking for the loader
    with pytest.warns(UserWarning, match=r"shuffle_seed=123 has no effect with 2 processes.*HINT: set seed"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.train_dataloader()


def test_a_small_move_around_a_large_value_is_still_scaled(tmp_path):
    rng = np.random.default_rng(2)
    path = write(tmp_path, pd.DataFrame({"p": 1e6 + 0.05 * rng.normal(size=60)}))
    dm = CsvDataModule(path=path, **WINDOW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not "constant"
        dm.setup("fit")
    assert 0.02 < dm.std[0] < 0.1
    assert 0.3 < float(dm.train_dataset[0]["context"].std()) < 3.0  # unit scale, not +-0.05


def test_no_shuffle_seed_warning_when_lightning_keeps_the_sampler(tmp_path):
    from types import SimpleNamespace

    path = write(tmp_path, pd.DataFrame({"x": np.sin(np.arange(60))}))
    dm = CsvDataModule(path=path, shuffle_seed=123, **WINDOW)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # use_distributed_sampler=False: EpochShuffle, and its seed, stay
        dm.train_dataloader()


def test_a_time_column_taken_as_a_channel_is_said(tmp_path):
    rng = np.random.default_rng(3)
    path = write(tmp_path, pd.DataFrame({"time": 0.5 * np.arange(60), "x": rng.normal(size=60)}))
    dm = CsvDataModule(path=path, **WINDOW)
    with pytest.warns(UserWarning, match=r"column 'time' increases at every row, like a time or an index, and is "
                                         r"used as a channel.*HINT: data.timestamp_column=time"):
        dm.setup("fit")
    assert dm.columns == ["time", "x"]  # still as asked: only said
    declared = CsvDataModule(path=path, timestamp_column="time", **WINDOW)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declared.setup("fit")
    assert declared.columns == ["x"]
