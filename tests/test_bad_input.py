"""Bad input across the plugin: each is an error that names the bad value and says what to do.

Covered elsewhere (by message): unknown config names and mixer names (test_configs.py),
horizon / context longer than the windows and event mode without dt (test_callback.py,
test_configs.py), batch sizes (test_callback.py, test_data.py, test_configs.py),
cuda_graph=true without CUDA (test_callback.py, test_configs.py), CSV missing columns,
NaNs and non-increasing timestamps (test_data.py). This file adds the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lrnn_lightning.callbacks import RolloutCallback
from lrnn_lightning.data import CsvDataModule, OscillatorsDataModule, RawSeries, WindowDataModule
from lrnn_lightning.models import build_model
from lrnn_lightning.module import NextStepModule
from tests.helpers import subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[1]



class Given(WindowDataModule):
    """Data from arrays handed in by the test."""

    def __init__(self, values, times=None, **kwargs):
        super().__init__(context_length=4, horizon=3, **kwargs)
        self.raw = RawSeries(values=values, times=times)

    @property
    def num_channels(self) -> int:
        return self.raw.values[0].shape[1]

    def load_series(self) -> RawSeries:
        return self.raw


def series(n: int = 60) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 2))


# -- data ----------------------------------------------------------------------------------------

def test_event_mode_on_data_without_timestamps():
    with pytest.raises(ValueError, match=r"Given: event mode \(event=true\) needs timestamps, and this data has none"
                                         r"\. HINT: set data.event=false"):
        Given([series()], times=None, event=True).setup()
    Given([series()], times=None, event=False).setup()  # fine without event mode


@pytest.mark.parametrize(("bad", "message"), [
    (float("nan"), r"timestamp nan of series 1 at sample 7 is not finite\. HINT"),
    (float("inf"), r"timestamp inf of series 1 at sample 7 is not finite"),
    (6.0, r"timestamps of series 1 must be strictly increasing, but sample 7 has 6\.0 after 6\.0, which would give "
          r"dt <= 0\. HINT: sort"),
    (2.5, r"sample 7 has 2\.5 after 6\.0"),
])
def test_timestamps_that_would_give_a_bad_dt(bad, message):
    times = np.arange(60.0)
    broken = times.copy()
    broken[7] = bad
    with pytest.raises(ValueError, match=message):
        Given([series(), series()], times=[times, broken], event=True).setup()


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), "hours"])
def test_dt_unit_must_be_positive_and_finite(value):
    with pytest.raises(ValueError, match=rf"dt_unit must be a positive, finite number \(or None for the median gap\), "
                                         rf"got {value!r}\. HINT"):
        OscillatorsDataModule(dt_unit=value)


@pytest.mark.parametrize("value", [1.5, "3", True])
def test_shuffle_seed_must_be_an_integer(value):
    with pytest.raises(ValueError, match=rf"shuffle_seed must be an integer or None, got {value!r}"):
        OscillatorsDataModule(shuffle_seed=value)


def test_csv_with_infinite_timestamps_or_values(tmp_path):
    path = tmp_path / "series.csv"
    path.write_text("t,a\n" + "\n".join(f"{'inf' if k == 9 else k},{k}" for k in range(40)))
    with pytest.raises(ValueError, match=r"timestamp column 't' has missing, non-numeric or infinite values at "
                                         r"row 9 \(file line 11\), e\.g\. inf\. HINT"):
        CsvDataModule(path=path, columns=["a"], timestamp_column="t", event=True, context_length=4, horizon=2).setup()
    path.write_text("t,a\n" + "\n".join(f"{k},{'-inf' if k == 12 else k}" for k in range(40)))
    with pytest.raises(ValueError, match=r"column 'a' has an infinite value at row 12 \(file line 14\)"):
        CsvDataModule(path=path, columns=["a"], context_length=4, horizon=2).setup()


# -- the callback ----------------------------------------------------------------------------------

class NoStepModel(nn.Module):
    """A sequence model with `forward` only."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x, dt=None):
        return self.linear(x)


def trainer_for(tmp_path, callback) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback], default_root_dir=tmp_path)


def test_a_model_without_the_step_protocol(tmp_path):
    module = NextStepModule(NoStepModel(), partial(torch.optim.SGD, lr=0.1))
    data = OscillatorsDataModule(num_series=2, num_samples=300, context_length=16, horizon=24)
    with pytest.raises(ValueError, match=r"RolloutCallback: NextStepModule has no model implementing the step "
                                         r"protocol \(allocate_state, step, prefill\)\. HINT: keep it as `self.model`"):
        trainer_for(tmp_path, RolloutCallback(num_sequences=2)).fit(module, datamodule=data)


class WindowsWithDt(Dataset):
    def __init__(self, bad_window: int, bad_value: float):
        self.bad_window, self.bad_value = bad_window, bad_value

    def __len__(self):
        return 6

    def __getitem__(self, i):
        dt = torch.ones(12)
        if i == self.bad_window:
            dt[9] = self.bad_value
        return {"context": torch.randn(8, 3), "future": torch.randn(4, 3), "dt": dt}


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_windows_with_a_bad_dt_are_named(tmp_path, bad):
    module = NextStepModule(build_model("lru", d_input=3, d_model=8, d_state=4, n_layers=1),
                            partial(torch.optim.SGD, lr=0.1))
    loader = DataLoader(WindowsWithDt(bad_window=4, bad_value=bad), batch_size=6)
    with pytest.raises(ValueError, match=rf"RolloutCallback: validation window 4 has dt={bad!r} at step 9; event "
                                         r"timesteps must be finite and positive\. HINT"):
        trainer_for(tmp_path, RolloutCallback(num_sequences=6, event_mode=True)).validate(module, loader)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(on_capture_error="ignore"), r"on_capture_error must be 'fallback' or 'raise', got 'ignore'\. HINT"),
    (dict(divergence_threshold=0.4), r"divergence_threshold must be a finite number above threshold=0\.5, got 0\.4"),
    (dict(divergence_threshold=float("inf")), r"divergence_threshold must be a finite number .* got inf\. HINT"),
    (dict(threshold=float("nan")), r"threshold must be a positive number, got nan"),
    (dict(num_sequences=0), r"num_sequences must be a positive integer, got 0\. HINT"),
])
def test_bad_callback_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCallback(**kwargs)


# -- the command line ------------------------------------------------------------------------------

def test_train_py_with_an_unknown_model_lists_the_valid_ones(tmp_path):
    env = {**os.environ, "PYTHONPATH": subprocess_pythonpath(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=transformer"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert "Could not find 'model/transformer'" in message
    assert all(f"\t{name}\n" in message for name in ("lru", "mamba", "rglru", "s4d", "s5")), message
