"""Smoke test: experiments/benchmark_rollout.py runs on the CPU (loop only) and writes its JSON."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark_rollout.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_rollout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_main_runs_tiny_on_cpu(tmp_path, capsys):
    benchmark = _load_benchmark()
    out = tmp_path / "rollout.json"
    rows = benchmark.main(["--device", "cpu", "--configs", "2,8,4,1", "--models", "lru", "--steps", "6",
                           "--repeats", "1", "--chunk", "4", "--out", str(out)])
    eager, *gpu_only = rows
    assert eager["variant"] == "eager" and eager["us_per_step"] > 0 and eager["kernels_per_step"] is None
    assert [r["variant"] for r in gpu_only] == ["seed", "graph", "compiled", "tf32", "cublas", "fused", "graph-bf16",
                                                "fused-bf16"]
    assert all(r["skipped"] == "needs a CUDA GPU" for r in gpu_only)
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["us_per_step"] == eager["us_per_step"]
    printed = capsys.readouterr().out
    assert "| lru | 2 | 8 | 4 | 1 | eager |" in printed and "| µs/step |" in printed


def test_config_parsing():
    benchmark = _load_benchmark()
    assert benchmark.parse_configs("32,32,16,1;4,8,2,3") == [(32, 32, 16, 1), (4, 8, 2, 3)]
    with pytest.raises(argparse.ArgumentTypeError, match=r"B,d_model,d_state,layers \(positive\), got '32,32,16'"):
        benchmark.parse_configs("32,32,16")
