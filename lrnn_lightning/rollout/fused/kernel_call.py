"""`KernelCall`: one launch of a fused kernel, assembled (`launch.build_call`) and ready to run or capture, and
`io_buffers`, the output, timestep and state buffers every launch starts from."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lrnn_lightning.rollout.fused.pack import PackedModel, write_state_rows
from lrnn_lightning.rollout.state import State


@dataclass
class KernelCall:
    """One launch of the fused kernel, ready to go: grid, arguments, constexprs and the buffers to read back."""

    kernel: str
    grid: tuple[int]
    args: tuple
    constexprs: dict
    num_warps: int
    out: Tensor
    states: Tensor
    cooperative: bool = False  # programs wait for each other (a split or phased step): all must be resident
    zeroed: tuple[Tensor, ...] = ()  # zeroed before every launch: exchange slots, barrier and row-block counters
    num_stages: int = 1  # Triton's software pipelining of loops (the register kernel's loops stream no tiles)

    def launch(self, kernels) -> None:
        """Launch it from the kernel module `kernels` (`kernel_module()`). Launching one call again is
        correct: the exchange slots are zeroed first, since tags restart at every launch (kernels/group.py), and so
        are the phased kernel's row-block counters, which a stale count would let tiles pass before their inputs
        are written (kernels/phased.py)."""
        for tensor in self.zeroed:
            tensor.zero_()
        options = {"launch_cooperative_grid": True} if self.cooperative else {}
        getattr(kernels, self.kernel)[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                                 num_stages=self.num_stages, **options)


def io_buffers(packed: PackedModel, x0: Tensor, state: State | None, num_steps: int, dt_steps: Tensor | None,
               rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """A launch's fp32 output (B, num_steps + 1, W) holding x0 in column 0, its timesteps (dt_steps as fp32, or a
    one-element placeholder) and its state (L, rows, state_width): the batch's rows of `state` laid out as
    `pack.write_state_rows` says, zeros elsewhere (no state: all zeros)."""
    batch, width = x0.shape
    device, f32 = x0.device, torch.float32
    out = torch.empty(batch, num_steps + 1, width, device=device, dtype=f32)
    out[:, 0] = x0
    dt = dt_steps.to(f32).contiguous() if dt_steps is not None else torch.ones(1, device=device, dtype=f32)
    states = torch.zeros(packed.n_layers, rows, packed.state_width, device=device, dtype=f32)
    if state is not None:
        write_state_rows(packed.mixer_id, state, states, batch)
    return out, dt, states
