"""How a model runs during a rollout: eval mode (restored after), no autograd, optional autocast."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def autocast_context(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` with its weight cache disabled, or a no-op when `dtype` is None.

    The cache must stay off: a cached weight cast made during warm-up would be baked into
    a captured graph as a constant, so the graph would stop following the live weights.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False)


def matmul_tf32_enabled() -> bool:
    """Whether float32 matmuls currently run on TF32 tensor cores (whichever API set it)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    return precision == "tf32" if precision is not None else bool(torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def _tf32_switch(legacy_owner: object, legacy_name: str, new_owner: object | None, enabled: bool) -> Iterator[None]:
    # PyTorch >= 2.9 has two APIs for the TF32 flags and raises when a process mixes them:
    # set the flag through the one the process already uses, and restore it after
    try:
        previous = getattr(legacy_owner, legacy_name)
        legacy = True
    except RuntimeError:  # the process uses the new `fp32_precision` API
        previous, legacy = new_owner.fp32_precision, False
    if legacy:
        setattr(legacy_owner, legacy_name, enabled)
    else:
        new_owner.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        if legacy:
            setattr(legacy_owner, legacy_name, previous)
        else:
            new_owner.fp32_precision = previous


@contextlib.contextmanager
def matmul_tf32(enabled: bool | None) -> Iterator[None]:
    """Allow (True) or forbid (False) TF32 for float32 matmuls and convolutions inside the block; None
    leaves both as they are.

    A CUDA graph keeps the kernels chosen while it was captured, so capturing under this
    context fixes the choice for every later replay. Convolutions are included so that a
    prefill's causal convolution (cuDNN, TF32 by default) follows the same choice.
    """
    if enabled is None:
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    with _tf32_switch(torch.backends.cuda.matmul, "allow_tf32", torch.backends.cuda.matmul, enabled), \
            _tf32_switch(torch.backends.cudnn, "allow_tf32", conv, enabled):
        yield


@contextlib.contextmanager
def rollout_mode(model: nn.Module, device_type: str, autocast_dtype: torch.dtype | None = None,
                 tf32: bool | None = None) -> Iterator[None]:
    """Run `model` in eval mode under `torch.no_grad()` (and autocast / TF32 choice), then restore each
    submodule's mode."""
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), autocast_context(device_type, autocast_dtype), matmul_tf32(tf32):
            yield
    finally:
        for module, training in previous:
            module.training = training
