"""Microseconds per autoregressive rollout step: the fused Triton kernel vs the CUDA-graph engine vs the seed scheme.

Variants, all on the same card in one run, each from a zeroed state and the same x0:
    seed          the seed's scheme: a ONE-step CUDA graph replayed from Python per step, two copies per step
    graph         the engine's StepGraph with chunk=16 steps per replay (RolloutEngine chunk=16)
    fused         one launch of the fused kernel for the whole rollout, fp32 weights, exact fp32 dots ("ieee")
    fused-tf32x3  the same with 3xTF32 tensor-core dots (about fp32 accuracy)
    fused-bf16    bf16 matmul weights and operands, fp32 accumulation, state and activations
The fused "µs/step" is a whole fused_steps call (packing the live weights, a few dozen small
PyTorch ops, buffer set-up, launch) divided by the steps; "pre-packed" skips the packing;
"kernel" times the launch alone, replayed from a CUDA graph so that Triton's host-side launch (tens
of µs for the register kernel's ~50 arguments, while the GPU waits) is left out, as the engine's
call graphs leave it out from a shape's second call on ("kernel_eager" in --out keeps the eager
launch's time, which the per-shape lines printed while tuning also show). GB/s is the kernel's:
weight bytes read per step / kernel time.
For each fused variant the launch shapes (KernelConfig) are timed briefly and the best is kept:
always `default_launch` for this model, batch and GPU's SM count (what fused_steps launches),
then each block_b of --block-bs (1, 2, 4, 8: small tiles without tl.dot; 16, 32, 64: tl.dot),
then, unless --no-tune, a few tl.dot shapes; every shape's time is printed. Next to each time:
the bytes of weights read per step (fused: every program streams every weight each step, so
programs x weights; graph and seed: each weight once) and the bandwidth that implies, the
arithmetic rate of the step's matrix products (TFLOP/s, against the card's peak: an H100 SXM does
67 in fp32 without tensor cores), and the relative deviation from the graph's outputs.

    python experiments/benchmark_fused.py --out fused.json                    # the issue's configurations
    python experiments/benchmark_fused.py --configs "32,32,16,1" --variants graph,fused --no-tune
    python experiments/benchmark_fused.py --block-bs 1,2,4,8,16 --no-tune     # which block_b is best where

Rows are printed and written to --out as each configuration finishes, so a run cut short keeps
what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the seed baseline and timing: benchmark_rollout.py
from benchmark_rollout import SeedStyleGraph, add_rollout_arguments, median_seconds, parse_variants  # noqa: E402 (puts the checkout first)

from lrnn_lightning.models import SequenceModel
from lrnn_lightning.rollout import StepGraph
from lrnn_lightning.rollout.fused import KernelConfig, fused_steps
from lrnn_lightning.rollout.fused import launch as fused_launch
from lrnn_lightning.rollout.fused.config import (
    BLOCK_BS,
    SMALL_BLOCK_BS,
    dot_tile_config,
    processor_count,
    small_tile_config,
)
from lrnn_lightning.rollout.fused.launch import build_call, default_launch, kernel_module
from lrnn_lightning.rollout.fused.launch import weight_bytes as packed_weight_bytes
from lrnn_lightning.rollout.fused.pack import pack_model
from lrnn_lightning.rollout.inference import rollout_mode
from lrnn_lightning.rollout.step_graph import capture_graph

CONFIGS = [(32, 32, 16, 1), (32, 128, 64, 4), (256, 128, 64, 4), (1024, 512, 128, 8)]  # (B, d_model, d_state, L)
VARIANTS = ("seed", "graph", "fused", "fused-tf32x3", "fused-bf16")
FUSED = {"fused": (torch.float32, "ieee"), "fused-tf32x3": (torch.float32, "tf32x3"),
         "fused-bf16": (torch.bfloat16, "ieee")}
# issue #6: absolute µs/step for the two small configurations, speed-up over the graph for the two large ones
TARGETS = {(32, 32, 16, 1): ("us", 2.0), (32, 128, 64, 4): ("us", 10.0),
           (256, 128, 64, 4): ("vs_graph", 5.0), (1024, 512, 128, 8): ("vs_graph", 5.0)}
CANDIDATES = {  # (block_b, block_n, block_k, num_warps)
    "ieee": [(16, 64, 16, 4), (16, 64, 32, 4), (16, 64, 16, 8), (32, 64, 16, 8)],
    "mma": [(16, 64, 32, 4), (32, 64, 32, 8), (64, 64, 32, 8)],
}


def build_baseline(variant: str, model: nn.Module, batch: int, width: int, chunk: int,
                   device: torch.device) -> tuple[Callable[[Tensor, int], Tensor], Callable[[], None]]:
    """(run(x0, num_steps) -> (B, num_steps, width) from a zeroed state, release()) for "seed" or "graph"."""
    if variant == "seed":
        return SeedStyleGraph(model, batch, width, device).run, lambda: None
    graph = StepGraph(model, batch, width, chunk=chunk, device=device)

    def replay(x0: Tensor, num_steps: int) -> Tensor:
        out = torch.empty(batch, num_steps, width, device=device)
        graph.run(x0, num_steps, out)
        return out
    return replay, graph.release


def cuda_median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median CUDA-event time of `fn()` over `repeats` runs after one warm-up."""
    return median_seconds(fn, torch.device("cuda"), repeats)


