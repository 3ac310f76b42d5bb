"""Where a captured rollout step spends its time: the GPU kernels of one K-step replay, per step.

For each model/config and each matmul mode (fp32 with the fused step kernel of models/step_ops.py,
fp32 with cuBLAS only, fp32 with cuBLASLt only, TF32), the
K-step graph is captured, replayed under torch.profiler, and the kernels are grouped by name:
launches per step and GPU µs per step. "busy" is the sum of kernel durations, "wall" the replay's
elapsed time per step (CUDA events): wall - busy is launch gaps.

    python experiments/profile_step.py --configs "32,32,16,1;32,128,64,4" --models lru,mamba
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.benchmark_rollout import parse_configs  # noqa: E402
from lrnn_lightning.models import SequenceModel, step_ops  # noqa: E402
from lrnn_lightning.models.step_ops import linear_step, use_step_kernels  # noqa: E402
from lrnn_lightning.rollout import StepGraph  # noqa: E402
from lrnn_lightning.rollout.inference import matmul_tf32, rollout_mode  # noqa: E402

MODES = ("kernel", "cublas", "cublaslt", "tf32")


@contextlib.contextmanager
def matmul_mode(mode: str):
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt" if mode == "cublaslt" else "cublas")
    try:
        with matmul_tf32(mode == "tf32"), use_step_kernels(mode == "kernel"):
            yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def profile_graph(graph: StepGraph, replays: int) -> tuple[float, dict]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    wall_us = 1e3 * start.elapsed_time(end) / (replays * graph.chunk)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name].append(event.device_time)
    steps = replays * graph.chunk
    table = {name[:90]: (len(t) / steps, sum(t) / steps) for name, t in kernels.items()}
    return wall_us, table


def matmul_micro(device: torch.device) -> list[dict]:
    rows = []
    for (m, k, n) in [(32, 32, 64), (32, 128, 128), (32, 128, 512), (256, 256, 1024), (8, 128, 128),
                      (1024, 512, 2048), (1024, 512, 512)]:
        a = torch.randn(m, k, device=device)
        layer = torch.nn.Linear(k, n, device=device).requires_grad_(False)
        for mode in MODES:
            with matmul_mode(mode):
                us = graph_us(functools.partial(linear_step, a, layer), launches=100)
            rows.append({"m": m, "k": k, "n": n, "mode": mode, "us_per_linear": us})
            macs_ok = m * n * k <= step_ops.MAX_MACS
            print(f"linear+bias {m}x{k} @ {k}x{n} {mode} (kernel {'applies' if macs_ok else 'too big'}): "
                  f"{us:.2f} us (in a graph of 100)", flush=True)
    return rows


def graph_us(fn, launches: int = 50) -> float:
    """µs per call of `fn` replayed as a CUDA graph of `launches` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / (4 * launches)


def tune_blocks(device: torch.device) -> list[dict]:
    """Time the step kernel's block choices on the benchmark configurations' products."""
    import itertools

    module = step_ops._kernel_module()
    shapes = [(32, 32, 32, False), (32, 32, 64, True), (32, 64, 32, False), (32, 128, 128, False),
              (32, 128, 256, True), (32, 256, 128, False), (32, 128, 8, False), (256, 256, 512, True),
              (256, 256, 256, False), (256, 512, 256, False)]  # (rows, in, out, GEGLU)
    rows = []
    for m, k, n, glu in shapes:
        x = torch.randn(m, k, device=device)
        w = torch.randn(2 * n if glu else n, k, device=device)
        b = torch.randn(w.shape[0], device=device)
        timings = {}
        for bm, bn, bk, warps in itertools.product((16, 32), (16, 32, 64), (32, 64, 128), (1, 2, 4)):
            if bk > max(32, 1 << (k - 1).bit_length()) or (bm == 32 and m <= 16):
                continue
            timings[(bm, bn, bk, warps)] = graph_us(functools.partial(
                step_ops.launch_step_matmul, module, x, w, n, bias=b, glu=glu, blocks=(bm, bn, bk, warps)))
        best = min(timings, key=timings.get)
        chosen = step_ops.step_blocks(m, n, k)
        rows.append({"m": m, "k": k, "n": n, "glu": glu, "best": best, "best_us": timings[best],
                     "chosen": chosen, "chosen_us": timings.get(chosen)})
        top = sorted(timings.items(), key=lambda kv: kv[1])[:4]
        print(f"tune {m}x{k} -> {n}{' glu' if glu else ''}: best {best} {timings[best]:.2f} us; heuristic {chosen} "
              f"{timings.get(chosen, float('nan')):.2f} us; top {[(c, round(t, 2)) for c, t in top]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=parse_configs, default=[(32, 32, 16, 1), (32, 128, 64, 4)])
    parser.add_argument("--no-micro", dest="micro", action="store_false", help="skip the single-linear timings")
    parser.add_argument("--tune", action="store_true", help="time the step kernel's block choices first")
    parser.add_argument("--models", default="lru,mamba")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--replays", type=int, default=8)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    with torch.no_grad():
        results = {"tune": tune_blocks(device) if args.tune else [],
                   "matmul": matmul_micro(device) if args.micro else [], "graphs": []}
    for name in args.models.split(","):
        for config in args.configs:
            batch, d_model, d_state, layers = config
            torch.manual_seed(0)
            model = SequenceModel(name, d_input=8, d_output=8, d_model=d_model, d_state=d_state,
                                  n_layers=layers).to(device)
            for mode in args.modes.split(","):
                with rollout_mode(model, "cuda"), matmul_mode(mode):
                    graph = StepGraph(model, batch, 8, chunk=args.chunk, device=device)
                wall, table = profile_graph(graph, args.replays)
                graph.release()
                busy = sum(us for _, us in table.values())
                launches = sum(n for n, _ in table.values())
                print(f"\n== {name} {config} {mode}: wall {wall:.1f} us/step, kernels busy {busy:.1f} us/step, "
                      f"{launches:.1f} kernels/step", flush=True)
                for kname, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:args.top]:
                    print(f"   {us:7.2f} us  {n:5.2f}x  {kname}")
                results["graphs"].append({"model": name, "config": config, "mode": mode, "wall_us": wall,
                                          "busy_us": busy, "kernels": launches, "table": table})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
