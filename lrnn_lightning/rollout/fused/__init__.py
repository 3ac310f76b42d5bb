"""The fused rollout backend: the whole autoregressive rollout of a SequenceModel as one Triton kernel.

    ok, why = fused_support(model)                        # covered here? and why not
    backend, reason = choose_backend(model, fused="auto")  # "fused" | "graph" | "loop"
    out = fused_rollout(model, context, horizon=200)       # (B, 200, H), same contract as RolloutEngine.rollout

Modules: `support` (coverage, Triton and device checks; imports no Triton), `selection`
(backend choice), `pack` (live weights -> kernel tensors), `launch` (prefill, state
layout, launch), `aot` (compile for a GPU on the host), `kernels/` (the Triton source,
imported on first launch).

Not wired into `RolloutEngine` or the callback yet (issue #6). The plan: the engine takes
`fused=False|True|"auto"` (and a precision); inside `rollout` and its `rollout_mode` block it
calls `choose_backend(model, fused, cuda_graph, weight_dtype)`, runs `fused_rollout` when
that says "fused" (no padding or batch splitting needed), re-raises `FusedKernelError` when
fused=True was asked for and otherwise warns once and keeps the graph path, and reports
`stats.path = backend` with the reason; the callback passes `generation.fused` through and
logs the path and reason on rank zero.
"""

from lrnn_lightning.rollout.fused.launch import (
    FusedKernelError,
    KernelConfig,
    default_config,
    fused_rollout,
    fused_steps,
)
from lrnn_lightning.rollout.fused.selection import choose_backend
from lrnn_lightning.rollout.fused.support import fused_support, interpreter_active, model_coverage, triton_version

__all__ = ["FusedKernelError", "KernelConfig", "choose_backend", "default_config", "fused_rollout", "fused_steps",
           "fused_support", "interpreter_active", "model_coverage", "triton_version"]
