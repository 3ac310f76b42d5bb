"""The fused rollout backend: the whole autoregressive rollout of a SequenceModel as one Triton kernel.

    ok, why = fused_support(model)                        # covered here? and why not
    backend, reason = choose_backend(model, fused="auto")  # "fused" | "graph" | "loop"
    out = fused_rollout(model, context, horizon=200)       # (B, 200, H), same contract as RolloutEngine.rollout

Modules: `support` (coverage, Triton and device checks; imports no Triton), `selection`
(backend choice), `pack` (live weights -> kernel tensors), `pack_graph` (that packing replayed
as a CUDA graph), `call_graph` (a repeated call's packing and launch replayed as one graph),
`config` (launch shape: rows per program from the batch and the GPU's SM count), `launch`
(which kernel, state layout, launch), `aot` (compile for a GPU on the host),
`kernels/` (the Triton source, imported on first launch: `registers.py`, activations in
registers, for LRU, S5 and Mamba where their width fits, with `resident.py` for one-layer
LRU / S5 models whose weights and state stay in registers; `phased.py`, LRU and S5 at large
batch, every step's products in tiles shared by the whole grid (`phased_launch`); `rollout.py`,
activations through per-program memory, for every covered mixer and width).

Wired into `RolloutEngine(fused=False|True|"auto", fused_precision=None)` and the callback
(`generation.fused`, issue #6): inside `rollout` and its `rollout_mode` block the engine asks
`selection.choose_fused(model, fused, weight_dtype, on_gpu)` (the fused half of `choose_backend`;
weight_dtype bf16 under a bf16 autocast), prefills in PyTorch and runs `fused_steps` when that
says fused (no padding or batch splitting), re-raises `FusedKernelError` when fused=True was
asked for and otherwise warns once and keeps the graph path, and reports `stats.path = backend`
and `stats.backend_reason`; the callback logs `rollout/uses_fused`, the path of every process
("mixed" when they differ) and rank zero's reason.
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
