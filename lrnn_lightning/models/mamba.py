"""Mamba (S6): a selective state-space mixer with input-dependent Delta, B and C (Gu & Dao, 2023).

Per channel e of the expanded stream and state index n:
    h_t[e, n] = exp(Delta_t[e] A[e, n]) h_{t-1}[e, n] + Delta_t[e] B_t[n] u_t[e]
    y_t[e]    = sum_n C_t[n] h_t[e, n] + D[e] u_t[e]
Event mode (timesteps dt given): the decay uses the event timestep, exp(dt_t A[e, n]),
while the input term keeps the selective Delta_t B_t u_t (as in STREAM).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lrnn_lightning.models.causal_conv import CausalConv1d
from lrnn_lightning.models.derived import derived
from lrnn_lightning.models.mixer import Mixer, State, state_placement
from lrnn_lightning.models.scan import pairwise_scan
from lrnn_lightning.models.step_ops import linear_step
from lrnn_lightning.models.validation import (
    check_dt,
    check_positive_int,
    check_sequence,
    check_state_rows,
    check_step_dt,
    check_step_input,
)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, decay_time: Tensor | None = None,
                   h0: Tensor | None = None, chunk_size: int = 256,
                   checkpoint_chunks: bool = True) -> tuple[Tensor, Tensor]:
    """The S6 recurrence and its read-out y_t = C_t . h_t, without ever holding h for the whole sequence.

    The sequence is cut into chunks of `chunk_size` steps, solved one after another with a
    parallel scan inside each chunk and the state carried across. The (B, T, E, N) decays,
    inputs and states exist for one chunk at a time in the forward pass; with
    `checkpoint_chunks` every chunk is also checkpointed under autograd, so backward keeps
    only the chunk inputs and the (B, E, N) carries and recomputes one chunk at a time.

    Memory, for the benchmark layer B=32, L=2048, E=256, N=16 in fp32: a (B, L, E, N) tensor
    is 1 GiB, so a whole-sequence Hillis-Steele scan under autograd (about 2 log2(L) = 22 saved
    copies) needs ~25 GiB per layer, ~100 GB for 4 layers. Here a (B, T, E, N) chunk at T=256
    is 128 MiB, of which backward holds a handful for one chunk at a time; what a layer keeps
    until backward is ~15 (B, L, E)-sized activations of 64 MiB, ~1 GiB. Without checkpointing,
    autograd keeps about 2 (B, L, E, N) tensors per layer (decays and states) but recomputes
    nothing. Measured on an H100, 4 layers forward + backward at that size (peak memory, time):
    T=256 checkpointed 4.9 GiB, 236 ms; T=2048 checkpointed 10.9 GiB, 169 ms; T=256 not
    checkpointed 12.8 GiB, 184 ms; T=2048 not checkpointed 17.1 GiB, 134 ms. A whole-sequence
    Hillis-Steele scan: 25.6 GiB for ONE layer.

    Args:
        u: inputs, shape (B, L, E).
        delta: selective step sizes (positive), shape (B, L, E).
        A: continuous-time decay rates (negative), shape (E, N).
        B: input matrices, shape (B, L, N).
        C: output matrices, shape (B, L, N).
        decay_time: event timesteps (B, L) used in the decay instead of `delta`; None for `delta`.
        h0: initial state (B, E, N); zero when None.
        chunk_size: steps per chunk.
        checkpoint_chunks: recompute each chunk in backward instead of keeping its states.

    Returns:
        y of shape (B, L, E) and the final state h_L of shape (B, E, N).
    """
    decay = delta if decay_time is None else decay_time.unsqueeze(-1)
    use_checkpoint = checkpoint_chunks and torch.is_grad_enabled()
    h = h0
    outputs = []
    for start in range(0, u.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        args = (u[:, part], delta[:, part], decay[:, part], A, B[:, part], C[:, part], h)
        if use_checkpoint:
            y, h = checkpoint(_selective_scan_chunk, *args, use_reentrant=False)
        else:
            y, h = _selective_scan_chunk(*args)
        outputs.append(y)
    return torch.cat(outputs, dim=1), h


def _selective_scan_chunk(u: Tensor, delta: Tensor, decay: Tensor, A: Tensor, B: Tensor, C: Tensor,
                          h0: Tensor | None) -> tuple[Tensor, Tensor]:
    # (B, T, E, N); decay (B, T, E) or (B, T, 1), float32 event times even for a half-precision A
    a = torch.exp(decay.unsqueeze(-1) * A).to(A.dtype)
    b = (delta * u).unsqueeze(-1) * B.unsqueeze(2)           # (B, T, E, N)
    h = pairwise_scan(a, b, h0)
    y = torch.einsum("bten,btn->bte", h, C)
    return y, h[:, -1].clone()  # a view would keep the whole chunk of states alive


class Mamba(Mixer):
    """The Mamba block's mixer: in-projection, causal conv + SiLU, S6 scan, SiLU(z) gate, out-projection.

    The expanded stream has E = expand * d_model channels, each with a diagonal state of
    size N = d_state. State keys: "conv" (B, E, d_conv - 1), the last d_conv - 1 pre-conv
    inputs, and "h" (B, E, N).

    Args:
        d_model: width D of the input and output.
        d_state: state size N per channel.
        expand: E / D.
        d_conv: taps of the depthwise causal convolution.
        dt_rank: rank of the Delta projection; "auto" means ceil(d_model / 16).
        dt_min: smallest initial Delta (the Delta bias is drawn log-uniformly in [dt_min, dt_max]).
        dt_max: largest initial Delta.
        scan_chunk_size: steps per chunk of the parallel scan: larger chunks launch fewer
            kernels but hold more memory (see `selective_scan`).
        scan_checkpoint: recompute the scan chunk by chunk in backward (memory-lean) instead of
            keeping the (B, L, E, N) decays and states for backward (faster).

    Example:
        >>> mixer = Mamba(64, 16)
        >>> y = mixer(torch.randn(2, 100, 64))                           # (2, 100, 64)
        >>> y_ctx, state = mixer.prefill(torch.randn(2, 50, 64))
        >>> y_t = mixer.step(torch.randn(2, 64), state, torch.rand(2))   # (2, 64), event dt
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 scan_chunk_size: int = 256, scan_checkpoint: bool = True):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("expand", expand), ("d_conv", d_conv),
                            ("scan_chunk_size", scan_chunk_size)):
            check_positive_int(value, name, "Mamba")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        check_positive_int(dt_rank, "dt_rank", "Mamba", alternative='"auto" for ceil(d_model / 16)')
        if not 0.0 < float(dt_min) <= float(dt_max):
            raise ValueError(f"Mamba: expected 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}.")
        self.d_model, self.d_state, self.d_inner, self.dt_rank = d_model, d_state, expand * d_model, dt_rank
        self.scan_chunk_size, self.scan_checkpoint = scan_chunk_size, bool(scan_checkpoint)
        inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv = CausalConv1d(inner, d_conv)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)

        with torch.no_grad():
            bound = dt_rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            delta = torch.exp(torch.empty(inner).uniform_(math.log(dt_min), math.log(dt_max)))
            self.dt_proj.bias.copy_(delta + torch.log(-torch.expm1(-delta)))  # softplus^-1(delta)

    def _selection(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u (..., E) -> Delta (..., E), B (..., N), C (..., N) (one kernel per projection in a step, see step_ops)."""
        dt_low, B, C = linear_step(u, self.x_proj).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(linear_step(dt_low, self.dt_proj)), B, C

    def _mix(self, x: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> (y (B, L, D), pre-conv inputs (B, L, E), final h (B, E, N))."""
        x_in, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv(x_in))
        delta, B, C = self._selection(u)
        A = -torch.exp(self.A_log)
        decay_time = None if dt is None else dt.to(_timestep_dtype(A))
        y, h = selective_scan(u, delta, A, B, C, decay_time, chunk_size=self.scan_chunk_size,
                              checkpoint_chunks=self.scan_checkpoint)
        y = (y + self.D * u) * F.silu(z)
        return self.out_proj(y), x_in, h

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """x (B, L, D), dt (B, L) or None -> (B, L, D)."""
        batch, length = check_sequence(x, self.d_model, "Mamba")
        check_dt(dt, batch, length, "Mamba")
        return self._mix(x, dt)[0]

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """x (B, L, D), dt (B, L) or None -> (y (B, L, D), state after step L)."""
        batch, length = check_sequence(x, self.d_model, "Mamba.prefill")
        check_dt(dt, batch, length, "Mamba.prefill")
        y, x_in, h = self._mix(x, dt)
        return y, {"conv": self.conv.final_window(x_in), "h": h}

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> State:
        """Zeroed {"conv": (B, E, d_conv - 1), "h": (B, E, N)}."""
        device, dtype = state_placement(self, device, dtype)
        return {"conv": self.conv.allocate_window(batch_size, device, dtype),
                "h": torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype)}

    def _continuous_A(self) -> Tensor:
        return -torch.exp(self.A_log)

    @classmethod
    def stacked_continuous_A(cls, mixers: Sequence[Mamba]) -> Tensor:
        """`_continuous_A()` of L Mamba layers of one size, stacked: (L, E, N), in two ops whatever L (the fused
        kernel's packing)."""
        return -torch.exp(torch.stack([m.A_log for m in mixers]))

    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        """x_t (B, D), dt_t (B,) or None -> (B, D); `state` updated in place."""
        batch = check_step_input(x_t, self.d_model, "Mamba")
        check_step_dt(dt_t, batch, "Mamba")
        check_state_rows(state, batch, "Mamba")
        x_in, z = linear_step(x_t, self.in_proj).chunk(2, dim=-1)
        u = F.silu(self.conv.step(x_in, state["conv"]))
        delta, B, C = self._selection(u)
        A = derived(self, "A", self._continuous_A)  # shared across a rollout chunk, see derived.py
        decay = delta if dt_t is None else dt_t.reshape(batch, 1).to(_timestep_dtype(A))
        h = state["h"]
        h.mul_(torch.exp(decay.unsqueeze(-1) * A)).addcmul_((delta * u).unsqueeze(-1), B.unsqueeze(1))
        y = torch.baddbmm((self.D * u).unsqueeze(-1), h, C.unsqueeze(-1)).squeeze(-1)
        return linear_step(y * F.silu(z), self.out_proj)


def _timestep_dtype(A: Tensor) -> torch.dtype:
    """The dtype event times enter the decay in: at least float32, even where autocast runs u in bf16."""
    return torch.promote_types(A.dtype, torch.float32)
