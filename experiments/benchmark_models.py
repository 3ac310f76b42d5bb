"""Parallel forward(+backward) throughput of every mixer vs a Python loop of `step`.

Issue #2's benchmark: tokens/s of `SequenceModel.forward` + backward at B=32, L=2048,
d_model=128, 4 layers, and tokens/s of the recurrent step loop at the same size (timed over
`--loop-steps` steps and reported per token), so the parallel/loop ratio is visible.

    python experiments/benchmark_models.py --out results.json            # on a GPU
    python experiments/benchmark_models.py --device cpu --batch 2 --length 64 --d-model 16 \
        --layers 1 --loop-steps 8 --repeats 1                           # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_rollout import median_seconds  # noqa: E402  (puts the checkout on sys.path too)

from lrnn_lightning.models import MIXERS, build_model  # noqa: E402

D_STATE = {"lru": 64, "s4d": 64, "s5": 64, "mamba": 16, "rglru": 64}


def bench_mixer(name: str, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(name, d_input=args.d_model, d_model=args.d_model, d_state=D_STATE[name],
                        n_layers=args.layers).to(device)
    x = torch.randn(args.batch, args.length, args.d_model, device=device)
    tokens = args.batch * args.length

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    def fwd():
        with torch.no_grad():
            model(x)

    def loop():
        with torch.no_grad():
            state = model.allocate_state(args.batch, device, torch.float32)
            for t in range(args.loop_steps):
                model.step(x[:, t], state)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fb = median_seconds(fwd_bwd, device, args.repeats)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    t_f = median_seconds(fwd, device, args.repeats)
    t_loop = median_seconds(loop, device, max(1, args.repeats // 2))
    loop_tok_s = args.batch * args.loop_steps / t_loop
    return {
        "mixer": name, "fwd_bwd_tok_s": tokens / t_fb, "fwd_tok_s": tokens / t_f, "loop_tok_s": loop_tok_s,
        "fwd_vs_loop": (tokens / t_f) / loop_tok_s, "peak_fwd_bwd_GiB": peak_gb,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=list(MIXERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--loop-steps", type=int, default=256, help="steps timed in the step loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.loop_steps = min(args.loop_steps, args.length)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for name in args.mixers:
        row = bench_mixer(name, args, device)
        rows.append(row)
        print(f"{name}: done", flush=True)
    header = (f"B={args.batch} L={args.length} d_model={args.d_model} layers={args.layers} on "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"\n{header}\n")
    print("| mixer | d_state | fwd+bwd tok/s | fwd tok/s | step-loop tok/s | fwd / loop | peak fwd+bwd GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mixer']} | {D_STATE[r['mixer']]} | {r['fwd_bwd_tok_s']:.3g} | {r['fwd_tok_s']:.3g} | "
              f"{r['loop_tok_s']:.3g} | {r['fwd_vs_loop']:.0f}x | {r['peak_fwd_bwd_GiB']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "device": header, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
