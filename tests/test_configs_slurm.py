"""experiments/sweeps/SLURM.md: every command in it composes, and its DDP jobs ask SLURM for what Lightning expects."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.helpers import has_module

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "experiments" / "sweeps" / "SLURM.md"

pytestmark = pytest.mark.skipif(not has_module("hydra_plugins.hydra_submitit_launcher"),
                                reason="needs the slurm extra (hydra-submitit-launcher)")


def documented_commands() -> list[list[str]]:
    """The overrides of every `python train.py -m ...` line in the doc's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("python train.py")]
    return [[arg for arg in shlex.split(line)[2:] if arg != "-m"] for line in lines]


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """A multirun's points: `key=a,b` becomes one override per value."""
    choices = [[f"{o.split('=', 1)[0]}={v}" for v in o.split("=", 1)[1].split(",")]
               if "=" in o and "," in o and not re.search(r"[\[{(]", o) else [o] for o in overrides]
    return [list(point) for point in itertools.product(*choices)]


def test_the_doc_shows_the_commands_it_describes():
    commands = documented_commands()
    assert len(commands) >= 5
    assert all("hydra/launcher=slurm" in command for command in commands)
    assert any("trainer=ddp" in c and "hydra.launcher.nodes=2" in c for c in commands)
    assert any("ckpt_path=last" in c for c in commands)
    assert any("hparams_search=optuna" in c for c in commands)


@pytest.mark.parametrize("command", documented_commands(), ids=lambda c: " ".join(c)[:60])
def test_every_documented_command_composes_to_a_consistent_slurm_job(command):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for point in sweep_points(command):
            cfg = compose("train", overrides=point, return_hydra_config=True)
            launcher = cfg.hydra.launcher
            assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
            params = instantiate(launcher).params  # what submitit will be asked for
            if cfg.trainer.get("strategy") == "ddp":
                assert params["tasks_per_node"] == cfg.trainer.devices == params["gpus_per_node"]
                assert params["nodes"] == cfg.trainer.num_nodes
            else:
                assert params["tasks_per_node"] == cfg.trainer.devices == 1 and params["nodes"] == 1
            if cfg.ckpt_path == "last":  # resubmitted jobs must find their checkpoints again
                assert params["max_num_timeout"] > 0
                assert "now:" not in OmegaConf.to_container(cfg.hydra.sweep)["dir"]
    GlobalHydra.instance().clear()
