"""Microseconds per autoregressive rollout step: eager loop vs the seed's one-step graph vs our K-step graph.

Variants, all on the same card in one run:
    eager     Python loop of `model.step` (lrnn_lightning.rollout.run_steps)
    seed      the seed's scheme, re-created here: a ONE-step CUDA graph replayed from Python
              per step, with two copies per step (input into the static input buffer, the
              output cloned out of the static output buffer)
    graph     ours: StepGraph with K = --chunk steps per replay, feedback and output writes inside
    compiled  ours with compile=True (torch.compile'd step, then K steps captured)
    tf32      ours (K-step graph) captured with TF32 matmuls allowed (RolloutEngine(tf32=True))
    cublas    ours (K-step graph) without the fused step kernel (models/step_ops.py): every matmul
              through cuBLAS, as before that kernel existed (LRNN_STEP_KERNELS=0)
    fused     ours, the fused backend (RolloutEngine(fused=True), issue #6): the whole rollout in one
              Triton kernel launch, live weights packed per call (`fused_steps`), exact fp32; the
              call is replayed as a CUDA graph from its second run on (`fused.call_graph`: the
              untimed first run and the warm-up are its first two)
    graph-bf16  ours (K-step graph) captured under a bf16 autocast (RolloutEngine(autocast_dtype=torch.bfloat16))
    fused-bf16  the fused backend on bf16 weights, as RolloutEngine(fused=True, autocast_dtype=torch.bfloat16)
              runs it: the pair to compare with bf16 arithmetic on both sides
Every variant but cublas runs the model's step with the fused step kernel where it applies (the
seed's scheme too: it replays the same `step`).
Each time is the median of --repeats timed runs (CUDA events) after a warm-up run; next to
it, GPU kernels and copies (memcpy/memset) per step counted with torch.profiler, and the
relative deviation of the outputs from the first variant (eager by default).

    python experiments/benchmark_rollout.py --out rollout.json                       # everything, GPU
    python experiments/benchmark_rollout.py --configs 32,128,64,4 --models lru --variants eager,graph
    python experiments/benchmark_rollout.py --device cpu --configs 2,8,4,1 --steps 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from lrnn_lightning.models import SequenceModel  # noqa: E402
from lrnn_lightning.models.step_ops import use_step_kernels  # noqa: E402
from lrnn_lightning.rollout import StepGraph, run_steps  # noqa: E402
from lrnn_lightning.rollout.inference import matmul_tf32, rollout_mode  # noqa: E402

CONFIGS = [(32, 32, 16, 1), (32, 128, 64, 4), (256, 256, 64, 6), (1024, 512, 128, 8)]  # (B, d_model, d_state, layers)
VARIANTS = ("eager", "seed", "graph", "compiled", "tf32", "cublas", "fused", "graph-bf16", "fused-bf16")
GPU_ONLY = set(VARIANTS) - {"eager"}
GRAPHS = ("graph", "compiled", "tf32", "cublas", "graph-bf16")  # variants that replay a StepGraph of --chunk steps


class SeedStyleGraph:
    """The seed's generation scheme: one step per graph, replayed from Python with a copy in and a clone out."""

    def __init__(self, model: nn.Module, batch: int, width: int, device: torch.device, n_warmups: int = 3):
        self.static_x = torch.zeros(batch, width, device=device)
        self.static_state = model.allocate_state(batch, device, torch.float32)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(n_warmups):
                model.step(self.static_x, self.static_state)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_y = model.step(self.static_x, self.static_state)

    def run(self, x0: Tensor, num_steps: int) -> Tensor:
        for tensor in self.static_state.values():
            tensor.zero_()
        x, outputs = x0, []
        for _ in range(num_steps):
            self.static_x.copy_(x)
            self.graph.replay()
            x = self.static_y.clone()
            outputs.append(x)
        return torch.stack(outputs, 1)


