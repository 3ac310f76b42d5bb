"""Datamodules: windows, time splits, normalisation, event-mode dt, and the data's own errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lrnn_lightning.data import (
    CsvDataModule,
    LorenzDataModule,
    OscillatorsDataModule,
    SeriesWindows,
    SunspotsDataModule,
)
from lrnn_lightning.data.ode import integrate_sampled, rk4_step

SMALL = dict(num_series=2, num_samples=300, context_length=16, horizon=24, stride=8, val_stride=8)


def test_windows_are_consecutive_slices_of_the_series():
    rng = np.random.default_rng(0)
    series = [rng.normal(size=(50, 2)), rng.normal(size=(40, 2))]
    dts = [rng.uniform(0.5, 1.5, 50), rng.uniform(0.5, 1.5, 40)]
    windows = SeriesWindows(series, dts, context_length=6, horizon=4, stride=3)
    assert len(windows) == len(range(0, 41, 3)) + len(range(0, 31, 3))
    last = windows[len(windows) - 1]  # series 1, start 30
    np.testing.assert_allclose(last["context"].numpy(), series[1][30:36], rtol=1e-6)
    np.testing.assert_allclose(last["future"].numpy(), series[1][36:40], rtol=1e-6)
    np.testing.assert_allclose(last["dt"].numpy(), dts[1][30:40], rtol=1e-6)
    assert "dt" not in SeriesWindows(series, None, 6, 4)[0]


def test_cover_end_adds_the_window_ending_at_each_series_last_sample_after_the_grid():
    rng = np.random.default_rng(5)
    # windows of 10 every 3 samples: 23 samples end their grid at 21, 22 at 21 (covered), 7 hold no window
    series = [rng.normal(size=(23, 2)), rng.normal(size=(22, 2)), rng.normal(size=(7, 2))]
    dts = [rng.uniform(0.5, 1.5, len(s)) for s in series]
    grid = SeriesWindows(series, dts, context_length=6, horizon=4, stride=3)
    covered = SeriesWindows(series, dts, context_length=6, horizon=4, stride=3, cover_end=True)
    assert len(grid) == 5 + 5 and len(covered) == len(grid) + 1
    for k in range(len(grid)):  # the grid's windows keep their numbers
        torch.testing.assert_close(covered[k]["future"], grid[k]["future"])
    end = covered[len(grid)]
    np.testing.assert_allclose(end["context"].numpy(), series[0][13:19], rtol=1e-6)
    np.testing.assert_allclose(end["future"].numpy(), series[0][19:23], rtol=1e-6)
    np.testing.assert_allclose(end["dt"].numpy(), dts[0][13:23], rtol=1e-6)


def test_validation_scores_the_last_samples_unless_told_not_to():
    options = dict(SMALL, val_stride=7)  # 60 validation samples, windows of 40: starts 0, 7, 14 miss the end
    covered, grid = OscillatorsDataModule(**options), OscillatorsDataModule(val_cover_end=False, **options)
    for dm in (covered, grid):
        dm.setup()
    val = covered.val_dataset.series[0]
    assert val.shape[0] == 60 and len(covered.val_dataset) == len(grid.val_dataset) + 2
    torch.testing.assert_close(covered.val_dataset[len(grid.val_dataset)]["future"], val[-24:])
    assert all(not torch.equal(grid.val_dataset[k]["future"][-1], val[-1]) for k in range(len(grid.val_dataset)))
    assert len(covered.train_dataset) == len(grid.train_dataset)  # training keeps its grid
    with pytest.raises(ValueError, match=r"val_cover_end must be true or false, got 'yes'"):
        OscillatorsDataModule(val_cover_end="yes", **options)


def test_rk4_is_fourth_order_on_a_known_solution():
    rhs = lambda t, y: -y  # y(t) = exp(-t)
    errors = []
    for h in (0.2, 0.1):
        y, t = np.ones((1, 1)), np.zeros((1, 1))
        for _ in range(int(round(1 / h))):
            y = rk4_step(rhs, t, y, np.full((1, 1), h))
            t = t + h
        errors.append(abs(y[0, 0] - np.exp(-1.0)))
    assert 12 < errors[0] / errors[1] < 20  # halving h divides the error by about 2^4


def test_oscillators_are_seeded_and_normalised_by_the_training_split():
    a, b, c = (OscillatorsDataModule(seed=s, **SMALL) for s in (3, 3, 4))
    for dm in (a, b, c):
        dm.setup()
    torch.testing.assert_close(a.val_dataset[1]["future"], b.val_dataset[1]["future"])
    assert not torch.allclose(a.val_dataset[1]["future"], c.val_dataset[1]["future"])
    train = torch.cat([torch.cat([w["context"], w["future"]]) for w in a.train_dataset])
    assert a.num_channels == 3 and train.shape[1] == 3
    assert train.abs().max() < 10 and 0.5 < float(train.std()) < 1.5
    assert "dt" not in a.val_dataset[0]


def test_oscillator_event_mode_has_irregular_gaps_around_one():
    dm = OscillatorsDataModule(event=True, dt_jitter=0.5, **SMALL)
    dm.setup()
    dt = torch.cat([w["dt"] for w in dm.train_dataset])
    assert dt.min() >= 0.45 and dt.max() <= 1.55 and dt.std() > 0.1
    assert abs(float(dt.median()) - 1.0) < 0.05


def test_lorenz_event_dt_is_the_true_gap_between_samples():
    """Integrating the system from one sample over dt[t] must land on the next sample."""
    dm = LorenzDataModule(event=True, dt_unit=1.0, sample_dt=0.02, **SMALL)
    dm.setup()
    window = dm.val_dataset[3]
    values = torch.cat([window["context"], window["future"]]).double().numpy() * dm.std + dm.mean
    gaps = window["dt"].double().numpy()
    assert 0.009 < gaps.min() and gaps.max() < 0.031 and gaps.std() > 1e-3
    for t in (0, 10, 30):
        _, states = integrate_sampled(dm.rhs, values[t:t + 1], gaps[None, t:t + 1], substeps=8)
        # float32 storage of the window limits the agreement, not the integrator
        np.testing.assert_allclose(states[0, -1], values[t + 1], rtol=1e-4, atol=1e-3)


def test_lorenz_regular_sampling_stays_on_the_attractor():
    dm = LorenzDataModule(**SMALL)
    dm.setup()
    raw = torch.cat([dm.val_dataset[0]["context"], dm.val_dataset[0]["future"]]).double().numpy() * dm.std + dm.mean
    assert 5 < raw[:, 2].mean() < 45 and np.abs(raw[:, :2]).max() < 30  # z around 25, bounded x, y


def test_sunspots_is_the_yearly_statsmodels_series_split_by_time():
    dm = SunspotsDataModule(context_length=32, horizon=16)
    dm.setup()
    assert dm.num_channels == 1
    train_values = dm.train_dataset.series[0]
    val_values = dm.val_dataset.series[0]
    assert train_values.shape[0] + val_values.shape[0] == 309  # 1700..2008, one value a year
    assert val_values.shape[0] == 77  # the last quarter: 1932..2008
    assert abs(float(train_values.mean())) < 1e-5 and abs(float(train_values.std(unbiased=False)) - 1) < 1e-4
    event = SunspotsDataModule(context_length=32, horizon=16, event=True, dt_unit=1.0)
    event.setup()
    torch.testing.assert_close(event.val_dataset[0]["dt"], torch.ones(48))


def test_windows_longer_than_a_split_are_an_error_with_a_hint():
    with pytest.raises(ValueError, match=r"validation split has at most 77 samples.*32 \+ 64 = 96.*HINT"):
        SunspotsDataModule(context_length=32, horizon=64).setup()


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "8"])
def test_batch_size_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {value!r}"):
        OscillatorsDataModule(batch_size=value)


def _write(tmp_path, text: str):
    path = tmp_path / "series.csv"
    path.write_text(text)
    return path


def test_csv_reads_columns_and_derives_dt_from_dates(tmp_path):
    times = [0, 1, 2, 4, 5, 7, 8, 9, 11, 12]  # irregular hours
    rows = ["time,load,temp,label"] + [f"2024-01-01 {t:02d}:00:00,{k * 0.5},{np.sin(k)},x" for k, t in
                                       enumerate(times)]
    dm = CsvDataModule(path=_write(tmp_path, "\n".join(rows)), columns=["load", "temp"], timestamp_column="time",
                       event=True, context_length=3, horizon=2, val_fraction=0.5, dt_unit=3600.0)
    dm.setup()
    assert dm.num_channels == 2
    np.testing.assert_allclose(dm.train_dataset[0]["dt"].numpy(), [1, 1, 2, 1, 2])
    load = torch.cat([dm.train_dataset[0]["context"], dm.train_dataset[0]["future"]])[:, 0]
    np.testing.assert_allclose(np.diff(load.numpy()), np.full(4, 0.5 / dm.std[0]), rtol=1e-5)


def test_csv_without_columns_takes_every_numeric_column(tmp_path):
    dm = CsvDataModule(path=_write(tmp_path, "t,a,name,b\n" + "\n".join(f"{k},{k},n,{-k}" for k in range(40))),
                       timestamp_column="t", context_length=4, horizon=2)
    assert dm.num_channels == 2 and dm.columns == ["a", "b"]


def test_csv_missing_column_lists_the_available_ones(tmp_path):
    dm = CsvDataModule(path=_write(tmp_path, "time,load,temp\n0,1,2\n"), columns=["load", "pressure"])
    with pytest.raises(ValueError, match=r"'pressure' not in .*Available columns: time, load, temp"):
        dm.setup()


def test_csv_nan_names_the_rows(tmp_path):
    text = "a,b\n" + "\n".join(f"{k},{'' if k in (5, 9) else k}" for k in range(30))
    dm = CsvDataModule(path=_write(tmp_path, text), columns=["a", "b"])
    with pytest.raises(ValueError, match=r"column 'b' has 2 missing value\(s\) \(NaN\) at rows 5, 9 "
                                         r"\(file lines 7, 11\)"):
        dm.setup()


def test_csv_non_increasing_timestamps_say_where(tmp_path):
    times = [0, 1, 2, 3, 3, 5, 4, 7] + list(range(8, 40))
    dm = CsvDataModule(path=_write(tmp_path, "t,a\n" + "\n".join(f"{t},{k}" for k, t in enumerate(times))),
                       columns=["a"], timestamp_column="t")
    with pytest.raises(ValueError, match=r"strictly increasing, but rows 4, 6 .*first: row 4 has 3 after 3"):
        dm.setup()


def test_csv_errors_for_missing_path_and_event_without_timestamps(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path='.*nope.csv' does not exist"):
        CsvDataModule(path=tmp_path / "nope.csv", columns=["a"]).setup()
    with pytest.raises(ValueError, match=r"event mode .* needs timestamps.*data.timestamp_column"):
        CsvDataModule(path=tmp_path / "x.csv", columns=["a"], event=True)
    with pytest.raises(ValueError, match=r"data.path is required"):
        CsvDataModule(path=None)


def test_training_order_depends_only_on_the_seed_and_the_epoch():
    from lrnn_lightning.data import EpochShuffle

    dm = OscillatorsDataModule(shuffle_seed=3, batch_size=4, **SMALL)
    dm.setup()
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, EpochShuffle)  # a RandomSampler: DDP swaps in a DistributedSampler (seeded by epoch)
    orders = {}
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch + 100)  # the global random state plays no part
        orders.setdefault(epoch, []).append(list(sampler))
    assert orders[0][0] == orders[0][1] and orders[0][0] != orders[1][0]
    assert sorted(orders[1][0]) == list(range(len(dm.train_dataset)))
    fresh = OscillatorsDataModule(shuffle_seed=3, batch_size=4, **SMALL)
    fresh.setup()
    fresh_sampler = fresh.train_dataloader().sampler
    fresh_sampler.set_epoch(1)
    assert list(fresh_sampler) == orders[1][0]  # a resumed run sees the same order at the same epoch
