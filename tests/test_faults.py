"""Faults the plugin survives: failed graph captures, diverging rollouts, interrupted runs,
long runs (memory), and W&B out of reach.

CPU tests simulate what only a GPU can do for real (a capture that fails, graph memory);
the `cuda` tests do it for real (`pytest -m cuda tests/test_faults.py`).
"""

from __future__ import annotations

import csv
import gc
import math
import os
import re
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import lrnn_lightning.callbacks.rollout as rollout_module
import lrnn_lightning.utils.wandb_setup as wandb_setup
from lrnn_lightning.callbacks import RolloutCallback
from lrnn_lightning.data import OscillatorsDataModule
from lrnn_lightning.models import build_model
from lrnn_lightning.module import NextStepModule
from lrnn_lightning.rollout import CaptureError, RolloutEngine, StepGraph, rollout_loop
from lrnn_lightning.rollout.metrics import channel_scale
from lrnn_lightning.utils.wandb_offline import read_offline_run
from lrnn_lightning.utils.wandb_setup import wandb_logger
from tests.helpers import record_callback_engines, subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[1]

TIMING = ("rollout/steps_per_second", "rollout/capture_ms")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and several threads on a shared 2-core machine spin for ages."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_data(**overrides) -> OscillatorsDataModule:
    options = dict(num_series=2, num_samples=300, context_length=16, horizon=24, stride=8, val_stride=8,
                   batch_size=16, shuffle_seed=5)
    return OscillatorsDataModule(**{**options, **overrides})


def tiny_module(seed: int = 0) -> NextStepModule:
    torch.manual_seed(seed)
    return NextStepModule(build_model("lru", d_input=3, d_model=16, d_state=8, n_layers=1),
                          partial(torch.optim.AdamW, lr=3e-3))


def tiny_trainer(tmp_path: Path, callbacks, logger=False, **overrides) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                   num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path, logger=logger)
    return pl.Trainer(callbacks=callbacks, **{**options, **overrides})


def rollout_rows(logger: CSVLogger) -> list[dict[str, float]]:
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(handle) if row["rollout/nrmse"]]


def loop_reference(module: NextStepModule, data: OscillatorsDataModule, indices: list[int], horizon: int = 24):
    windows = [data.val_dataset[i] for i in indices]
    context = torch.stack([w["context"] for w in windows])
    module.model.eval()
    with torch.no_grad():
        return rollout_loop(module.model, context, horizon)


class EagerGraphEngine(RolloutEngine):
    """The engine's graph path (static buffers, padding, reuse) with an eager StepGraph, so it runs on the CPU."""

    def _graph_wanted(self, device):
        return self.cuda_graph is not False and not self._fell_back

    def _make_graph(self, model, batch_size, width, **options):
        return StepGraph(model, batch_size, width, capture=False, **options)


# -- graph capture fails -------------------------------------------------------------------------

CAPTURE_FAILURES = {
    "uncapturable op": (RuntimeError("operation not permitted when stream is capturing"),
                        r"capturing the rollout graph for batch_size=3 failed \(RuntimeError: operation not "
                        r"permitted when stream is capturing\).*Falling back to the plain step loop"),
    "out of memory": (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                      r"out of GPU memory while capturing the rollout graph for batch_size=3.*HINT: pass a smaller "
                      r"batch_size.*Falling back to the plain step loop"),
}


