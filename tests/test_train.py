"""End to end through `python train.py` (subprocesses): offline W&B runs, read back from their files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lrnn_lightning.utils.wandb_offline import read_offline_run
from tests.helpers import has_module, subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[1]



def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the defaults must be offline
    env.update(MPLBACKEND="Agg", PYTHONPATH=subprocess_pythonpath(ROOT), WANDB_CACHE_DIR=str(cwd / "wandb-cache"),
               WANDB_CONFIG_DIR=str(cwd / "wandb-config"), WANDB_DATA_DIR=str(cwd / "wandb-data"))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def offline_runs(directory: Path) -> list[Path]:
    return sorted(directory.glob("**/wandb/offline-run-*"))


def test_train_py_logs_rollout_metrics_chart_images_and_table_to_an_offline_wandb_run(tmp_path):
    done = run_train("experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    (run_dir,) = offline_runs(tmp_path / "run")
    assert f"wandb sync {run_dir}" in done.stdout + done.stderr

    run = read_offline_run(run_dir)
    assert run.project == "lrnn_lightning" and run.config["model"]["name"] == "lru"
    nrmse, persistence = run.values("rollout/nrmse"), run.values("rollout/persistence_nrmse")
    assert len(nrmse) == 2 and len(persistence) == 2  # one rollout per epoch (experiment=smoke: 2 epochs)
    assert all(v > 0 for v in nrmse + persistence)
    for key in ("rollout/mse", "rollout/mae", "rollout/valid_steps", "rollout/skill", "val/loss"):
        assert len(run.values(key)) == 2, key

    # the error-vs-horizon chart: a custom line chart over a table of horizon x {model, persistence}
    assert run.values("rollout/error_vs_horizon_table/_type") == ["table-file"] * 2
    assert run.values("rollout/error_vs_horizon_table/nrows") == [2 * 32] * 2  # 32-step horizon, 2 lines
    chart = run.config["_wandb"]["visualize"]["rollout/error_vs_horizon"]
    assert chart["panel_type"] == "Vega2"
    # sample plots as images, and the table of samples
    images = [p for p in run.files if p.suffix == ".png" and "rollout/samples" in p.as_posix()]
    assert len(images) == 2 * 2  # two plots per validation
    assert run.values("rollout/samples/count") == [2, 2]
    (table_file, *_) = [p for p in run.files if "rollout/samples_table" in p.as_posix()]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["window", "plot", "nrmse", "persistence_nrmse", "valid_steps", "diverged"]
    assert len(table["data"]) == 4  # experiment=smoke rolls out 4 windows
    # timing: capture time, rollout speed, graph or loop
    assert run.values("rollout/path") == ["loop", "loop"] and run.values("rollout/processes") == [1, 1]
    assert run.values("rollout/diverged_fraction") == [0.0, 0.0]
    assert all(v > 0 for v in run.values("rollout/steps_per_second"))
    assert re.search(r"Rollout at epoch \d+: MSE [\d.e+-]+ vs persistence .*normalised RMSE", done.stdout + done.stderr)


def test_multirun_makes_one_grouped_wandb_run_per_job(tmp_path):
    run_train("-m", "experiment=smoke", "generation.horizon=16,32", f"hydra.sweep.dir={tmp_path / 'sweep'}",
              cwd=tmp_path)
    runs = [read_offline_run(d) for d in offline_runs(tmp_path / "sweep")]
    assert len(runs) == 2 and runs[0].run_id != runs[1].run_id
    assert runs[0].group == runs[1].group and runs[0].group.endswith("sweep")
    by_horizon = {run.config["generation"]["horizon"]: run for run in runs}
    assert sorted(by_horizon) == [16, 32]
    for horizon, run in by_horizon.items():
        assert f"generation.horizon={horizon}" in run.name
        assert run.values("rollout/error_vs_horizon_table/nrows")[-1] == 2 * horizon
        assert len(run.values("rollout/nrmse")) == 2


@pytest.mark.skipif(not has_module("hydra_plugins.hydra_optuna_sweeper"),
                    reason="needs the optuna extra (hydra-optuna-sweeper)")
def test_optuna_search_minimises_the_rollout_error(tmp_path):
    sweep = tmp_path / "optuna"
    run_train("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=none", f"hydra.sweep.dir={sweep}",
              "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
              "trainer.num_sanity_val_steps=0", "+trainer.enable_progress_bar=false", cwd=tmp_path)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"model", "model.d_model", "model.n_layers", "module.optimizer.lr",
                                           "generation.context", "data.batch_size"}
    assert 0 < results["best_value"] < 10  # a normalised RMSE
    assert len(list(sweep.glob("*/checkpoints/last.ckpt"))) == 2


@pytest.mark.slow
def test_default_train_py_learns_a_useful_rollout_on_the_cpu(tmp_path):
    """`python train.py` with no arguments: a couple of minutes on a laptop CPU, and it beats persistence."""
    run_train(f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    (run_dir,) = offline_runs(tmp_path / "run")
    run = read_offline_run(run_dir)
    assert run.values("rollout/nrmse")[-1] < 0.5 * run.values("rollout/persistence_nrmse")[-1]
    assert run.values("rollout/valid_steps")[-1] >= 64


@pytest.mark.cuda
def test_train_py_with_cuda_graph_true_on_a_gpu(tmp_path):
    """The product's headline command, shortened: python train.py model=lru generation.cuda_graph=true."""
    run_train("model=lru", "generation.cuda_graph=true", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}",
              cwd=tmp_path)
    (run_dir,) = offline_runs(tmp_path / "run")
    run = read_offline_run(run_dir)
    assert run.values("rollout/path") == ["graph", "graph"]
    assert run.values("rollout/num_captures") == [1, 1]  # captured once, replayed at the second validation


@pytest.mark.cuda
def test_train_py_with_fused_auto_on_a_gpu(tmp_path):
    """README's `python train.py model=lru generation.fused=auto trainer=gpu`, shortened: a small validation batch
    on a GPU with Triton rolls out through the fused kernel at every validation."""
    pytest.importorskip("triton")
    run_train("model=lru", "generation.fused=auto", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}",
              cwd=tmp_path)
    (run_dir,) = offline_runs(tmp_path / "run")
    run = read_offline_run(run_dir)
    assert run.values("rollout/path") == ["fused", "fused"]
    assert [float(v) for v in run.values("rollout/uses_fused")] == [1.0, 1.0]


@pytest.mark.slow
def test_a_resubmitted_run_resumes_from_its_last_checkpoint(tmp_path):
    """What a SLURM job resubmitted after a time-out does (experiments/sweeps/SLURM.md): ckpt_path=last."""
    import csv

    common = ("experiment=smoke", "logger=csv", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'run'}")
    first = run_train(*common, "trainer.max_epochs=1", cwd=tmp_path)
    assert "there is no last checkpoint available" in first.stdout + first.stderr  # the first starts from scratch
    run_train(*common, "trainer.max_epochs=2", cwd=tmp_path)
    epochs = []
    for version in ("version_0", "version_1"):
        with open(tmp_path / "run" / "csv" / version / "metrics.csv") as handle:
            epochs.append(sorted({int(row["epoch"]) for row in csv.DictReader(handle) if row["rollout/nrmse"]}))
    assert epochs == [[0], [1]]  # the second submission went on with epoch 1
