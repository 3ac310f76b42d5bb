"""A/B timing of the whole-model-resident kernel paths (kernels/resident.py) against the per-step loads they replace.

Kernel launches alone (buffers built once), the paths interleaved launch by launch, after
a warm-up, so that clock ramps and neighbours on a shared machine hit them alike; µs per step
= median launch time / steps. One launch shape (one row a program), three values of the
register kernel's RESIDENT constexpr: "row" (2, `resident_row_steps`, the default at one row),
"tile" (1, `resident_modal_steps`, the default for tiles of 2+ rows) and "per-step" (0: same
arithmetic, weights and state re-read every step). Each path's outputs are checked against
the per-step path's before any timing.

    python experiments/probe_resident.py --configs "32,32,16,1" --models lru,s5 --warps 4,8
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

import torch

from lrnn_lightning.models import SequenceModel
from lrnn_lightning.rollout.fused import launch
from lrnn_lightning.rollout.fused.config import small_tile_config
from lrnn_lightning.rollout.fused.pack import pack_model


def launch_seconds(call, kernels) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call.launch(kernels)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


PATHS = {"row": launch.ROW_RESIDENT, "tile": launch.TILE_RESIDENT, "per-step": 0}


def with_resident(call, value):
    """A copy of `call` with RESIDENT = value and buffers of its own (outputs, states)."""
    out, states = call.out.clone(), call.states.clone()
    args = tuple(out if a is call.out else states if a is call.states else a for a in call.args)
    return replace(call, args=args, constexprs={**call.constexprs, "RESIDENT": value}, out=out, states=states)


def check_paths_agree(calls, kernels) -> None:
    """One launch of every path from the same start: outputs and final states within fp32 rounding of each other."""
    results = {}
    for key, call in calls.items():
        out, states = call.out.clone(), call.states.clone()
        call.launch(kernels)
        torch.cuda.synchronize()
        results[key] = (call.out.clone(), call.states.clone())
        call.out.copy_(out)
        call.states.copy_(states)
    for key, (out, states) in results.items():
        ref_out, ref_states = results[(key[0], "per-step")]
        error = max(float((out - ref_out).abs().max() / ref_out.abs().max()),
                    float((states - ref_states).abs().max() / ref_states.abs().max()))
        print(f"{key}: max relative difference from per-step {error:.2e}", flush=True)
        if error > 1e-4:
            raise SystemExit(f"{key} disagrees with the per-step path: {error:.2e}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="32,32,16,1", help="B,d_model,d_state,layers;...")
    parser.add_argument("--models", default="lru,s5")
    parser.add_argument("--warps", default="4,8,16")
    parser.add_argument("--width", type=int, default=1, help="input/output features (benchmark_fused.py: 8)")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this probe needs a CUDA GPU")
    device = torch.device("cuda")
    kernels = launch.kernel_module()
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, {args.steps} steps a launch, {args.rounds} rounds", flush=True)
    for name in args.models.split(","):
        for text in args.configs.split(";"):
            batch, d_model, d_state, layers = (int(v) for v in text.split(","))
            torch.manual_seed(0)
            model = SequenceModel(name, d_input=args.width, d_output=args.width, d_model=d_model, d_state=d_state,
                                  n_layers=layers).to(device).eval()
            packed = pack_model(model, torch.float32, event=False)
            x0 = torch.randn(batch, args.width, device=device)
            calls = {}
            for warps in (int(w) for w in args.warps.split(",")):
                config = replace(small_tile_config(1), num_warps=warps)
                call = launch.build_call(packed, x0, None, args.steps, None, "ieee", config, interpreted=False)
                if not call.constexprs.get("RESIDENT", 0):
                    print(f"{name} {text} {warps} warps: not resident, skipped", flush=True)
                    continue
                for path, value in PATHS.items():
                    calls[(warps, path)] = with_resident(call, value)
            check_paths_agree(calls, kernels)
            for call in calls.values():  # compile and warm up
                for _ in range(5):
                    call.launch(kernels)
            times = {key: [] for key in calls}
            for _ in range(args.rounds):
                for key, call in calls.items():
                    times[key].append(launch_seconds(call, kernels))
            for (warps, path), values in times.items():
                row = {"model": name, "config": text, "num_warps": warps, "path": path,
                       "us_per_step": 1e6 * sorted(values)[len(values) // 2] / args.steps,
                       "us_per_step_min": 1e6 * min(values) / args.steps}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
