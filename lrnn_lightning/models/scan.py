"""Parallel solver for the first-order linear recurrence h_t = a_t * h_{t-1} + b_t.

A Hillis-Steele associative scan: log2(L) vectorised sweeps, each combining element t
with element t - 2^k through (a, b) o (a', b') = (a a', a' b + b'). It needs no division
or logarithm, so it is exact for decays of any magnitude, real or complex, and it is
differentiable by autograd. Work is O(L log L), which on a GPU is far cheaper than the
L sequential kernel launches of a Python loop.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> Tensor:
    """Solve h_t = a_t * h_{t-1} + b_t along dim 1.

    Args:
        a: decays, shape (B, L, *S) or broadcastable to `b`'s shape.
        b: inputs, shape (B, L, *S).
        h0: optional initial state of shape (B, *S); zero when None.

    Returns:
        h of shape (B, L, *S), with h_t the state after consuming step t.
    """
    a = a.expand_as(b) if a.shape != b.shape else a
    if h0 is not None:
        b = torch.cat([b[:, :1] + a[:, :1] * h0.unsqueeze(1), b[:, 1:]], dim=1)
    length = b.shape[1]
    offset = 1
    while offset < length:
        # element t absorbs the prefix ending at t - offset; the first `offset` are final
        b = torch.cat([b[:, :offset], a[:, offset:] * b[:, :-offset] + b[:, offset:]], dim=1)
        if offset * 2 < length:
            a = torch.cat([a[:, :offset], a[:, offset:] * a[:, :-offset]], dim=1)
        offset *= 2
    return b
