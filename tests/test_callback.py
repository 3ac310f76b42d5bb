"""RolloutCallback with real training runs on the CPU (tiny data, tiny model, a few steps)."""

from __future__ import annotations

import csv
import dataclasses
import logging
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

import lrnn_lightning.callbacks.rollout as rollout_module
from lrnn_lightning.callbacks import RankReport, RolloutCallback
from lrnn_lightning.callbacks.result import SCALAR_NAMES
from lrnn_lightning.data import CsvDataModule, OscillatorsDataModule
from lrnn_lightning.models import build_model
from lrnn_lightning.module import NextStepModule
from lrnn_lightning.rollout import RolloutEngine, rollout_loop
from lrnn_lightning.rollout.metrics import channel_scale, horizon_errors
from lrnn_lightning.utils.training import _rank_paths, summary_line
from tests.helpers import record_callback_engines


def tiny_data(**overrides) -> OscillatorsDataModule:
    options = dict(num_series=2, num_samples=300, context_length=16, horizon=24, stride=8, val_stride=8,
                   batch_size=16)
    return OscillatorsDataModule(**{**options, **overrides})


def tiny_module(channels: int = 3) -> NextStepModule:
    return NextStepModule(build_model("lru", d_input=channels, d_model=16, d_state=8, n_layers=1),
                          partial(torch.optim.AdamW, lr=3e-3))


def tiny_trainer(tmp_path: Path, callbacks, logger=None, **overrides) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                   num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
                   logger=logger if logger is not None else CSVLogger(tmp_path, name="csv"))
    return pl.Trainer(callbacks=callbacks, **{**options, **overrides})


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_metrics_reach_a_csv_logger_and_match_an_independent_rollout(tmp_path):
    callback = RolloutCallback(num_sequences=4, batch_size=2, horizon=20, context=12)
    module, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=2)
    trainer.fit(module, datamodule=data)

    rows = [row for row in read_csv_metrics(trainer.logger) if row.get("rollout/nrmse")]
    assert len(rows) == 2  # one per epoch
    for name in ("mse", "mae", "nrmse", "persistence_mse", "persistence_mae", "persistence_nrmse", "skill",
                 "valid_steps", "persistence_valid_steps", "nrmse_final", "steps_per_second", "uses_graph"):
        assert np.isfinite(float(rows[-1][f"rollout/{name}"])), name
    assert float(rows[-1]["rollout/uses_graph"]) == 0.0  # CPU: the step loop

    result = callback.last_result
    windows = [data.val_dataset[i] for i in result.indices]
    context = torch.stack([w["context"][-12:] for w in windows])
    future = torch.stack([w["future"][:20] for w in windows])
    module.model.eval()
    with torch.no_grad():
        expected = rollout_loop(module.model, context, 20)
    torch.testing.assert_close(result.prediction, expected)
    errors = horizon_errors(expected, future, channel_scale(torch.cat([context, future], 1)))
    assert float(rows[-1]["rollout/mse"]) == pytest.approx(float(errors.mse.mean()), rel=1e-5)
    assert float(rows[-1]["rollout/nrmse"]) == pytest.approx(float(errors.nrmse.mean()), rel=1e-5)


def test_a_channel_constant_over_the_rolled_out_windows_warns_and_does_not_make_rollouts_diverge(tmp_path):
    rng = np.random.default_rng(3)
    flag = np.r_[rng.integers(0, 2, 96), np.zeros(24)]  # moves in training, stays 0 after the split
    path = tmp_path / "flag.csv"
    path.write_text("x,flag\n" + "\n".join(f"{np.sin(0.3 * k):.5f},{int(f)}" for k, f in enumerate(flag)))
    data = CsvDataModule(path=path, context_length=8, horizon=10, val_stride=3, batch_size=8)
    callback = RolloutCallback(num_sequences=3, batch_size=3)
    trainer = tiny_trainer(tmp_path, [callback])
    with pytest.warns(UserWarning, match=r"channel \[1\] does not move in the 3 rolled-out windows.*scale 1.*HINT"):
        trainer.fit(tiny_module(channels=2), datamodule=data)
    assert float(trainer.callback_metrics["rollout/diverged_fraction"]) == 0.0  # a 1e-8 scale: all diverged
    assert float(trainer.callback_metrics["rollout/nrmse"]) < 50


