"""DDP: the rollout subset is sharded over processes and the logged numbers equal one process's.

The CPU test runs `python train.py trainer=ddp` with two processes over gloo; the GPU test
(`pytest -m cuda`, skipped below two GPUs) does the same on two cards with CUDA graphs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lrnn_lightning.callbacks.distributed import shard
from lrnn_lightning.utils.training import build
from lrnn_lightning.utils.wandb_offline import read_offline_run
from tests.helpers import subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[1]

# rollout numbers that must agree; timing (steps_per_second, capture_ms) may not
COMPARED = ("mse", "mae", "nrmse", "nrmse_final", "persistence_mse", "persistence_mae", "persistence_nrmse", "skill",
            "valid_steps", "persistence_valid_steps", "diverged_fraction", "first_diverged_step", "uses_graph")


def run_train(*args: str, cwd: Path, timeout: int = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(MPLBACKEND="Agg", PYTHONPATH=subprocess_pythonpath(ROOT), OMP_NUM_THREADS="1", WANDB_MODE="offline",
               WANDB_CACHE_DIR=str(cwd / "wandb-cache"), WANDB_CONFIG_DIR=str(cwd / "wandb-config"),
               WANDB_DATA_DIR=str(cwd / "wandb-data"))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def last_rollout_row(run_dir: Path) -> dict[str, float]:
    (path,) = run_dir.glob("csv/version_*/metrics.csv")
    with open(path) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("rollout/nrmse")]
    return {key: float(value) for key, value in rows[-1].items() if value}


def validate_in_one_process(tmp_path: Path, checkpoint: Path, *overrides: str,
                            trainer: str = "cpu") -> dict[str, float]:
    """`trainer.validate` of the checkpoint with the run's config, in one process (`trainer=cpu` or `gpu`)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"trainer={trainer}", "logger=none"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "one")
        del cfg.hydra
    GlobalHydra.instance().clear()
    parts = build(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process had
    try:
        parts["trainer"].validate(parts["module"], datamodule=parts["datamodule"], ckpt_path=checkpoint)
    finally:
        torch.set_num_threads(threads)
    return {name: float(value) for name, value in parts["trainer"].callback_metrics.items()}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [1, 2, 5, 8, 9])
def test_shards_cover_the_subset_once_in_order(count, world_size):
    shards = [shard(count, world_size, rank) for rank in range(world_size)]
    assert len({len(s.positions) for s in shards}) == 1  # equal shapes for the collectives and the graphs
    gathered = [p for s in shards for p in s.positions]
    real = [p for s in shards for p in s.positions[:s.real]]
    assert real == list(range(count)) == gathered[:count]  # every window once, in the subset's order
    assert sum(float(s.weight.sum()) for s in shards) == count


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match=r"need count >= 1 and 0 <= rank < world_size, got count=3, world_size=2, "
                                         r"rank=2"):
        shard(3, 2, 2)


def test_cpu_ddp_over_two_processes_logs_the_numbers_of_one_process(tmp_path):
    """5 windows over 2 gloo processes (3 + 2, one padded row): the same metrics as one process on the same weights."""
    overrides = ("experiment=smoke", "generation.num_sequences=5")
    run_dir = tmp_path / "run"
    output = run_train(*overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=[csv,wandb]",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    # per-rank evidence, printed by rank zero from what each process reported
    assert "RolloutCallback: epoch 1, 5 sequences: rank 0 on cpu: 3 sequences, loop path; rank 1 on cpu: " \
           "2 sequences, loop path." in output

    ddp = last_rollout_row(run_dir)
    assert ddp["epoch"] == 1
    # the checkpoint saved after that validation holds the weights it rolled out
    one = validate_in_one_process(tmp_path, run_dir / "checkpoints" / "last.ckpt", *overrides)
    for name in COMPARED:
        assert one[f"rollout/{name}"] == pytest.approx(ddp[f"rollout/{name}"], rel=1e-5, abs=1e-7), name
    assert ddp["rollout/nrmse"] > 0 and ddp["rollout/mse"] != ddp["rollout/persistence_mse"]

    # media from global rank zero only: one W&B run, whose table lists all five windows
    (wandb_dir,) = run_dir.glob("wandb/offline-run-*")
    run = read_offline_run(wandb_dir)
    assert run.values("rollout/processes") == [2, 2]
    assert run.values("rollout/samples/count") == [2, 2]  # experiment=smoke: num_plots=2, from rank zero's 3
    tables = sorted(p for p in run.files if "rollout/samples_table" in p.as_posix())
    rows = json.loads(tables[-1].read_text())["data"]
    assert len(rows) == 5 and len({row[0] for row in rows}) == 5


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_roll_out_on_both_cards_with_graphs(tmp_path):
    """The GPU counterpart: `python train.py trainer=ddp trainer.devices=2` with CUDA graphs on both cards."""
    run_dir = tmp_path / "run"
    output = run_train("experiment=smoke", "trainer=ddp", "trainer.devices=2", "generation.cuda_graph=true",
                       "generation.num_sequences=6", "generation.batch_size=3", "logger=csv",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    # experiment=smoke has 6 validation windows: 3 per rank
    assert "rank 0 on cuda:0: 3 sequences, graph path" in output, output[-4000:]
    assert "rank 1 on cuda:1: 3 sequences, graph path" in output, output[-4000:]
    ddp = last_rollout_row(run_dir)
    assert ddp["rollout/uses_graph"] == 1.0
    one = validate_in_one_process(tmp_path, run_dir / "checkpoints" / "last.ckpt", "experiment=smoke",
                                  "generation.num_sequences=6", "generation.batch_size=3",
                                  "generation.cuda_graph=true", trainer="gpu")
    for name in COMPARED:  # one process on one card, with a graph, as each rank had
        assert one[f"rollout/{name}"] == pytest.approx(ddp[f"rollout/{name}"], rel=1e-3, abs=1e-6), name