def build_variant(variant: str, model: nn.Module, batch: int, width: int, chunk: int,
                  device: torch.device) -> Callable[[Tensor, int], Tensor]:
    """A function (x0 (B, width), num_steps) -> (B, num_steps, width) from a zeroed state."""
    if variant == "eager":
        def eager(x0: Tensor, num_steps: int) -> Tensor:
            return run_steps(model, x0, model.allocate_state(batch, device, torch.float32), num_steps)
        return eager
    if variant == "seed":
        return SeedStyleGraph(model, batch, width, device).run
    if variant in ("fused", "fused-bf16"):
        from lrnn_lightning.rollout.fused import fused_steps

        weight_dtype = torch.bfloat16 if variant == "fused-bf16" else torch.float32
        return lambda x0, num_steps: fused_steps(model, x0, None, num_steps, weight_dtype=weight_dtype)
    autocast_dtype = torch.bfloat16 if variant == "graph-bf16" else None
    with matmul_tf32(variant == "tf32"), use_step_kernels(variant != "cublas"):
        graph = StepGraph(model, batch, width, chunk=chunk, device=device, compile=variant == "compiled",
                          autocast_dtype=autocast_dtype)

    def replay(x0: Tensor, num_steps: int) -> Tensor:
        out = torch.empty(batch, num_steps, width, device=device)
        graph.run(x0, num_steps, out)
        return out
    replay.graph = graph  # kept alive with the closure, released by the caller
    return replay


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_ops_per_step(fn: Callable[[Tensor, int], Tensor], x0: Tensor, num_steps: int) -> tuple[float, float]:
    """(kernels, memcpy/memset operations) on the GPU per step, counted by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn(x0, num_steps)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(x0, num_steps)
        torch.cuda.synchronize()
    device_ops = [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = sum(1 for name in device_ops if "memcpy" in name or "memset" in name)
    return (len(device_ops) - copies) / num_steps, copies / num_steps


def bench_config(name: str, config: tuple[int, int, int, int], args, device: torch.device) -> list[dict]:
    batch, d_model, d_state, layers = config
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=args.width, d_output=args.width, d_model=d_model, d_state=d_state,
                          n_layers=layers).to(device)
    x0 = torch.randn(batch, args.width, device=device)
    rows, reference = [], None
    with rollout_mode(model, device.type):
        for variant in args.variants:
            row = {"model": name, "B": batch, "d_model": d_model, "d_state": d_state, "layers": layers,
                   "variant": variant, "chunk": args.chunk if variant in GRAPHS else 1}
            if variant in GPU_ONLY and device.type != "cuda":
                rows.append({**row, "skipped": "needs a CUDA GPU"})
                continue
            build_start = time.perf_counter()
            fn = build_variant(variant, model, batch, args.width, args.chunk, device)
            row["setup_ms"] = 1000 * (time.perf_counter() - build_start)
            out = fn(x0, args.steps)
            reference = out if reference is None else reference
            row["max_rel_dev_vs_first"] = float(((out - reference).norm() / reference.norm()).item())
            seconds = median_seconds(lambda fn=fn: fn(x0, args.steps), device, args.repeats)
            row["us_per_step"] = 1e6 * seconds / args.steps
            counts = (gpu_ops_per_step(fn, x0, min(args.steps, 2 * args.chunk))
                      if device.type == "cuda" and args.profile else (None, None))
            row["kernels_per_step"], row["copies_per_step"] = counts
            if hasattr(fn, "graph"):
                fn.graph.release()
            rows.append(row)
            print(f"  {name} {config} {variant}: {row['us_per_step']:.1f} us/step, "
                  f"setup {row['setup_ms']:.0f} ms", flush=True)
    eager = next((r["us_per_step"] for r in rows if r["variant"] == "eager" and "us_per_step" in r), None)
    for row in rows:
        if eager and "us_per_step" in row:
            row["speedup_vs_eager"] = eager / row["us_per_step"]
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | B | d_model | d_state | layers | variant | µs/step | kernels/step | copies/step | vs eager "
            "| rel. dev. |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if "skipped" in r:
            cells = [r["model"], r["B"], r["d_model"], r["d_state"], r["layers"], r["variant"], r["skipped"]]
            cells += [""] * 4
        else:
            kernels, copies = ("n/a", "n/a") if r["kernels_per_step"] is None else \
                (f"{r['kernels_per_step']:.1f}", f"{r['copies_per_step']:.2f}")
            speedup = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else ""
            cells = [r["model"], r["B"], r["d_model"], r["d_state"], r["layers"], r["variant"],
                     f"{r['us_per_step']:.1f}", kernels, copies, speedup, f"{r['max_rel_dev_vs_first']:.1e}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_configs(text: str) -> list[tuple[int, int, int, int]]:
    configs = []
    for part in text.split(";"):
        values = tuple(int(v) for v in part.split(","))
        if len(values) != 4 or min(values) < 1:
            raise argparse.ArgumentTypeError(f"a config is B,d_model,d_state,layers (positive), got {part!r}")
        configs.append(values)
    return configs


def add_rollout_arguments(parser: argparse.ArgumentParser, configs: list, models: str, variants: tuple[str, ...],
                          source: str) -> None:
    """The options every rollout benchmark shares (this one and benchmark_fused.py)."""
    parser.add_argument("--configs", type=parse_configs, default=configs,
                        help=f"';'-separated B,d_model,d_state,layers (default: the four of {source})")
    parser.add_argument("--models", default=models, help="comma-separated mixer names")
    parser.add_argument("--variants", default=",".join(variants), help=f"comma-separated subset of {variants}")
    parser.add_argument("--steps", type=int, default=256, help="rollout steps per timed run")
    parser.add_argument("--chunk", type=int, default=16, help="K, steps per replay of the graph")
    parser.add_argument("--width", type=int, default=8, help="input/output features per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")


def parse_variants(parser: argparse.ArgumentParser, args: argparse.Namespace, variants: tuple[str, ...]) -> None:
    """Turn args.variants (comma-separated) into a list, or exit naming the unknown ones."""
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(variants))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {variants}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rollout_arguments(parser, CONFIGS, "lru,mamba", VARIANTS, "issue #3")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip kernel counting")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    parse_variants(parser, args, VARIANTS)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the same fp32 arithmetic in every variant

    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for config in args.configs:
            rows += bench_config(name, config, args, device)
    header = f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, " \
             f"torch {torch.__version__}, {args.steps} steps, median of {args.repeats}"
    print(header)
    print(markdown_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"setup": header, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
