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


@contextlib.contextmanager
def matmul_tf32(enabled: bool | None) -> Iterator[None]:
    """Allow (True) or forbid (False) TF32 tensor cores for float32 matmuls inside the block; None leaves it.

    A CUDA graph keeps the kernels chosen while it was captured, so capturing under this
    context fixes the choice for every later replay.
    """
    if enabled is None:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


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