def test_persistence_baseline_on_a_ramp_is_slope_times_horizon(tmp_path):
    slope = 0.25
    path = tmp_path / "ramp.csv"
    path.write_text("t,x\n" + "\n".join(f"{k},{slope * k}" for k in range(120)))
    data = CsvDataModule(path=path, columns=["x"], timestamp_column="t", context_length=8, horizon=10,
                         val_stride=3, batch_size=8)
    callback = RolloutCallback(num_sequences=3, batch_size=3)
    trainer = tiny_trainer(tmp_path, [callback])
    trainer.fit(tiny_module(channels=1), datamodule=data)

    normalised_slope = slope / float(data.std[0])
    k = np.arange(1, 11)
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/persistence_mse"]) == pytest.approx(np.mean((normalised_slope * k) ** 2), rel=1e-4)
    assert float(metrics["rollout/persistence_mae"]) == pytest.approx(np.mean(normalised_slope * k), rel=1e-4)
    # the channel scale is the spread of the rolled-out windows (18 samples each, starting 3 apart)
    positions = np.concatenate([3 * i + np.arange(18) for i in callback.indices])
    scale = normalised_slope * positions.std()
    assert float(metrics["rollout/persistence_nrmse"]) == pytest.approx(np.mean(normalised_slope * k / scale),
                                                                        rel=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
@pytest.mark.parametrize("value", [True, "true"])
def test_cuda_graph_true_without_cuda_is_a_configuration_error(value):
    with pytest.raises(ValueError, match=r"cuda_graph=true needs a CUDA GPU, but torch.cuda.is_available\(\) is "
                                         r"False.*HINT: set generation.cuda_graph=auto"):
        RolloutCallback(cuda_graph=value)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(cuda_graph="sometimes"), r"cuda_graph must be 'auto', true or false, got 'sometimes'"),
    (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
    (dict(batch_size=2.5), r"batch_size must be a positive integer, got 2.5"),
    (dict(horizon=-1), r"horizon must be a positive integer or None, got -1"),
    (dict(autocast_dtype="int8"), r"autocast_dtype must be null, 'bfloat16' or 'float16', got 'int8'"),
    (dict(tf32="yes"), r"tf32 must be true, false or null \(keep the global setting\), got 'yes'"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutCallback(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(horizon=25), r"horizon=25 is longer than the validation windows' horizon \(24 steps\). HINT: lower "
                       r"generation.horizon to at most 24, or raise data.horizon"),
    (dict(context=17), r"context=17 is longer than the validation windows' context \(16 steps\)"),
    (dict(event_mode=True), r"event_mode=true needs per-step dt from the data.*HINT: set data.event=true"),
])
def test_settings_the_data_cannot_serve_are_errors(tmp_path, kwargs, message):
    trainer = tiny_trainer(tmp_path, [RolloutCallback(num_sequences=2, **kwargs)], logger=False)
    with pytest.raises(ValueError, match=message):
        trainer.validate(tiny_module(), datamodule=tiny_data())


def test_event_mode_rolls_out_with_the_windows_dt(tmp_path, monkeypatch):
    seen = []
    original = RolloutEngine.rollout

    def spy(self, context, horizon, dt=None):
        seen.append((self.event_mode, None if dt is None else dt.clone()))
        return original(self, context, horizon, dt)

    monkeypatch.setattr(RolloutEngine, "rollout", spy)
    data = tiny_data(event=True)
    callback = RolloutCallback(num_sequences=3, context=10, horizon=20)
    tiny_trainer(tmp_path, [callback], logger=False).validate(tiny_module(), datamodule=data)
    event_mode, dt = seen[-1]
    assert event_mode is True
    expected = torch.stack([data.val_dataset[i]["dt"][6:36] for i in callback.indices])
    torch.testing.assert_close(dt, expected)
    assert float(dt.std()) > 0.05  # irregular