@pytest.mark.parametrize("failure", list(CAPTURE_FAILURES))
def test_failed_capture_falls_back_to_the_loop_warns_once_and_training_goes_on(tmp_path, monkeypatch, failure):
    error, message = CAPTURE_FAILURES[failure]
    attempts = []

    class FailingCapture(EagerGraphEngine):
        def _make_graph(self, model, batch_size, width, **options):
            attempts.append(batch_size)
            raise error

    monkeypatch.setattr(rollout_module, "RolloutEngine", FailingCapture)
    callback = RolloutCallback(num_sequences=5, batch_size=3)
    module, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path, name="csv"), max_epochs=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)

    fallbacks = [w for w in caught if "capturing the rollout graph" in str(w.message)]
    assert len(fallbacks) == 1 and issubclass(fallbacks[0].category, RuntimeWarning)  # once, with the reason
    assert re.search(message, str(fallbacks[0].message), flags=re.S), str(fallbacks[0].message)
    assert attempts == [3]  # no second attempt on later validations
    assert trainer.global_step == 3 * 2 and trainer.current_epoch == 3  # every epoch trained
    rows = rollout_rows(trainer.logger)
    assert [row["rollout/uses_graph"] for row in rows] == [0.0, 0.0, 0.0]  # the path that ran is logged
    result = callback.last_result
    assert result.stats.path == "loop" and result.ranks[0].path == "loop"
    assert result.stats.fallback_reason.startswith("RolloutEngine: ")
    torch.testing.assert_close(result.prediction, loop_reference(module, data, result.indices))


def test_capture_failure_can_be_made_fatal(tmp_path, monkeypatch):
    class FailingCapture(EagerGraphEngine):
        def _make_graph(self, model, batch_size, width, **options):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(rollout_module, "RolloutEngine", FailingCapture)
    callback = RolloutCallback(num_sequences=2, on_capture_error="raise")
    with pytest.raises(CaptureError, match=r"not permitted when stream is capturing.*HINT"):
        tiny_trainer(tmp_path, [callback]).validate(tiny_module(), datamodule=tiny_data())


# -- a rollout diverges ----------------------------------------------------------------------------

class Gain(nn.Module):
    """Step protocol, stateless: every output is the input times `gain` (> 1 explodes, NaN poisons)."""

    d_input = d_output = 3

    def __init__(self, gain: float):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x, dt=None):
        return x * self.gain

    def allocate_state(self, batch_size, device, dtype):
        return {"unused": torch.zeros(batch_size, 1, device=device, dtype=dtype)}

    def prefill(self, x, dt=None):
        return x * self.gain, self.allocate_state(x.shape[0], x.device, x.dtype)

    def step(self, x_t, state, dt_t=None):
        return x_t * self.gain


def gain_module(gain: float) -> NextStepModule:
    return NextStepModule(Gain(gain), partial(torch.optim.SGD, lr=0.0))


def test_nan_rollouts_are_counted_and_every_metric_stays_finite(tmp_path):
    callback = RolloutCallback(num_sequences=4, divergence_threshold=50.0)
    data = tiny_data()
    trainer = tiny_trainer(tmp_path, [callback])
    with pytest.warns(UserWarning, match=r"4 of 4 rolled-out sequences diverged at epoch 0 \(the first at horizon "
                                         r"step 0\): NaN/Inf or more than divergence_threshold=50.*HINT"):
        trainer.validate(gain_module(float("nan")), datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("rollout/")}
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["rollout/diverged_fraction"] == 1.0 and metrics["rollout/first_diverged_step"] == 0.0
    # from the diverged step on, every channel counts as 50 of its scales off
    assert metrics["rollout/nrmse"] == pytest.approx(50.0) and metrics["rollout/nrmse_final"] == pytest.approx(50.0)
    windows = [data.val_dataset[i] for i in callback.indices]
    scale = channel_scale(torch.stack([torch.cat([w["context"], w["future"]]) for w in windows]))
    assert metrics["rollout/mse"] == pytest.approx(float((50.0 * scale).pow(2).mean()), rel=1e-5)
    assert metrics["rollout/valid_steps"] == 0.0 and metrics["rollout/skill"] < 0
    assert metrics["rollout/persistence_nrmse"] < 5  # the baseline is untouched


