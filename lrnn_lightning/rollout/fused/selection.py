"""`choose_backend`: which rollout backend runs (fused kernel, CUDA graph or plain loop), and why."""

from __future__ import annotations

import torch
from torch import nn

from lrnn_lightning.rollout.checks import model_device_dtype
from lrnn_lightning.rollout.fused.support import fused_support

BACKENDS = ("fused", "graph", "loop")


def choose_backend(model: nn.Module, fused: bool | str = "auto", cuda_graph: bool | str = "auto",
                   weight_dtype: torch.dtype | None = None) -> tuple[str, str]:
    """The backend a rollout of `model` takes where it lives now, with the reason to log.

    `fused="auto"` takes the fused kernel when `fused_support` says yes and the model is on
    a GPU (the Triton interpreter is never chosen automatically), else what `cuda_graph`
    gives: the graph on a GPU unless it is False, else the loop. Explicit requests that
    cannot be honoured raise instead of falling back silently.

    Args:
        model: the model to roll out (its parameters say the device).
        fused: True (require the fused kernel), False, or "auto".
        cuda_graph: True (require a CUDA graph when not fused), False, or "auto", as in RolloutEngine.
        weight_dtype: the fused kernel's matmul weight dtype the caller would use (None: the model's;
            torch.bfloat16 for a bf16 autocast rollout; float16 is not covered).

    Returns:
        (backend, reason): backend is "fused", "graph" or "loop".

    Example:
        >>> choose_backend(model.cuda(), fused="auto")
        ('fused', 'fused=auto: lru x 4 layers covered; Triton 3.1.0 on NVIDIA H100 80GB HBM3, float32')
    """
    for name, value in (("fused", fused), ("cuda_graph", cuda_graph)):
        if not (value is True or value is False or value == "auto"):
            raise ValueError(f"choose_backend: {name} must be True, False or 'auto', got {value!r}.")
    device = model_device_dtype(model, torch.empty(0))[0]
    on_gpu = device.type == "cuda" and torch.cuda.is_available()
    if fused is True:
        ok, why = fused_support(model, weight_dtype)
        if not ok:
            raise ValueError(f"choose_backend: fused=True, but the fused kernel cannot run this model: {why}. "
                             "HINT: set generation.fused=auto to fall back to the CUDA graph or the loop.")
        return "fused", f"fused=true: {why}"
    if fused == "auto":
        ok, why = fused_support(model, weight_dtype)
        if ok and on_gpu:
            return "fused", f"fused=auto: {why}"
        not_fused = f"fused=auto, not fused: {why if not ok else 'no CUDA GPU'}"
    else:
        not_fused = "fused=false"
    if cuda_graph is True and not on_gpu:
        raise ValueError(f"choose_backend: cuda_graph=True needs the model on a CUDA GPU, but it is on {device}. "
                         "HINT: set cuda_graph='auto' or False, or move the model to a GPU.")
    if cuda_graph is not False and on_gpu:
        return "graph", f"{not_fused}; CUDA graph on {device}"
    return "loop", f"{not_fused}; plain step loop ({'cuda_graph=false' if cuda_graph is False else 'no CUDA GPU'})"
