"""The fused kernel's time against its step count: how much of a launch is per step and how much is fixed.

For each model, the default launch shape's kernel is launched alone (buffers and packing made
once, Triton's launcher called directly) at every step count of --steps, interleaved round by
round; the medians (CUDA events) are fitted with a line: fixed µs + µs per step. A 0-step launch
runs the prologue (loading the weights and the state) and the epilogue only. For scale, the same
timing of one tiny PyTorch kernel (`x.add_(0)`) is printed first.

    python experiments/probe_kernel_fixed_cost.py --configs 32,32,16,1 --models lru,s5 --steps 0,1,16,64,256,1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from lrnn_lightning.models import SequenceModel  # noqa: E402
from lrnn_lightning.rollout.fused.config import processor_count  # noqa: E402
from lrnn_lightning.rollout.fused.launch import build_call, default_launch, kernel_module  # noqa: E402
from lrnn_lightning.rollout.fused.pack import pack_model  # noqa: E402


def timed_us(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="32,32,16,1", help="B,d_model,d_state,layers; several joined by ';'")
    parser.add_argument("--models", default="lru,s5")
    parser.add_argument("--steps", default="0,1,16,64,256,1024")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    steps = [int(s) for s in args.steps.split(",")]
    kernels = kernel_module()
    tiny = torch.ones(32, device="cuda")
    floor = statistics.median(timed_us(lambda: tiny.add_(0)) for _ in range(args.rounds * 3))
    print(f"one tiny PyTorch kernel: {floor:.1f} us (CUDA events)", flush=True)
    for text in args.configs.split(";"):
        batch, d_model, d_state, layers = (int(v) for v in text.split(","))
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = SequenceModel(name, d_input=args.width, d_output=args.width, d_model=d_model, d_state=d_state,
                                  n_layers=layers).cuda().eval()
            x0 = torch.randn(batch, args.width, device="cuda")
            packed = pack_model(model, torch.float32, False)
            config = default_launch(packed, batch, torch.float32, "ieee", processor_count(x0.device))
            calls = {n: build_call(packed, x0, None, n, None, "ieee", config, interpreted=False) for n in steps}
            for call in calls.values():
                call.launch(kernels)  # compile, warm
            torch.cuda.synchronize()
            times = {n: [] for n in steps}
            for _ in range(args.rounds):
                for n, call in calls.items():
                    times[n].append(timed_us(lambda call=call: call.launch(kernels)))
            medians = {n: statistics.median(t) for n, t in times.items()}
            slope, fixed = statistics.linear_regression(list(medians), list(medians.values()))
            row = ", ".join(f"{n}: {medians[n]:.1f}" for n in steps)
            print(f"{name} ({text}) resident={call.constexprs.get('RESIDENT')} warps={call.num_warps}: "
                  f"median us by steps {{{row}}}; fit {fixed:.1f} us + {slope:.3f} us/step", flush=True)


if __name__ == "__main__":
    main()
