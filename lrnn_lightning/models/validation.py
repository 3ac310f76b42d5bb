"""Input checks shared by every mixer and the backbone.

Shape checks read only tensor metadata, so they are safe inside a captured `step`.
Value checks (`check_dt_values`) synchronise with the host and therefore run only in
the parallel paths (`forward`, `prefill`) and once per rollout in the engine. A caller
that has checked a dt's values (the backbone, once per call) marks it with
`dt_values_checked`, so the mixers it calls check only its shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor

_checked_dt: contextvars.ContextVar[Tensor | None] = contextvars.ContextVar("checked_dt", default=None)


def check_positive_int(value: object, name: str, owner: str, alternative: str = "", *, hint: str = "") -> int:
    """Return `value` as an int if it is an integer >= 1 (a NumPy integer too; bools excluded), else raise
    a ValueError naming it. The one such check of the package: the models, the rollout engine and the data
    modules all call it.

    Args:
        value: the value to check.
        name: the argument's name, for the message.
        owner: the class or function the argument belongs to, for the message.
        alternative: another accepted form, named in the message (e.g. '"auto" for ...').
        hint: what to do instead, appended as "HINT: ...".

    Example:
        >>> check_positive_int(3, "horizon", "RolloutEngine")
        3
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        expected = f"a positive integer or {alternative}" if alternative else "a positive integer"
        raise ValueError(f"{owner}: {name} must be {expected}, got {value!r}." + (f" HINT: {hint}" if hint else ""))
    return int(value)


def check_sequence(x: Tensor, d_model: int, owner: str) -> tuple[int, int]:
    """Validate a sequence input of shape (B, L, D) and return (B, L)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor of shape (B, L, {d_model}), got {type(x).__name__}.")
    if x.dim() != 3:
        raise ValueError(
            f"{owner}: expected input of shape (B, L, {d_model}) (rank 3), got shape {tuple(x.shape)} "
            f"(rank {x.dim()}). HINT: for a single step use `step(x_t)` with x_t of shape (B, {d_model})."
        )
    if x.shape[-1] != d_model:
        raise ValueError(
            f"{owner}: expected feature size {d_model} in the last dimension, got shape {tuple(x.shape)}."
        )
    if x.shape[1] == 0:
        raise ValueError(f"{owner}: got an empty sequence (L=0), shape {tuple(x.shape)}.")
    return x.shape[0], x.shape[1]


def check_step_input(x_t: Tensor, d_model: int, owner: str) -> int:
    """Validate one step's input of shape (B, D) and return B."""
    if not isinstance(x_t, Tensor):
        raise TypeError(f"{owner}.step: expected a torch.Tensor of shape (B, {d_model}), got {type(x_t).__name__}.")
    if x_t.dim() != 2 or x_t.shape[-1] != d_model:
        raise ValueError(
            f"{owner}.step: expected x_t of shape (B, {d_model}), got shape {tuple(x_t.shape)}. "
            "HINT: `step` takes one time step; use `forward` for (B, L, D) sequences."
        )
    return x_t.shape[0]


def check_state_rows(state, batch: int, owner: str, prefix: str = "") -> None:
    """Raise unless every tensor of a step's `state` has `batch` rows (state tensors are (B, ...)), as x_t has:
    a state of another batch size would otherwise broadcast silently or fail deep inside the step. Metadata only,
    so it is free inside a captured step. `prefix` is how the caller names the keys (e.g. "0." for layer 0)."""
    for key, value in state.items():
        if value.dim() == 0 or value.shape[0] != batch:
            raise ValueError(f"{owner}.step: state '{prefix}{key}' has shape {tuple(value.shape)}, but x_t has {batch} "
                             f"rows (state tensors are (B, ...)). HINT: allocate_state({batch}) or prefill a context "
                             "of this batch size.")


def check_dt(dt: Tensor | None, batch: int, length: int, owner: str, check_values: bool = True) -> None:
    """Validate event timesteps of shape (B, L): positive and finite.

    The value check is skipped when `check_values` is False or inside
    `dt_values_checked(dt)` for this same tensor.
    """
    if dt is None:
        return
    if not isinstance(dt, Tensor):
        raise TypeError(
            f"{owner}: expected dt to be a torch.Tensor of shape ({batch}, {length}), got {type(dt).__name__}."
        )
    if tuple(dt.shape) != (batch, length):
        raise ValueError(
            f"{owner}: expected dt of shape (B, L) = ({batch}, {length}), got shape {tuple(dt.shape)}. "
            "HINT: dt holds one positive timestep per batch row and time step."
        )
    if not dt.is_floating_point():
        raise ValueError(f"{owner}: expected a floating-point dt, got dtype {dt.dtype}.")
    if check_values and dt is not _checked_dt.get():
        check_dt_values(dt, owner)


@contextlib.contextmanager
def dt_values_checked(dt: Tensor | None) -> Iterator[None]:
    """Within the block, `check_dt` skips the value check of this very tensor.

    For a caller that has just run `check_dt_values` on `dt` and passes it on to several
    mixers: each check would synchronise with the host again. Other tensors, and every
    call after the block, are still checked.

    Example:
        >>> check_dt(dt, batch, length, "SequenceModel")
        >>> with dt_values_checked(dt):
        ...     h = layer(h, dt)   # the layer's own check_dt checks only dt's shape
    """
    token = _checked_dt.set(dt)
    try:
        yield
    finally:
        _checked_dt.reset(token)


def check_dt_values(dt: Tensor, owner: str) -> None:
    """Raise if any timestep is non-finite or non-positive (synchronises with the host)."""
    finite = torch.isfinite(dt)
    if not bool(finite.all()):
        bad = dt[~finite].flatten()[0].item()
        raise ValueError(f"{owner}: dt must be finite, got {bad}. HINT: check the timestamps the dt was derived from.")
    if not bool((dt > 0).all()):
        bad = dt[dt <= 0].flatten()[0].item()
        raise ValueError(
            f"{owner}: dt must be strictly positive, got {bad}. "
            "HINT: timestamps must be strictly increasing; drop duplicate samples."
        )


def check_step_dt(dt_t: Tensor | None, batch: int, owner: str) -> None:
    """Validate one step's timesteps of shape (B,) or (B, 1); metadata only, capture-safe."""
    if dt_t is None:
        return
    if not isinstance(dt_t, Tensor) or dt_t.dim() not in (1, 2) or dt_t.shape[0] != batch or dt_t.numel() != batch:
        shape = tuple(dt_t.shape) if isinstance(dt_t, Tensor) else type(dt_t).__name__
        raise ValueError(f"{owner}.step: expected dt_t of shape ({batch},), got {shape}.")
