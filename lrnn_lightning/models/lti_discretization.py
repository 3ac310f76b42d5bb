"""Discretisations of a diagonal continuous-time SSM h' = Lambda h + B u over a step Delta.

Each rule maps (Lambda, Delta) to (log_decay, input_scale): the discrete recurrence is
h_t = exp(log_decay) * h_{t-1} + input_scale * (B u_t), per mode. Returning the
logarithm of the decay lets the time-invariant path build decay^l = exp(l log_decay)
without underflow trouble; `input_scale` is None where the input enters unscaled.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Discretization = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]


def zoh(lam: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-order hold: decay exp(Delta Lambda), input scale (exp(Delta Lambda) - 1) / Lambda.

    `expm1` keeps the input scale accurate when Delta Lambda is tiny, where
    exp(Delta Lambda) - 1 would cancel catastrophically.

    Args:
        lam: complex continuous-time eigenvalues, shape (*S).
        delta: real positive steps, broadcastable to `lam`.
    """
    z = delta * lam
    return z, torch.expm1(z) / lam


def bilinear(lam: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Bilinear (Tustin): decay (1 + Delta Lambda/2) / (1 - Delta Lambda/2), input scale Delta / (1 - Delta Lambda/2).

    The stable form: the input scale never divides by Lambda (the generic
    (decay - 1) / Lambda does, and loses all precision as Lambda -> 0), and the decay's
    logarithm is taken as log1p(z) - log1p(-z), accurate for small steps.
    """
    half = 0.5 * delta * lam
    return torch.log1p(half) - torch.log1p(-half), delta / (1 - half)


def dirac(lam: Tensor, delta: Tensor) -> tuple[Tensor, None]:
    """Dirac input (Event-SSM): decay exp(Delta Lambda), and each input is an impulse, so B-bar = B.

    With event dt (dt[t] the gap from sample t to t + 1) the step is h_t = exp(dt_t Lambda) h_{t-1} + B x_t:
    the gap decays the state carried into the step and x_t enters undecayed, so a sequence's first gap
    dt[:, 0] does not change its outputs (zoh and bilinear integrate x_t over its own gap instead).
    """
    return delta * lam, None


DISCRETIZATIONS: dict[str, Discretization] = {"zoh": zoh, "bilinear": bilinear, "dirac": dirac}


def get_discretization(name: str, owner: str) -> Discretization:
    """The discretisation rule called `name`; raises a ValueError listing the valid names."""
    if not isinstance(name, str) or name.lower() not in DISCRETIZATIONS:
        raise ValueError(
            f"{owner}: unknown discretization {name!r}. Valid names: {', '.join(DISCRETIZATIONS)}. "
            "HINT: 'zoh' suits regularly sampled data, 'dirac' event streams (Event-SSM)."
        )
    return DISCRETIZATIONS[name.lower()]
