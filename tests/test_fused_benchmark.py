"""Smoke test of experiments/benchmark_fused.py on the CPU: its bookkeeping (weight bytes, targets,
table, launch shapes) and its refusal to run without a GPU; the timings themselves need a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lrnn_lightning.models import SequenceModel
from lrnn_lightning.rollout.fused.pack import pack_model

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark_fused.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_fused", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weight_bytes_counts_every_weight_once(bench):
    model = SequenceModel("lru", d_input=8, d_output=8, d_model=32, d_state=16, n_layers=1)
    n_params = sum(p.numel() for p in model.parameters())
    fp32 = bench.weight_bytes(model, torch.float32)
    # LRU's packed form: B with gamma folded in, the readout, D, decay and scale planes instead of nu/theta/gamma
    assert 4 * n_params <= fp32 <= 4 * (n_params + 4 * 16)
    bf16 = bench.weight_bytes(model, torch.bfloat16)
    matrices = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and "mixer" not in name)
    assert bf16 < fp32 - 2 * matrices + 1  # matrices shrink to 2 bytes


def test_matmul_flop_is_two_per_weight_and_row(bench):
    # every weight matrix multiplies each row once per step: about 2 FLOP per weight-matrix element and row
    for name in ("lru", "mamba"):
        model = SequenceModel(name, d_input=8, d_output=8, d_model=32, d_state=16, n_layers=2)
        per_row = 2 * sum(p.numel() for p in model.parameters() if p.dim() >= 2)
        flop = bench.matmul_flop(model, batch=3)
        assert flop == 3 * bench.matmul_flop(model, batch=1)
        assert 0.9 * 3 * per_row <= flop <= 1.1 * 3 * per_row, (name, flop, 3 * per_row)


def test_targets_and_table(bench):
    rows = [{"model": "lru", "B": 32, "d_model": 32, "d_state": 16, "layers": 1, "variant": "graph",
             "us_per_step": 40.0, "weight_bytes": 1e5, "bytes_read_per_step": 1e5, "GBps": 2.5},
            {"model": "lru", "B": 32, "d_model": 32, "d_state": 16, "layers": 1, "variant": "fused",
             "us_per_step": 2.5, "us_per_step_kernel": 1.5, "weight_bytes": 1e5, "bytes_read_per_step": 2e5,
             "GBps": 133.0, "TFLOPs": 0.25, "programs": 2,
             "config": {"block_b": 16, "block_n": 64, "block_k": 16, "num_warps": 4}, "speedup_vs_graph": 26.7,
             "rel_dev_vs_graph": 3e-7},
            {"model": "lru", "B": 32, "d_model": 32, "d_state": 16, "layers": 1, "variant": "fused-bf16",
             "error": "OutOfResources: shared memory"}]
    for row in rows:
        bench.judge_target(row, (32, 32, 16, 1))
    assert rows[1]["meets_target"] is True and rows[1]["target"] == "kernel <= 2 µs/step"
    assert "target" not in rows[0] and "target" not in rows[2]
    big = {"variant": "fused", "us_per_step": 100.0, "speedup_vs_graph": 3.0}
    bench.judge_target(big, (1024, 512, 128, 8))
    assert big["meets_target"] is False and big["target"] == ">= 5x graph"
    table = bench.markdown_table(rows)
    assert "| lru | 32 | 32 | 16 | 1 | fused | 2.50 |  | 1.50 | 26.70x |" in table
    assert "kernel <= 2 µs/step: met" in table and "error: OutOfResources" in table
    assert "| 133 | 0.25 | 3.0e-07 |" in table
    assert "b16 n64 k16 w4 auto split auto (2 row tiles) |" in table  # unsplit: no exchange named
    split = dict(rows[1], config={"block_b": 1, "block_n": 64, "block_k": 64, "num_warps": 8, "split": 4},
                 programs=32, exchange="tagged")
    assert "b1 n64 k64 w8 auto split 4 (32 row tiles), tagged exchange |" in bench.markdown_table([split])


def test_the_exchange_protocol_a_launch_used(bench, monkeypatch):
    from dataclasses import replace

    from lrnn_lightning.rollout.fused import launch
    from lrnn_lightning.rollout.fused.config import small_tile_config

    monkeypatch.setattr(launch, "processor_count", lambda device: 132)  # build for an H100 on the CPU
    x0 = torch.randn(8, 8)
    for name, protocol in (("lru", "tagged"), ("mamba", "counter")):
        packed = pack_model(SequenceModel(name, d_input=8, d_output=8, d_model=128, d_state=64, n_layers=2),
                            torch.float32, event=False)
        for split, expected in ((4, protocol), (1, None)):
            config = replace(small_tile_config(1), num_warps=8, split=split)
            call = launch.build_call(packed, x0, None, 2, None, "ieee", config, interpreted=False)
            assert bench.exchange_protocol(call) == expected, (name, split)


def test_launch_shapes_to_try(bench):
    assert [c.block_b for c in bench.candidate_configs("fused", 32)] == [16, 16, 16, 32]
    assert [c.block_b for c in bench.candidate_configs("fused-bf16", 16)] == [16]
    packed = pack_model(SequenceModel("lru", d_input=8, d_output=8, d_model=32, d_state=16, n_layers=2),
                        torch.float32, event=False)
    shapes = bench.launch_shapes("fused", packed, 32, 132, [1, 16], tune=False, activations=["auto", "scratch"],
                                 warps=[8])
    labels = [label for label, _ in shapes]
    assert labels[0] == "default" and "block_b=16 scratch w8" in labels
    assert len({shape for _, shape in shapes}) == len(shapes) == 8  # default == block_b=1: no repeats
    # "auto" keeps the default's own kernel: phased steps for a wide LRU at large batch
    wide = pack_model(SequenceModel("lru", d_input=8, d_output=8, d_model=512, d_state=16, n_layers=1),
                      torch.bfloat16, event=False)
    shapes = bench.launch_shapes("fused-bf16", wide, 1024, 132, [], tune=False, activations=["auto", "registers"])
    assert [(label, shape.activations) for label, shape in shapes] == [("default", "phased"),
                                                                        ("default registers w8", "registers")]


def test_needs_a_gpu(bench):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        bench.main(["--configs", "2,8,4,1"])
