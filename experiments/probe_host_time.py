"""Host time and whole-call time of `fused_steps`: every call launched eagerly vs a repeated call replayed
as one CUDA graph (`fused.call_graph`).

For each model and configuration, two modes interleaved call by call after a warm-up (so that
clocks and neighbours hit both alike): "eager" (`call_graph.ENABLED = False`: checks, packing
replay, buffers and Triton's launcher at every call) and "replayed" (the call graph). Per call:
"host" is the host time until `fused_steps` returns (the GPU still running), "wall" the CUDA-event
time from before the call to after its last GPU work, as `benchmark_rollout` times it. Both
modes' outputs are compared before timing (they must be equal: same kernel, same inputs).

With --breakdown, also the host time of each piece of a replayed call (median of --rounds, each
piece timed alone, the GPU idle before it). With --kernel, a third mode in the same interleaving:
the kernel launch alone (buffers and packing made once, Triton's launcher called directly), whose
wall time is the kernel's; the replayed call's wall time less it is what the call adds (host time
before the graph launch, and the graph's packing and state-layout nodes before the kernel).

    python experiments/probe_host_time.py --configs "32,32,16,1;32,128,64,4" --models lru,s5 --steps 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from lrnn_lightning.models import SequenceModel  # noqa: E402
from lrnn_lightning.rollout.fingerprint import model_signature  # noqa: E402
from lrnn_lightning.rollout.fused import call_graph, fused_steps, fused_support  # noqa: E402
from lrnn_lightning.rollout.fused.config import processor_count  # noqa: E402
from lrnn_lightning.rollout.fused.launch import build_call, default_launch, kernel_module  # noqa: E402
from lrnn_lightning.rollout.fused.pack import pack_model  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(host seconds until fn() returns, CUDA-event seconds of all it queued)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    fn()
    host = time.perf_counter() - t0
    end.record()
    end.synchronize()
    return host, start.elapsed_time(end) / 1e3


def host_us(fn, rounds: int) -> float:
    """Median host microseconds of fn(), the GPU idle before each call."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(times)


def breakdown(model, x0, state, steps: int, rounds: int) -> dict:
    """Host microseconds of the pieces of a replayed `fused_steps` call (see launch.fused_steps)."""
    signature = model_signature(model)
    key = call_graph.CallKey.of(x0, state, steps, None, torch.float32, "ieee", None)
    def not_captured():
        raise AssertionError("the call is not captured yet")

    graph = call_graph.replayed_call(model, signature, key, not_captured)
    assert graph is not None, "the call is not captured yet"
    out, _ = graph.replay(x0, state, None)
    return {
        "model_signature": host_us(lambda: model_signature(model), rounds),
        "fused_support (kept answer)": host_us(lambda: fused_support(model, None, signature=signature), rounds),
        "CallKey.of": host_us(lambda: call_graph.CallKey.of(x0, state, steps, None, torch.float32, "ieee", None),
                              rounds),
        "replayed_call (lookup)": host_us(lambda: call_graph.replayed_call(model, signature, key, not_captured),
                                          rounds),
        "copy inputs (_foreach_copy_)": host_us(lambda: torch._foreach_copy_(graph.inputs, [x0, *state.values()]),
                                                rounds),
        "graph.replay()": host_us(graph.graph.replay, rounds),
        "copy the output out": host_us(lambda: out[:, 1:].to(x0.dtype, copy=True), rounds),
        "fused_steps (all)": host_us(lambda: fused_steps(model, x0, state, steps), rounds),
    }


def probe(name: str, config: tuple[int, int, int, int], args) -> list[dict]:
    batch, d_model, d_state, layers = config
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=args.width, d_output=args.width, d_model=d_model, d_state=d_state,
                          n_layers=layers).cuda().eval()
    x0 = torch.randn(batch, args.width, device="cuda")
    with torch.no_grad():
        _, state = model.prefill(torch.randn(batch, 8, args.width, device="cuda"))
    outputs = {}
    if args.kernel:
        packed = pack_model(model, torch.float32, False)
        config = default_launch(packed, batch, torch.float32, "ieee", processor_count(x0.device))
        call = build_call(packed, x0, state, args.steps, None, "ieee", config, interpreted=False)
        kernels = kernel_module()
    for mode in ("eager", "replayed"):
        call_graph.ENABLED = mode == "replayed"
        for _ in range(3):  # compile, see, capture
            outputs[mode] = fused_steps(model, x0, state, args.steps)
    torch.cuda.synchronize()
    equal = torch.equal(outputs["eager"], outputs["replayed"])
    modes = [*outputs, *(["kernel"] if args.kernel else [])]
    times = {mode: ([], []) for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            call_graph.ENABLED = mode == "replayed"
            if mode == "kernel":
                host, wall = timed(lambda: call.launch(kernels))
            else:
                host, wall = timed(lambda: fused_steps(model, x0, state, args.steps))
            times[mode][0].append(host)
            times[mode][1].append(wall)
    call_graph.ENABLED = True
    if args.breakdown:
        for piece, value in breakdown(model, x0, state, args.steps, args.rounds).items():
            print(f"  {name} {config} replayed, host us: {piece:32s} {value:7.1f}", flush=True)
    rows = []
    for mode, (host, wall) in times.items():
        rows.append({"model": name, "config": config, "steps": args.steps, "mode": mode, "equal": equal,
                     "host_us": 1e6 * statistics.median(host), "wall_us": 1e6 * statistics.median(wall),
                     "us_per_step": 1e6 * statistics.median(wall) / args.steps})
        print(f"{name} {config} {mode:8s}: host {rows[-1]['host_us']:7.1f} us, wall {rows[-1]['wall_us']:8.1f} us "
              f"({rows[-1]['us_per_step']:.2f} us/step), replay == eager: {equal}", flush=True)
    if args.kernel:
        added = rows[1]["wall_us"] - rows[2]["wall_us"]
        print(f"{name} {config} the replayed call adds {added:.1f} us to the kernel's {rows[2]['wall_us']:.1f} "
              f"({added / args.steps:.2f} us/step at {args.steps} steps)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="32,32,16,1", help="B,d_model,d_state,layers; several joined by ';'")
    parser.add_argument("--models", default="lru,s5")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--breakdown", action="store_true", help="also time the pieces of a replayed call")
    parser.add_argument("--kernel", action="store_true", help="also time the kernel launch alone")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the call graphs are CUDA graphs)")
    configs = [tuple(int(v) for v in part.split(",")) for part in args.configs.split(";")]
    rows = [row for config in configs for name in args.models.split(",") for row in probe(name, config, args)]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