def kernel_seconds(call, kernels, repeats: int) -> float:
    """Median GPU time of one launch of `call` (a `launch.KernelCall`, compiled by an earlier launch), replayed
    from a CUDA graph: the kernel's own time, without Triton's host-side launch in front of it."""
    graph, _ = capture_graph(call.out.device, lambda: call.launch(kernels))
    return cuda_median_seconds(graph.replay, repeats)


def weight_bytes(model: SequenceModel, weight_dtype: torch.dtype) -> int:
    """Bytes of everything the fused kernel reads as weights per step (matrices in weight_dtype, vectors fp32)."""
    return packed_weight_bytes(pack_model(model, weight_dtype, event=False))


def matmul_flop(model: SequenceModel, batch: int) -> int:
    """FLOP of one step's matrix products for `batch` rows, as torch.utils.flop_counter counts the model's own
    `step` (on a CPU copy, where no custom step kernel hides them); elementwise work is left out."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu = copy.deepcopy(model).cpu().eval()
    state = cpu.allocate_state(batch, torch.device("cpu"))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cpu.step(torch.randn(batch, cpu.d_input), state)
    return int(counter.get_total_flops())


def candidate_configs(variant: str, batch: int) -> list[KernelConfig]:
    """The tl.dot shapes of the tuning (--tune)."""
    key = "ieee" if FUSED[variant] == (torch.float32, "ieee") else "mma"
    configs = [KernelConfig(block_b=b, block_n=n, block_k=k, num_warps=w) for b, n, k, w in CANDIDATES[key]]
    return [c for c in configs if c.block_b <= max(16, batch)]


def block_b_config(variant: str, block_b: int) -> KernelConfig:
    """The shape `default_config` would give `block_b` rows a program (for --block-bs)."""
    if block_b in SMALL_BLOCK_BS:
        return small_tile_config(block_b)
    return dot_tile_config(block_b, tensor_cores=FUSED[variant] != (torch.float32, "ieee"))


def launch_shapes(variant: str, packed, batch: int, n_sms: int, block_bs: list[int], tune: bool,
                  activations: list[str] = ("auto",), warps: list[int] = (),
                  splits: list[int] = ()) -> list[tuple[str, KernelConfig]]:
    """(label, shape) to time, the default (`default_launch`: what fused_steps takes) first, without repeats;
    every shape once per `activations`
    value (kernel choice), besides its own num_warps once per `warps`, and besides its own (default)
    split once per `splits`."""
    base = [("default", default_launch(packed, batch, *FUSED[variant], n_sms))]
    base += [(f"block_b={b}", block_b_config(variant, b)) for b in block_bs]
    if tune:
        base += [("tune", c) for c in candidate_configs(variant, batch)]
    shapes = []
    for label, config in base:
        for kind in activations:
            for num_warps in [config.num_warps, *warps]:
                for split in [config.split, *splits]:
                    # "auto" keeps a shape's own kernel choice (the default may name "phased")
                    chosen = config.activations if kind == "auto" else kind
                    shape = replace(config, activations=chosen, num_warps=num_warps, split=split)
                    suffix = "" if shape == config else f" {kind} w{num_warps}"
                    suffix += f" split{split}" if split is not None else ""
                    shapes.append((label + suffix, shape))
    seen, unique = set(), []
    for label, config in shapes:
        if config not in seen:
            seen.add(config)
            unique.append((label, config))
    return unique


def shape_label(config: dict, programs: int) -> str:
    return (f"b{config['block_b']} n{config['block_n']} k{config['block_k']} w{config['num_warps']} "
            f"{config.get('activations', 'auto')} split {config.get('split') or 'auto'} ({programs} row tiles)")


def time_fused(model, x0, variant: str, args, deadline: float) -> dict:
    """Time the best of the candidate launch shapes (each gets a short timing first).

    Returns seconds per step with the weights packed per launch ("seconds", what a rollout costs: a
    repeated call, so packing and launch replay as one CUDA graph, `fused.call_graph`), with them packed
    once and launched eagerly ("prepacked"), and of the kernel launch alone ("kernel"); the shape
    ("config"), every shape tried ("tried") and the outputs ("out").
    """
    weight_dtype, precision = FUSED[variant]
    tried = []
    best = None
    n_sms = processor_count(x0.device)
    packed = pack_model(model, weight_dtype, event=False, fold=True)  # folded copies too: for phased launches
    kernels = kernel_module()
    for label, config in launch_shapes(variant, packed, x0.shape[0], n_sms, args.block_bs, args.tune,
                                       args.activations, args.warps, args.splits):
        if best is not None and time.perf_counter() > deadline:
            tried.append({"config": vars(config), "label": label, "skipped": "time budget"})
            continue

        def run(config=config, steps=args.steps):
            return fused_steps(model, x0, None, steps, weight_dtype=weight_dtype, precision=precision, config=config)
        try:
            start = time.perf_counter()
            run(steps=2)  # compiles
            compile_s = time.perf_counter() - start
            short = min(args.steps, 64)
            run(steps=short)  # the first call of a shape launches eagerly, the second (the warm-up below) captures
            seconds = cuda_median_seconds(lambda config=config, short=short: run(config, short), 2) / short
            call = build_call(packed, x0, None, short, None, precision, config, interpreted=False)
            kernel_s = cuda_median_seconds(lambda call=call: call.launch(kernels), 3) / short
        except Exception as error:  # one shape may not fit this GPU; keep trying the others
            tried.append({"config": vars(config), "label": label,
                          "error": f"{type(error).__name__}: {str(error)[:300]}"})
            continue
        tried.append({"config": vars(config), "label": label, "us_per_step_short": 1e6 * seconds,
                      "us_per_step_kernel_short": 1e6 * kernel_s, "compile_s": compile_s,
                      "resident": bool(call.constexprs.get("RESIDENT", False))})
        if best is None or seconds < best[0]:
            best = (seconds, config, run)
    if best is None:
        raise RuntimeError(f"every launch shape failed: {tried}")
    best[2]()  # seen once: the warm-up in cuda_median_seconds captures the call, the timed runs replay it
    seconds = cuda_median_seconds(best[2], args.repeats) / args.steps
    prepacked = cuda_median_seconds(lambda: fused_steps(model, x0, None, args.steps, weight_dtype=weight_dtype,
                                                   precision=precision, config=best[1], packed=packed),
                               args.repeats) / args.steps
    # the launch alone, on buffers built once (the state keeps evolving between runs: same cost)
    call = build_call(packed, x0, None, args.steps, None, precision, best[1], interpreted=False)
    kernel_eager = cuda_median_seconds(lambda: call.launch(kernels), args.repeats) / args.steps
    kernel_only = kernel_seconds(call, kernels, args.repeats) / args.steps
    return {"seconds": seconds, "prepacked": prepacked, "kernel": kernel_only, "kernel_eager": kernel_eager,
            "config": best[1], "tried": tried,
            "kernel_name": call.kernel, "split": call.constexprs.get("SPLIT", 1), "exchange": exchange_protocol(call),
            "out": best[2]()}


def exchange_protocol(call) -> str | None:
    """How a split launch's programs exchange partial sums (kernels/group.py); None for an unsplit one."""
    if call.constexprs.get("SPLIT", 1) == 1:
        return None
    return "tagged" if call.constexprs.get("TAGGED") else "counter"