def test_engine_is_made_once_and_reused_across_validations(tmp_path, monkeypatch):
    made = record_callback_engines(monkeypatch)
    callback = RolloutCallback(num_sequences=4, batch_size=3, tf32=True)
    trainer = tiny_trainer(tmp_path, [callback], logger=False, max_epochs=3)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    assert len(made) == 1
    kwargs = made[0][1]
    assert kwargs["batch_size"] == 3 and kwargs["cuda_graph"] == "auto" and kwargs["tf32"] is True
    assert kwargs["on_capture_error"] == "fallback"  # a failed capture falls back to the loop (test_faults.py)
    assert callback.last_result.epoch == 2


def test_sanity_check_and_every_n_epochs(tmp_path):
    epochs = []

    class Recording(RolloutCallback):
        def on_validation_epoch_end(self, trainer, pl_module):
            super().on_validation_epoch_end(trainer, pl_module)
            if self.last_result is not None and all(self.last_result is not seen for _, seen in epochs):
                epochs.append((trainer.sanity_checking, self.last_result))

    skip = Recording(num_sequences=2, every_n_epochs=2)
    tiny_trainer(tmp_path, [skip], logger=False, max_epochs=4, num_sanity_val_steps=1).fit(
        tiny_module(), datamodule=tiny_data())
    assert [(sanity, result.epoch) for sanity, result in epochs] == [(False, 1), (False, 3)]

    epochs.clear()
    asked = Recording(num_sequences=2, sanity_check=True)
    tiny_trainer(tmp_path, [asked], logger=False, max_epochs=1, num_sanity_val_steps=1).fit(
        tiny_module(), datamodule=tiny_data())
    assert [sanity for sanity, _ in epochs] == [True, False]


