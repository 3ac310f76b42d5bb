"""The fused rollout backend: the whole autoregressive rollout of a SequenceModel as one Triton kernel.

    ok, why = fused_support(model)                        # covered here? and why not
    backend, reason = choose_backend(model, fused="auto")  # "fused" | "graph" | "loop"
    out = fused_rollout(model, context, horizon=200)       # (B, 200, H), same contract as RolloutEngine.rollout

Modules: `support` (coverage, Triton and device checks; imports no Triton), `selection`
(backend choice), `pack` (live weights -> kernel tensors), `launch` (prefill, state
layout, launch), `aot` (compile for a GPU on the host), `kernels/` (the Triton source,
imported on first launch).
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
