"""Which memory a captured graph reads: the storage, dtype, device, shape and strides of every parameter and
buffer.

A CUDA graph bakes in the addresses of the weights it reads. In-place updates (optimizer
steps, `load_state_dict`, `p.data.copy_`) keep the addresses, so a replay follows them.
Replacing a tensor (`.to(dtype)`, `.to(device)`, `load_state_dict(assign=True)`) does not:
the graph would keep reading the old memory. Comparing fingerprints detects exactly that.
Tensors a model keeps outside its parameters and buffers are invisible here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class TensorSignature(NamedTuple):
    """Where and what one parameter or buffer is."""

    name: str
    kind: str  # "parameter" | "buffer"
    data_ptr: int
    dtype: torch.dtype
    device: torch.device
    shape: tuple[int, ...]
    stride: tuple[int, ...]


Fingerprint = tuple[TensorSignature, ...]


def model_fingerprint(model: nn.Module) -> Fingerprint:
    """The signature of every parameter and buffer of `model`, in registration order."""
    tensors = [(name, "parameter", p) for name, p in model.named_parameters()]
    tensors += [(name, "buffer", b) for name, b in model.named_buffers()]
    return tuple(TensorSignature(name, kind, t.data_ptr(), t.dtype, t.device, tuple(t.shape), tuple(t.stride()))
                 for name, kind, t in tensors)


def describe_change(old: Fingerprint, new: Fingerprint) -> str | None:
    """A sentence naming the first difference between two fingerprints, or None when they match."""
    if old == new:
        return None
    old_names, new_names = [s.name for s in old], [s.name for s in new]
    if old_names != new_names:
        added = sorted(set(new_names) - set(old_names))
        removed = sorted(set(old_names) - set(new_names))
        return f"the model's parameters and buffers changed (added {added}, removed {removed})"
    for before, after in zip(old, new, strict=True):
        if before == after:
            continue
        what = f"{before.kind} {before.name!r}"
        for field in ("dtype", "device", "shape", "stride"):
            if getattr(before, field) != getattr(after, field):
                return f"{what} changed {field} from {getattr(before, field)} to {getattr(after, field)}"
        return f"{what} was replaced by a tensor at another address (e.g. load_state_dict(assign=True))"
    return "the model's parameters or buffers changed"