def test_resume_restores_the_rollout_subset(tmp_path):
    data = tiny_data()
    first = RolloutCallback(num_sequences=3, seed=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    tiny_trainer(tmp_path, [first, checkpoint], logger=False, max_epochs=1, enable_checkpointing=True).fit(
        tiny_module(), datamodule=data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert saved == {"seed": 1, "num_sequences": 3, "indices": first.indices}

    fresh = RolloutCallback(num_sequences=3, seed=7)
    tiny_trainer(tmp_path, [fresh], logger=False).validate(tiny_module(), datamodule=tiny_data())
    assert fresh.indices != first.indices  # another seed picks other windows ...

    resumed = RolloutCallback(num_sequences=3, seed=7)
    trainer = tiny_trainer(tmp_path, [resumed], logger=False, max_epochs=2)
    trainer.fit(tiny_module(), datamodule=tiny_data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.seed == 1 and resumed.indices == first.indices  # ... but a resumed run continues with its own
    assert resumed.last_result.indices == first.indices and resumed.last_result.epoch == 1


def test_mixed_precision_trainer_does_not_change_the_rollout(tmp_path):
    module, data = tiny_module(), tiny_data()
    callback = RolloutCallback(num_sequences=3)
    tiny_trainer(tmp_path, [callback], logger=False, precision="bf16-mixed").validate(module, datamodule=data)
    windows = [data.val_dataset[i] for i in callback.indices]
    context = torch.stack([w["context"] for w in windows])
    module.model.eval()
    with torch.no_grad():
        fp32 = rollout_loop(module.model, context, 24)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = rollout_loop(module.model, context, 24)
    assert (bf16.float() - fp32).abs().max() > 1e-3  # autocast would be visible ...
    torch.testing.assert_close(callback.last_result.prediction, fp32)  # ... and is not there


def test_media_only_on_global_rank_zero(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(rollout_module, "log_rollout_media", lambda logger, result, **kw: calls.append(kw))
    logger = WandbLogger(mode="disabled", save_dir=str(tmp_path))
    for is_zero, expected_calls in ((False, 0), (True, 1)):
        calls.clear()
        monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda self, z=is_zero: z))
        callback = RolloutCallback(num_sequences=2)
        trainer = tiny_trainer(tmp_path, [callback], logger=logger)
        trainer.validate(tiny_module(), datamodule=tiny_data())
        assert len(calls) == expected_calls
        assert "rollout/nrmse" in trainer.callback_metrics  # scalars on every rank
    logger.experiment.finish()  # a run left open would be reused by the next WandbLogger of this process


def test_more_sequences_than_windows_warns_and_uses_all(tmp_path):
    callback = RolloutCallback(num_sequences=50)
    data = tiny_data()
    # per series, starts 0, 8, 16 of 60 validation samples and the window ending at the last one (start 20)
    with pytest.warns(UserWarning, match=r"num_sequences=50 but the validation set has only 8 windows"):
        tiny_trainer(tmp_path, [callback], logger=False).validate(tiny_module(), datamodule=data)
    assert callback.indices == list(range(8))


@pytest.mark.cuda
def test_graph_path_captures_once_and_follows_training(tmp_path):
    """On a GPU: one capture for the whole run, replayed after every optimizer step, equal to the loop."""
    callback = RolloutCallback(num_sequences=4, batch_size=4, cuda_graph=True, chunk=8)
    module, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(tmp_path, [callback], accelerator="gpu", max_epochs=3)
    trainer.fit(module, datamodule=data)
    result = callback.last_result
    assert result.stats.path == "graph" and result.stats.num_captures == 1
    assert float(trainer.callback_metrics["rollout/uses_graph"]) == 1.0
    windows = [data.val_dataset[i] for i in result.indices]
    context = torch.stack([w["context"] for w in windows]).cuda()
    module.model.cuda().eval()  # Lightning moves the module back to the CPU when fit ends
    with torch.no_grad():
        expected = rollout_loop(module.model, context, 24).cpu()
    torch.testing.assert_close(result.prediction, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_graph_path_in_event_mode_under_a_bf16_trainer(tmp_path):
    callback = RolloutCallback(num_sequences=3, batch_size=2, cuda_graph=True)
    module, data = tiny_module(), tiny_data(event=True)
    tiny_trainer(tmp_path, [callback], accelerator="gpu", precision="bf16-mixed").fit(module, datamodule=data)
    result = callback.last_result
    assert result.stats.path == "graph" and result.dt is not None
    windows = [data.val_dataset[i] for i in result.indices]
    context = torch.stack([w["context"] for w in windows]).cuda()
    dt = torch.stack([w["dt"] for w in windows]).cuda()
    module.model.cuda().eval()  # Lightning moves the module back to the CPU when fit ends
    with torch.no_grad():
        expected = rollout_loop(module.model, context, 24, dt).cpu()
    torch.testing.assert_close(result.prediction, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("precision", "dtype"), [("64-true", torch.float64)])
def test_true_precision_trainers_roll_out_in_the_weights_dtype(tmp_path, monkeypatch, precision, dtype):
    seen = []
    original = RolloutEngine.rollout
    monkeypatch.setattr(RolloutEngine, "rollout", lambda self, context, horizon, dt=None: (
        seen.append(context.dtype), original(self, context, horizon, dt))[1])
    callback = RolloutCallback(num_sequences=2)
    trainer = tiny_trainer(tmp_path, [callback], logger=False, precision=precision)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    assert seen == [dtype]
    assert np.isfinite(float(trainer.callback_metrics["rollout/nrmse"]))


def test_one_process_result_covers_the_whole_subset_per_sequence(tmp_path):
    callback = RolloutCallback(num_sequences=5, batch_size=2)
    module, data = tiny_module(), tiny_data()
    tiny_trainer(tmp_path, [callback], logger=False).validate(module, datamodule=data)
    result = callback.last_result
    assert result.rows == list(range(5)) and len(result.ranks) == 1
    assert result.ranks[0].describe() == "rank 0 on cpu: 5 sequences, loop path"
    windows = [data.val_dataset[i] for i in result.indices]
    context, future = (torch.stack([w[k] for w in windows]) for k in ("context", "future"))
    scale = channel_scale(torch.cat([context, future], 1))
    curves = ((result.prediction.double() - future.double()) / scale).pow(2).mean(dim=2).sqrt()
    torch.testing.assert_close(result.sequences.nrmse, curves.mean(dim=1))
    assert result.sequences.diverged_at.tolist() == [24] * 5 and result.diverged == 0


def test_sample_plots_of_a_diverged_rollout_keep_the_truth_in_view():
    from lrnn_lightning.callbacks.plotting import _y_limits, plot_rollout

    low, high = _y_limits(np.array([-1.0, 2.0]), np.array([0.5, np.nan, 1e30]))
    assert low == pytest.approx(-1.0 - 0.05 * 9) and high == pytest.approx(8.0 + 0.05 * 9)  # 2 truth ranges above
    assert _y_limits(np.array([-1.0, 2.0]), np.array([2.5])) == pytest.approx((-1.175, 2.675))  # a sane one fits

    context, future = torch.randn(16, 2), torch.randn(8, 2)
    prediction = future.clone()
    prediction[3:, 0] = float("nan")
    prediction[5:, 1] = 1e30
    image = plot_rollout(context, future, prediction, channels=2)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.std() > 0


def test_ranks_on_different_paths_are_reported_as_mixed_with_each_rank_path(tmp_path, monkeypatch, caplog):
    """Under DDP one process may run the fused kernel and another the graph: no rank's path stands for the run."""
    callback = RolloutCallback(num_sequences=4)
    with caplog.at_level(logging.INFO):
        tiny_trainer(tmp_path, [callback], logger=False).validate(tiny_module(), datamodule=tiny_data())
    one = callback.last_result
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("RolloutCallback: epoch"))
    assert line == f"RolloutCallback: {one.describe(0)}"  # the callback logs the result's line
    assert one.path == "loop" and "mixed" not in line and ". Path on rank 0: loop (fused=false; " in line

    ranks = [RankReport(0, "cuda:0", 2, "fused", 0.0, 900.0), RankReport(1, "cuda:1", 2, "graph", 12.0, 700.0)]
    stats = dataclasses.replace(one.stats, path="fused", backend_reason="fused=auto: lru x 1 layers covered")
    mixed = dataclasses.replace(one, ranks=ranks, stats=stats)
    assert mixed.path == "mixed" and mixed.rank_paths == "rank 0 fused, rank 1 graph"
    assert mixed.describe(0).endswith("rank 1 on cuda:1: 2 sequences, graph path, capture 12 ms. Paths: mixed "
                                      "(rank 0 fused, rank 1 graph). Path on rank 0: fused (fused=auto: lru x 1 "
                                      "layers covered).")
    scalars = mixed.scalars("rollout")
    assert scalars["rollout/uses_fused"] == scalars["rollout/uses_graph"] == 0.0  # neither path for the whole run

    logged = []
    logger = SimpleNamespace(experiment=SimpleNamespace(log=logged.append))
    rollout_module.log_rollout_media(logger, mixed, step=3, prefix="rollout", num_plots=1, plot_channels=1)
    assert logged[0]["rollout/path"] == "mixed" and logged[0]["rollout/rank_paths"] == "rank 0 fused, rank 1 graph"


def test_summary_line_of_ranks_on_different_paths_says_mixed_with_each_rank_path(tmp_path):
    """The end-of-training summary must not call a mixed run (rank 0 fused, rank 1 graph) the loop path."""
    callback = RolloutCallback(num_sequences=4)
    trainer = tiny_trainer(tmp_path, [callback], logger=False)
    trainer.validate(tiny_module(), datamodule=tiny_data())
    one = callback.last_result
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    assert metrics["rollout/uses_loop"] == 1.0 and metrics["rollout/uses_graph"] == 0.0  # CPU: every rank looped
    assert sorted(one.scalars("rollout")) == sorted(f"rollout/{name}" for name in SCALAR_NAMES)  # known up front
    assert summary_line(metrics).endswith("on the loop path.") and _rank_paths(trainer, "rollout") is None

    ranks = [RankReport(0, "cuda:0", 2, "fused", 0.0, 900.0), RankReport(1, "cuda:1", 2, "graph", 12.0, 700.0)]
    callback.last_result = mixed = dataclasses.replace(one, ranks=ranks)
    scalars = mixed.scalars("rollout")
    assert scalars["rollout/uses_loop"] == scalars["rollout/uses_graph"] == scalars["rollout/uses_fused"] == 0.0
    assert summary_line(scalars).endswith("steps/s on the mixed path.")
    assert _rank_paths(trainer, "rollout") == "rank 0 fused, rank 1 graph"
    assert summary_line(scalars, rank_paths=_rank_paths(trainer, "rollout")).endswith(
        "steps/s on the mixed (rank 0 fused, rank 1 graph) path.")
    assert _rank_paths(trainer, "other") is None  # only the callback whose metrics are summarised