def bench_config(name: str, config: tuple[int, int, int, int], args, deadline: float) -> list[dict]:
    batch, d_model, d_state, layers = config
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=args.width, d_output=args.width, d_model=d_model, d_state=d_state,
                          n_layers=layers).to(device)
    x0 = torch.randn(batch, args.width, device=device)
    flop = matmul_flop(model, batch)
    rows, outputs = [], {}
    with rollout_mode(model, device.type):
        for variant in args.variants:
            row = {"model": name, "B": batch, "d_model": d_model, "d_state": d_state, "layers": layers,
                   "variant": variant}
            try:
                if variant in FUSED:
                    timing = time_fused(model, x0, variant, args, deadline)
                    seconds, best, out = timing["seconds"], timing["config"], timing["out"]
                    row["us_per_step_prepacked"] = 1e6 * timing["prepacked"]
                    row["us_per_step_kernel"] = 1e6 * timing["kernel"]
                    row["us_per_step_kernel_eager"] = 1e6 * timing["kernel_eager"]
                    n_programs = -(-batch // best.block_b)
                    # the split the launch resolved (None: default_split's choice), and which kernel ran
                    row.update(config=vars(replace(best, split=timing["split"])), kernel=timing["kernel_name"],
                               exchange=timing["exchange"], tried=timing["tried"], programs=n_programs,
                               weight_bytes=weight_bytes(model, FUSED[variant][0]))
                    row["bytes_read_per_step"] = n_programs * row["weight_bytes"]
                    print_shapes(variant, batch, timing["tried"])
                else:
                    fn, release = build_baseline(variant, model, batch, args.width, args.chunk, device)
                    out = fn(x0, args.steps)
                    seconds = cuda_median_seconds(lambda fn=fn: fn(x0, args.steps), args.repeats) / args.steps
                    release()
                    row["weight_bytes"] = weight_bytes(model, torch.float32)
                    row["bytes_read_per_step"] = row["weight_bytes"]
                row["us_per_step"] = 1e6 * seconds
                # the kernel's own bandwidth and arithmetic rate for fused rows; graph and seed read each weight
                # once per step
                row["GBps"] = row["bytes_read_per_step"] / (row.get("us_per_step_kernel", row["us_per_step"]) * 1e3)
                row["flop_per_step"] = flop
                row["TFLOPs"] = row["flop_per_step"] / (row.get("us_per_step_kernel", row["us_per_step"]) * 1e6)
                outputs[variant] = out
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
                traceback.print_exc()
            rows.append(row)
    reference = outputs.get("graph")
    times = {r["variant"]: r["us_per_step"] for r in rows if "us_per_step" in r}
    for row in rows:
        if row["variant"] in outputs and reference is not None:
            out = outputs[row["variant"]].float()
            row["rel_dev_vs_graph"] = float(((out - reference).norm() / reference.norm()).item())
        if "us_per_step" in row:
            for base in ("graph", "seed"):
                if base in times:
                    row[f"speedup_vs_{base}"] = times[base] / row["us_per_step"]
        judge_target(row, config)
    del model
    torch.cuda.empty_cache()
    return rows


def print_shapes(variant: str, batch: int, tried: list[dict]) -> None:
    """One line per launch shape timed (short runs: whole fused_steps calls, and the kernel launch alone),
    so the best block_b shows."""
    for entry in tried:
        programs = -(-batch // entry["config"]["block_b"])
        result = (f"{entry['us_per_step_short']:.2f} µs/step (kernel {entry['us_per_step_kernel_short']:.2f}"
                  f"{', resident' if entry['resident'] else ''}), compile {entry['compile_s']:.1f} s"
                  if "us_per_step_short" in entry else entry.get("error", entry.get("skipped", "")))
        print(f"  {variant} B={batch} {entry['label']:>11s}: {shape_label(entry['config'], programs)}: {result}",
              flush=True)


def judge_target(row: dict, config: tuple[int, int, int, int]) -> None:
    """Attach the issue's target for this configuration, and whether a fused row meets it.

    An absolute µs/step target is judged on the kernel's own time per step (the per-rollout
    packing and launch cost is reported next to it); a speed-up target on the whole fused
    rollout against the whole graph rollout.
    """
    if config not in TARGETS or not row["variant"].startswith("fused") or "us_per_step" not in row:
        return
    kind, value = TARGETS[config]
    if kind == "us":
        kernel = row.get("us_per_step_kernel", row["us_per_step"])
        row["target"], row["meets_target"] = f"kernel <= {value:g} µs/step", kernel <= value
    elif "speedup_vs_graph" in row:
        row["target"], row["meets_target"] = f">= {value:g}x graph", row["speedup_vs_graph"] >= value


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | B | d_model | d_state | L | variant | µs/step | pre-packed | kernel | vs graph | vs seed "
            "| weights MB | read MB/step | GB/s | TFLOP/s | rel. dev. vs graph | launch shape | target |")
    lines = [head, "|" + "---|" * 18]
    for r in rows:
        shape = ""
        if "config" in r:
            shape = shape_label(r["config"], r["programs"])
            shape += f", {r['exchange']} exchange" if r.get("exchange") else ""
        target = f"{r['target']}: {'met' if r['meets_target'] else 'MISSED'}" if "target" in r else ""
        if "error" in r:
            cells = [r["model"], r["B"], r["d_model"], r["d_state"], r["layers"], r["variant"],
                     "error: " + r["error"][:80]]
            cells += [""] * 11
        else:
            cells = [r["model"], r["B"], r["d_model"], r["d_state"], r["layers"], r["variant"],
                     f"{r['us_per_step']:.2f}",
                     f"{r['us_per_step_prepacked']:.2f}" if "us_per_step_prepacked" in r else "",
                     f"{r['us_per_step_kernel']:.2f}" if "us_per_step_kernel" in r else "",
                     f"{r['speedup_vs_graph']:.2f}x" if "speedup_vs_graph" in r else "",
                     f"{r['speedup_vs_seed']:.2f}x" if "speedup_vs_seed" in r else "",
                     f"{r['weight_bytes'] / 1e6:.2f}", f"{r['bytes_read_per_step'] / 1e6:.2f}", f"{r['GBps']:.0f}",
                     f"{r['TFLOPs']:.2f}" if "TFLOPs" in r else "",
                     f"{r['rel_dev_vs_graph']:.1e}" if "rel_dev_vs_graph" in r else "", shape, target]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_block_bs(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in BLOCK_BS]
    if bad:
        raise argparse.ArgumentTypeError(f"block_b values {bad} not in {BLOCK_BS}")
    return values


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rollout_arguments(parser, CONFIGS, "lru", VARIANTS, "issue #6")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="fused: skip the tl.dot tuning shapes (the default and --block-bs are still timed)")
    parser.add_argument("--block-bs", type=parse_block_bs, default=[],
                        help=f"fused: also time these rows per program (comma-separated, of {BLOCK_BS})")
    parser.add_argument("--activations", type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
                        default=["auto"], help="fused: time each shape with these kernel choices "
                        "(auto: each shape's own, registers, scratch, phased; comma-separated; a choice that cannot "
                        "run the model is skipped)")
    parser.add_argument("--warps", type=lambda text: [int(v) for v in text.split(",") if v.strip()], default=[],
                        help="fused: also time each shape with these num_warps (comma-separated)")
    parser.add_argument("--splits", type=lambda text: [int(v) for v in text.split(",") if v.strip()], default=[],
                        help="fused: also time each shape split over these programs per row tile (comma-separated; "
                             "the register kernel only)")
    parser.add_argument("--no-resident", action="store_true",
                        help="fused: run one-layer LRU / S5 models through the register kernel's per-step "
                             "loads instead of keeping their weights and state in registers (kernels/resident.py): "
                             "its baseline")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="stop trying further launch shapes after this many seconds (each shape compiles)")
    parser.add_argument("--out", default=None, help="write the rows as JSON to this path")
    args = parser.parse_args(argv)
    parse_variants(parser, args, VARIANTS)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (the fused kernel and the graphs run only there)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if args.no_resident:
        fused_launch.resident_fits = lambda *_: False
    torch.backends.cuda.matmul.allow_tf32 = False  # graph and seed in true fp32, like the fused "ieee" dots

    import triton
    header = (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
              f"{args.steps} steps, median of {args.repeats}, chunk {args.chunk}")
    print(header, flush=True)
    deadline = time.perf_counter() + args.budget_s
    rows: list[dict] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for config in args.configs:
            rows += bench_config(name, config, args, deadline)
            print(markdown_table([r for r in rows if (r["B"], r["d_model"], r["d_state"], r["layers"]) == config
                                  and r["model"] == name]), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"setup": header, "rows": rows}, f, indent=2)
    print("\nAll configurations:\n" + markdown_table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
