"""The rollout engine: prefill a context, then roll a step-protocol model out by CUDA-graph replay or a plain loop.

    engine = RolloutEngine(model, batch_size=64, chunk=16)      # graph on a GPU, loop on the CPU
    future = engine.rollout(context, horizon=200)               # (B, C, H) -> (B, 200, H)
    future = rollout(model, context, 200)                       # functional form
    handle = capture_graph(model, batch_size=4, H=3)            # the seed's API
    y = generate(model, x0, num_steps=512, graph_cache=handle)

Modules: `loop` (reference path), `step_graph` (K steps as one CUDA graph), `engine`
(path choice, padding and splitting, staleness, stats), `fused` (the whole rollout as one
Triton kernel: `RolloutEngine(model, fused="auto")`), `seed_api`, `lrnnx_adapter`.
"""

from lrnn_lightning.rollout.engine import RolloutEngine, RolloutStats, rollout
from lrnn_lightning.rollout.errors import CaptureError, StaleGraphError
from lrnn_lightning.rollout.fingerprint import describe_change, model_fingerprint
from lrnn_lightning.rollout.loop import rollout_loop, run_steps
from lrnn_lightning.rollout.lrnnx_adapter import LrnnxAdapter
from lrnn_lightning.rollout.seed_api import capture_graph, generate
from lrnn_lightning.rollout.step_graph import StepGraph

__all__ = ["CaptureError", "LrnnxAdapter", "RolloutEngine", "RolloutStats", "StaleGraphError", "StepGraph",
           "capture_graph", "describe_change", "generate", "model_fingerprint", "rollout", "rollout_loop",
           "run_steps"]