def test_exploding_rollouts_are_counted_at_their_first_diverged_step(tmp_path):
    gain, limit = 1.05, 3.0
    callback = RolloutCallback(num_sequences=6, divergence_threshold=limit)
    data = tiny_data()
    trainer = tiny_trainer(tmp_path, [callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.validate(gain_module(gain), datamodule=data)

    # independently: out[k] = context[-1] * gain^(k+1); diverged where any channel is > limit scales off
    windows = [data.val_dataset[i] for i in callback.indices]
    context = torch.stack([w["context"] for w in windows]).double().numpy()
    future = torch.stack([w["future"] for w in windows]).double().numpy()
    scale = np.concatenate([context, future], axis=1).reshape(-1, 3).std(axis=0)
    prediction = context[:, -1:, :] * gain ** np.arange(1, 25)[None, :, None]
    off = (np.abs(prediction - future) / scale > limit).any(axis=2)
    expected = np.where(off.any(axis=1), off.argmax(axis=1), 24)
    assert 0 < (expected < 24).sum() < len(expected)  # some diverge, some do not

    result = callback.last_result
    assert result.sequences.diverged_at.tolist() == expected.tolist()
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/diverged_fraction"]) == pytest.approx((expected < 24).mean())
    assert float(metrics["rollout/first_diverged_step"]) == expected.min()
    assert all(math.isfinite(float(v)) for k, v in metrics.items() if k.startswith("rollout/"))


def test_training_goes_on_when_every_rollout_is_nan(tmp_path):
    callback = RolloutCallback(num_sequences=3)
    trainer = tiny_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path, name="csv"), max_epochs=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(gain_module(float("nan")), datamodule=tiny_data())
    assert trainer.global_step == 4 and trainer.state.finished
    rows = rollout_rows(trainer.logger)
    assert [row["rollout/diverged_fraction"] for row in rows] == [1.0, 1.0]
    assert all(math.isfinite(v) for row in rows for k, v in row.items() if k.startswith("rollout/"))
    assert math.isnan(rows[-1]["val/loss"])  # the model itself is broken, the rollout report is not


# -- interrupted and resumed -----------------------------------------------------------------------

class Recorder(RolloutCallback):
    """Remembers (epoch, indices, scalars) of every rollout."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def on_validation_epoch_end(self, trainer, pl_module):
        super().on_validation_epoch_end(trainer, pl_module)
        if self._engine is not None:
            result = self.last_result
            self.seen.append((result.epoch, list(result.indices), result.scalars(self.prefix)))


class Crash(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("simulated crash")


def test_a_crashed_run_resumed_from_its_checkpoint_continues_as_if_uninterrupted(tmp_path):
    options = dict(num_sequences=3, every_n_epochs=2)
    uninterrupted = Recorder(seed=1, **options)
    tiny_trainer(tmp_path / "a", [uninterrupted], max_epochs=6).fit(tiny_module(), datamodule=tiny_data())

    first = Recorder(seed=1, **options)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_trainer(tmp_path / "b", [first, checkpoint, Crash(epoch=3)], max_epochs=6,
                     enable_checkpointing=True).fit(tiny_module(), datamodule=tiny_data())
    # resumed with other settings on purpose: the checkpoint's subset and seed win
    resumed = Recorder(seed=7, **options)
    tiny_trainer(tmp_path / "c", [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                 max_epochs=6, enable_checkpointing=True).fit(tiny_module(seed=3), datamodule=tiny_data(),
                                                              ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert [epoch for epoch, *_ in uninterrupted.seen] == [1, 3, 5]
    assert [epoch for epoch, *_ in first.seen + resumed.seen] == [1, 3, 5]  # the schedule goes on
    assert resumed.seed == 1 and resumed.indices == uninterrupted.indices
    for (epoch, indices, scalars), (_, expected_indices, expected) in zip(resumed.seen, uninterrupted.seen[1:],
                                                                           strict=True):
        assert indices == expected_indices
        for name, value in expected.items():
            if name not in TIMING:
                assert scalars[name] == pytest.approx(value, rel=1e-6, abs=1e-9), (epoch, name)


# -- many validations ----------------------------------------------------------------------------

def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance touches deprecated module-level proxies
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe(Callback):
    """Counts validations and samples memory at the chosen ones."""

    def __init__(self, at: tuple[int, ...], sample):
        self.at, self.sample, self.count, self.samples = at, sample, 0, {}

    def on_validation_end(self, trainer, pl_module):
        self.count += 1
        if self.count in self.at:
            self.samples[self.count] = self.sample()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc")
def test_a_hundred_validations_reuse_the_graph_and_keep_host_memory_flat(tmp_path, monkeypatch):
    made = record_callback_engines(monkeypatch, EagerGraphEngine)
    probe = MemoryProbe(at=(20, 60, 100), sample=lambda: (live_tensors(), resident_bytes()))
    callback = RolloutCallback(num_sequences=5, batch_size=4, chunk=8)
    trainer = tiny_trainer(tmp_path, [callback, probe], max_epochs=100, limit_train_batches=1)
    trainer.fit(tiny_module(), datamodule=tiny_data())

    assert probe.count == 100 and callback.last_result.epoch == 99
    ((engine, _),) = made
    assert engine.stats.path == "graph" and engine.stats.num_captures == 1  # one graph for all 100 rollouts
    (t20, rss20), (t60, rss60), (t100, rss100) = (probe.samples[k] for k in (20, 60, 100))
    assert t100 <= t20, (t20, t60, t100)  # nothing keeps tensors of past validations alive
    assert rss100 - rss20 < 16 * 2**20, (rss20, rss60, rss100)


# -- W&B out of reach ------------------------------------------------------------------------------

@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    """No W&B settings from the machine, and no W&B run left over from another test (a logger would reuse it)."""
    import wandb

    wandb.finish()
    for name in [n for n in os.environ if n.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    yield monkeypatch
    wandb.finish()


def test_a_wandb_start_that_fails_steps_down_to_offline_then_to_disabled(clean_wandb_env, tmp_path):
    import wandb

    real_init, modes = wandb.init, []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] != "disabled":
            raise wandb.errors.CommError(f"simulated: cannot start a {kwargs['mode']} run")
        return real_init(**kwargs)

    clean_wandb_env.setattr(wandb_setup, "_has_credentials", lambda: True)
    clean_wandb_env.setattr(wandb, "init", init)
    logger = wandb_logger(mode="online", save_dir=tmp_path, log_model=True)
    with pytest.warns(UserWarning) as caught:
        run = logger.experiment
    messages = [str(w.message) for w in caught]
    assert any("could not start the online run (CommError: simulated: cannot start a online run); logging to an "
               "offline run instead" in m for m in messages), messages
    assert any("could not start the offline run either" in m and "W&B is off for this run" in m for m in messages)
    assert modes == ["online", "offline", "disabled"] and logger._log_model is False
    logger.log_metrics({"rollout/nrmse": 0.5}, step=1)  # accepted and dropped
    assert run is logger.experiment  # started once
    assert wandb_setup.finish_wandb([logger]) == []


def test_every_wandb_wait_is_bounded(clean_wandb_env, tmp_path):
    settings = wandb_logger(mode="offline", save_dir=tmp_path)._wandb_init["settings"]
    assert settings.init_timeout == 60 and settings.finish_timeout == 300
    clean_wandb_env.setenv("WANDB_INIT_TIMEOUT", "5")
    clean_wandb_env.setenv("WANDB_FINISH_TIMEOUT", "30")
    settings = wandb_logger(mode="offline", save_dir=tmp_path)._wandb_init["settings"]
    assert settings.init_timeout == 5 and settings.finish_timeout == 30


def test_a_wandb_run_that_fails_while_logging_is_skipped_once(clean_wandb_env, tmp_path):
    logger = wandb_logger(mode="offline", save_dir=tmp_path)

    class Broken:
        def log(self, *args, **kwargs):
            raise ConnectionError("wandb-core went away")

    logger._experiment = Broken()
    with pytest.warns(UserWarning, match=r"logging metrics failed \(ConnectionError: wandb-core went away\)"):
        logger.log_metrics({"a": 1.0}, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metrics({"a": 2.0}, step=1)  # no second warning, no exception


def test_media_that_fail_to_log_are_reported_once_and_the_scalars_go_on(tmp_path, monkeypatch, clean_wandb_env):
    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(rollout_module, "log_rollout_media", broken)
    csv_logger = CSVLogger(tmp_path, name="csv")
    loggers = [csv_logger, wandb_logger(mode="disabled", save_dir=tmp_path)]
    trainer = tiny_trainer(tmp_path, [RolloutCallback(num_sequences=3)], logger=loggers, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(tiny_module(), datamodule=tiny_data())
    failures = [str(w.message) for w in caught if "media to W&B failed" in str(w.message)]
    assert failures == ["RolloutCallback: logging the rollout media to W&B failed (OSError: No space left on device); "
                        "the scalars still reach every logger. HINT: check the W&B run's directory and disk space."]
    assert len(rollout_rows(csv_logger)) == 2


def test_train_py_with_wandb_online_but_unreachable_keeps_the_run(tmp_path):
    """No network: online mode with a key, a server that refuses connections, and a short init timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(MPLBACKEND="Agg", PYTHONPATH=subprocess_pythonpath(ROOT), OMP_NUM_THREADS="1", WANDB_API_KEY="0" * 40,
               WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="2",
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb-data"))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "logger=[csv,wandb]",
                           "logger.wandb.mode=online", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "W&B: could not start the online run" in output and "logging to an offline run instead" in output
    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(metrics) as handle:
        assert len([row for row in csv.DictReader(handle) if row["rollout/nrmse"]]) == 2  # the other logger
    (offline,) = run_dir.glob("wandb/offline-run-*")
    assert len(read_offline_run(offline).values("rollout/nrmse")) == 2  # and W&B's own record, for `wandb sync`
    assert f"wandb sync {offline}" in output


# -- on a GPU, for real --------------------------------------------------------------------------

class HostSync(nn.Module):
    """A model whose `step` reads a value on the host: fine eagerly, impossible to capture."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.d_input = self.d_output = model.d_input

    def forward(self, x, dt=None):
        return self.model(x, dt)

    def allocate_state(self, batch_size, device, dtype):
        return self.model.allocate_state(batch_size, device, dtype)

    def prefill(self, x, dt=None):
        return self.model.prefill(x, dt)

    def step(self, x_t, state, dt_t=None):
        if float(x_t.abs().sum()) < 0:  # a host synchronisation
            raise AssertionError
        return self.model.step(x_t, state, dt_t)


@pytest.mark.cuda
def test_an_uncapturable_step_falls_back_to_the_loop_on_a_gpu(tmp_path):
    torch.manual_seed(0)
    module = NextStepModule(HostSync(build_model("lru", d_input=3, d_model=16, d_state=8, n_layers=1)),
                            partial(torch.optim.AdamW, lr=3e-3))
    callback = RolloutCallback(num_sequences=4, batch_size=4, cuda_graph=True)
    data = tiny_data()
    trainer = tiny_trainer(tmp_path, [callback], logger=CSVLogger(tmp_path, name="csv"), accelerator="gpu",
                           max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    fallbacks = [w for w in caught if "capturing the rollout graph" in str(w.message)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    assert [row["rollout/uses_graph"] for row in rollout_rows(trainer.logger)] == [0.0, 0.0]
    windows = [data.val_dataset[i] for i in callback.last_result.indices]
    context = torch.stack([w["context"] for w in windows]).cuda()
    module.model.cuda().eval()  # Lightning moves the module back to the CPU when fit ends
    with torch.no_grad():
        expected = rollout_loop(module.model, context, 24).cpu()
    torch.testing.assert_close(callback.last_result.prediction, expected)


@pytest.mark.cuda
def test_a_hundred_validations_keep_gpu_memory_flat(tmp_path):
    probe = MemoryProbe(at=(10, 100), sample=lambda: (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()))
    callback = RolloutCallback(num_sequences=8, batch_size=4, chunk=8, cuda_graph=True)
    trainer = tiny_trainer(tmp_path, [callback, probe], accelerator="gpu", max_epochs=100, limit_train_batches=1)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    assert probe.count == 100
    assert callback.last_result.stats.path == "graph" and callback.last_result.stats.num_captures == 1
    (allocated10, reserved10), (allocated100, reserved100) = probe.samples[10], probe.samples[100]
    # one leaked graph pool or re-capture per validation would add megabytes every time
    assert reserved100 - reserved10 <= 2 * 2**20, (reserved10, reserved100)
    assert allocated100 - allocated10 <= 2**20, (allocated10, allocated100)
