"""The W&B sweep spec: the agent's `${args_no_hyphens}` command lines are valid Hydra overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "experiments" / "sweeps" / "wandb_sweep.yaml"

sweep_utils = pytest.importorskip("wandb.sdk.launch.sweeps.utils")


def candidate_values(spec: dict) -> list:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    return [spec["min"], spec["max"]]


def test_spec_runs_train_py_with_hydra_style_arguments():
    spec = yaml.safe_load(SPEC.read_text())
    assert spec["program"] == "train.py"
    assert spec["command"][-1] == "${args_no_hyphens}"
    assert spec["metric"] == {"name": "rollout/nrmse", "goal": "minimize"}


def test_every_sweep_point_composes_to_the_config_it_names():
    spec = yaml.safe_load(SPEC.read_text())
    names = list(spec["parameters"])
    grids = [candidate_values(spec["parameters"][name]) for name in names]
    # every value of every parameter at least once, without the full product
    points = [dict(zip(names, [g[-1] for g in grids], strict=True))]
    for name, values in zip(names, grids, strict=True):
        for value in values:
            points.append({**{n: g[0] for n, g in zip(names, grids, strict=True)}, name: value})
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for point in points:
            args = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
            cfg = compose("train", overrides=args["args_no_hyphens"])
            assert cfg.model.name == point["model"]
            assert cfg.model.d_model == point["model.d_model"]
            assert cfg.module.optimizer.lr == pytest.approx(point["module.optimizer.lr"])
            assert cfg.generation.context == point["generation.context"] <= cfg.data.context_length
            assert cfg.generation.chunk == point["generation.chunk"]
    GlobalHydra.instance().clear()
