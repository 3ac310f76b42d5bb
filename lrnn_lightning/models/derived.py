"""Weight-derived tensors shared between the steps of one engine call.

`step` follows the live weights because it derives its discretised matrices from the
parameters on every call. Between the steps of ONE call of the rollout engine (the K
steps of one graph replay, or one plain-loop rollout) the weights cannot change, so
inside `shared_derivations()` a mixer derives them once and reuses them: fewer kernels
per step. The scope ends with the call, so a captured graph re-derives them at every
replay and still sees optimizer steps and in-place checkpoint loads. Outside a scope
(every direct `step` call) nothing is shared.

A module-level variable rather than a ContextVar: torch.compile traces a plain global
without a graph break. Rollouts are not run from several threads at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")

_shared: dict[tuple[int, str], Any] | None = None


@contextlib.contextmanager
def shared_derivations(enabled: bool = True) -> Iterator[None]:
    """Within the block, `derived(module, name, compute)` computes once per (module, name).

    Only for code during which no parameter changes (the steps of one rollout chunk).
    Nested scopes share the outer one.
    """
    global _shared
    if not enabled or _shared is not None:
        yield
        return
    _shared = {}
    try:
        yield
    finally:
        _shared = None


def derived(module: nn.Module, name: str, compute: Callable[[], T]) -> T:
    """`compute()`, reused within a `shared_derivations` scope; computed afresh outside one."""
    if _shared is None:
        return compute()
    key = (id(module), name)
    if key not in _shared:
        _shared[key] = compute()
    return _shared[key]
