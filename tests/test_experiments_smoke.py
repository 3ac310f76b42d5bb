"""The benchmark scripts in experiments/ run end to end on the CPU at toy sizes."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_models_reports_every_mixer(tmp_path):
    out = tmp_path / "models.json"
    rows = _load("benchmark_models").main(["--device", "cpu", "--batch", "2", "--length", "16", "--d-model", "8",
                                           "--layers", "1", "--loop-steps", "4", "--repeats", "1", "--out", str(out)])
    assert [r["mixer"] for r in rows] == ["lru", "s4d", "s5", "mamba", "rglru"]
    assert all(r["fwd_tok_s"] > 0 and r["loop_tok_s"] > 0 and r["fwd_bwd_tok_s"] > 0 for r in rows)
    assert [r["mixer"] for r in json.loads(out.read_text())["rows"]] == [r["mixer"] for r in rows]


def test_benchmark_callback_times_validation_with_and_without_rollouts(tmp_path):
    rows = _load("benchmark_callback").main(["--device", "cpu", "--repeats", "1", "--overrides", "experiment=smoke",
                                             "--output-dir", str(tmp_path)])
    by_name = {r["variant"]: r for r in rows}
    assert set(by_name) == {"no rollouts", "loop"}
    assert by_name["no rollouts"]["steps_per_second"] is None
    assert by_name["loop"]["steps_per_second"] > 0 and by_name["loop"]["uses_graph"] == 0
