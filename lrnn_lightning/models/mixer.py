"""The step protocol every sequence mixer implements.

    forward(x, dt=None)              x (B, L, D) -> y (B, L, D); dt (B, L) event timesteps
    allocate_state(B, device, dtype) -> dict[str, Tensor] of zeroed state tensors, each (B, ...)
    step(x_t, state, dt_t=None)      x_t (B, D) -> y_t (B, D); updates `state` in place
    prefill(x, dt=None)              -> (y (B, L, D), state): parallel pass + final state

Capture rules: `step` derives every weight-dependent tensor from the live parameters
on each call, updates state tensors only in place, and never synchronises with the
host, so one CUDA graph of it stays valid across optimizer steps. `step` is for inference
(under `torch.no_grad()` or `inference_mode`): its in-place state updates leave nothing for
autograd to differentiate through, so train with `forward`. State tensors are
real floating tensors of the dtype given to `allocate_state` (a complex state is kept
as real and imaginary parts) with the batch first, so the engine can zero, pad and copy
them generically.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

State = dict[str, Tensor]


class Mixer(nn.Module, abc.ABC):
    """Abstract base of the zoo's mixers.

    Subclasses take `(d_model, d_state, **options)` in their constructor so that the
    registry and `SequenceModel` can build any of them by name.
    """

    d_model: int

    @abc.abstractmethod
    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """Parallel pass: x (B, L, D), dt (B, L) or None -> (B, L, D)."""

    @abc.abstractmethod
    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> State:
        """Zeroed recurrent state for `batch_size` rows, on `device` in `dtype` (None: the mixer's parameters',
        `state_placement`)."""

    @abc.abstractmethod
    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        """One recurrent step: x_t (B, D), dt_t (B,) or None -> (B, D); `state` updated in place."""

    @abc.abstractmethod
    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """Parallel pass that also returns the state after the last step."""


def state_placement(module: nn.Module, device: torch.device | str | None,
                    dtype: torch.dtype | None) -> tuple[torch.device | str | None, torch.dtype]:
    """Where a new state of `module` lives: `device` and `dtype` as given, else those of its first floating-point
    parameter (a float64 model steps a float64 state; one on a GPU a state there), else float32 on the device of
    any of its tensors, else on the CPU."""
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    if device is None:  # any tensor of the module says where it lives (complex parameters, buffers)
        anywhere = param if param is not None else next(iter([*module.parameters(), *module.buffers()]), None)
        device = None if anywhere is None else anywhere.device
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    return device, dtype
