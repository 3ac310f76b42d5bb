"""How much time the rollout callback adds to a validation, graph path vs loop path.

Builds the configured run three times (RolloutCallback with cuda_graph=true, with
cuda_graph=false, and without the callback), trains each for a few batches, then times
`trainer.validate` (median of --repeats; the first validation, which captures the graph,
is reported separately). Prints a markdown table and the steps/s the callback logged.

    python experiments/benchmark_callback.py --out callback.json                  # GPU
    python experiments/benchmark_callback.py --device cpu --overrides experiment=smoke   # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


def run_variant(name: str, overrides: list[str], repeats: int, output_dir: str) -> dict:
    import torch
    from lightning.pytorch import seed_everything

    from lrnn_lightning.utils.training import build

    cfg = _compose(overrides + [f"paths.output_dir={output_dir}/{name}"])
    seed_everything(0, workers=True)
    parts = build(cfg)
    trainer, module, data = parts["trainer"], parts["module"], parts["datamodule"]
    trainer.fit(module, datamodule=data)

    def validate() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.validate(module, datamodule=data, verbose=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = validate()
    times = [validate() for _ in range(repeats)]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("rollout/")}
    return {"variant": name, "first_validate_s": first, "validate_s": statistics.median(times),
            "steps_per_second": metrics.get("rollout/steps_per_second"),
            "uses_graph": metrics.get("rollout/uses_graph"),
            "capture_ms": metrics.get("rollout/capture_ms"), "nrmse": metrics.get("rollout/nrmse")}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or gpu (default: gpu when CUDA is available)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every variant")
    parser.add_argument("--output-dir", default="logs/benchmark_callback")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("gpu" if torch.cuda.is_available() else "cpu")
    base = [f"trainer={device}", "trainer.max_epochs=1", "++trainer.limit_train_batches=20",
            "trainer.num_sanity_val_steps=0", "++trainer.enable_progress_bar=false", "logger=none",
            "++trainer.enable_model_summary=false", *args.overrides]
    variants = {"no rollouts": base + ["callbacks=none"],
                "loop": base + ["generation.cuda_graph=false"]}
    if device == "gpu":
        variants["graph"] = base + ["generation.cuda_graph=true"]
    rows = [run_variant(name.replace(" ", "_"), overrides, args.repeats, args.output_dir) | {"variant": name}
            for name, overrides in variants.items()]
    baseline = rows[0]["validate_s"]
    print("\n| variant | validate (s, median) | first validate (s) | added by rollouts (s) | rollout steps/s "
          "| capture ms | nrmse |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        print(f"| {r['variant']} | {r['validate_s']:.3f} | {r['first_validate_s']:.3f} | "
              f"{r['validate_s'] - baseline:+.3f} | {fmt(r['steps_per_second'], '.0f')} | "
              f"{fmt(r['capture_ms'], '.0f')} | {fmt(r['nrmse'], '.4f')} |")
    by_name = {r["variant"]: r for r in rows}
    if "graph" in by_name and by_name["graph"]["steps_per_second"] and by_name["loop"]["steps_per_second"]:
        print(f"\ngraph vs loop, rollout steps/s logged by the callback: "
              f"{by_name['graph']['steps_per_second'] / by_name['loop']['steps_per_second']:.1f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"overrides": args.overrides, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
