"""Constructor checks and initial values shared by the LTI mixers (LRU, S4D, S5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_even_state(d_state: int, owner: str, why: str) -> None:
    """Raise unless `d_state` is even (modes come in complex-conjugate pairs)."""
    if d_state % 2:
        raise ValueError(
            f"{owner}: d_state must be even {why}, got d_state={d_state}. "
            f"HINT: use d_state={d_state + 1} or d_state={max(d_state - 1, 2)}."
        )


def check_step_range(dt_min: float, dt_max: float, owner: str) -> None:
    """Raise unless 0 < dt_min <= dt_max (the range of the initial learnable step)."""
    if not (0 < dt_min <= dt_max and math.isfinite(dt_max)):
        raise ValueError(
            f"{owner}: expected 0 < dt_min <= dt_max for the initial step range, got dt_min={dt_min!r}, "
            f"dt_max={dt_max!r}."
        )


def log_uniform(shape: tuple[int, ...], low: float, high: float) -> Tensor:
    """log of values drawn log-uniformly from [low, high]: the usual init of a learnable log step."""
    return math.log(low) + torch.rand(shape) * (math.log(high) - math.log(low))
