"""RG-LRU: Griffin's real-gated linear recurrent unit in its recurrent block (De et al., 2024).

Per channel, with u_t the conv output of the recurrence branch:
    r_t = sigmoid(W_a u_t + b_a),  i_t = sigmoid(W_x u_t + b_x)
    a_t = a^(c r_t),  a = sigmoid(Lambda)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t)
Event mode (timesteps dt given): a_t = a^(c r_t dt_t), and the normaliser uses that a_t.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


class _SqrtWithBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose derivative is capped at `max_grad`.

    The normaliser sqrt(1 - a_t^2) has an infinite slope as a_t -> 1 (r_t -> 0); Griffin caps
    the slope rather than the value, so the forward stays exact.
    """

    @staticmethod
    def forward(ctx, x: Tensor, max_grad: float) -> Tensor:
        root = torch.sqrt(x)
        ctx.save_for_backward(root)
        ctx.max_grad = max_grad
        return root

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (root,) = ctx.saved_tensors
        return grad / (2.0 * root).clamp_min(1.0 / ctx.max_grad), None  # d sqrt(x)/dx = 1 / (2 root) <= max_grad


class RGLRU(Mixer):
    """Griffin's recurrent block: (linear -> causal conv -> RG-LRU) * GELU(linear) -> linear.

    The recurrence is elementwise over W = expand * d_model channels, so its state is one
    number per channel: RG-LRU has no separate state size, and `d_state` is accepted only
    so that every mixer shares the `(d_model, d_state, **options)` constructor; it changes
    nothing (use `expand` to widen the state). The gates W_a, W_x are dense W x W maps
    (Griffin uses block-diagonal ones). State keys: "conv" (B, W, d_conv - 1), the last
    d_conv - 1 pre-conv inputs, and "h" (B, W).

    Args:
        d_model: width D of the input and output.
        d_state: ignored (see above); must still be a positive integer.
        expand: W / D.
        d_conv: taps of the depthwise causal convolution.
        c: the fixed exponent scale in a_t = a^(c r_t).
        decay_min: smallest initial a^c (the decay at r_t = 1).
        decay_max: largest initial a^c; (a^c)^2 is drawn uniformly in [decay_min^2, decay_max^2].

    Example:
        >>> mixer = RGLRU(64, 1)
        >>> y = mixer(torch.randn(2, 100, 64))                           # (2, 100, 64)
        >>> y_ctx, state = mixer.prefill(torch.randn(2, 50, 64))
        >>> y_t = mixer.step(torch.randn(2, 64), state, torch.rand(2))   # (2, 64), event dt
    """

    max_normaliser_grad = 1000.0

    def __init__(self, d_model: int, d_state: int = 1, expand: int = 1, d_conv: int = 4, c: float = 8.0,
                 decay_min: float = 0.9, decay_max: float = 0.999):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("expand", expand), ("d_conv", d_conv)):
            check_positive_int(value, name, "RGLRU")
        if not float(c) > 0.0:
            raise ValueError(f"RGLRU: c must be positive, got {c!r}.")
        if not 0.0 < float(decay_min) <= float(decay_max) < 1.0:
            raise ValueError(
                f"RGLRU: expected 0 < decay_min <= decay_max < 1, got decay_min={decay_min!r}, "
                f"decay_max={decay_max!r}. HINT: Griffin uses 0.9 and 0.999."
            )
        self.d_model, self.width, self.c = d_model, expand * d_model, float(c)
        width = self.width

        self.in_proj = nn.Linear(d_model, 2 * width)   # recurrence branch and gate branch
        self.conv = CausalConv1d(width, d_conv)
        self.gates = nn.Linear(width, 2 * width)      # recurrence gate r_t and input gate i_t
        self.out_proj = nn.Linear(width, d_model)

        decay_sq = torch.empty(width).uniform_(decay_min**2, decay_max**2)
        log_a = 0.5 * torch.log(decay_sq) / self.c
        self.Lambda = nn.Parameter(log_a - torch.log(-torch.expm1(log_a)))  # logit(a)

    def _log_decay_base(self) -> Tensor:
        """c log a, (W,): the log-decay at a fully open recurrence gate."""
        return self.c * F.logsigmoid(self.Lambda)

    @classmethod
    def stacked_log_decay_bases(cls, mixers: Sequence[RGLRU]) -> Tensor:
        """`_log_decay_base()` of L RG-LRU layers of one width, stacked: (L, W), in two ops where they share c
        (the fused kernel's packing)."""
        c = mixers[0].c
        if any(m.c != c for m in mixers):
            return torch.stack([m._log_decay_base() for m in mixers])
        return c * F.logsigmoid(torch.stack([m.Lambda for m in mixers]))

    def _recurrence(self, u: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """u (..., W), dt (...) or None -> decay a_t, normaliser sqrt(1 - a_t^2) and gated input i_t u_t,
        each (..., W); the recurrence's input is b_t = normaliser * (i_t u_t)."""
        r, i = torch.sigmoid(self.gates(u)).chunk(2, dim=-1)
        log_a = derived(self, "log_a_max", self._log_decay_base) * r  # shared across a rollout chunk
        if dt is not None:
            # event times need their float32 mantissa even where autocast runs u in bf16
            dt = dt.unsqueeze(-1).to(torch.promote_types(log_a.dtype, torch.float32))
            log_a = (log_a * dt).to(log_a.dtype)
        normaliser = _SqrtWithBoundedGrad.apply(-torch.expm1(2.0 * log_a), self.max_normaliser_grad)
        return torch.exp(log_a), normaliser, i * u

    def _mix(self, x: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, L, D) -> (y (B, L, D), pre-conv inputs (B, L, W), final h (B, W))."""
        x_in, gate = self.in_proj(x).chunk(2, dim=-1)
        a, normaliser, gated_input = self._recurrence(self.conv(x_in), dt)
        h = pairwise_scan(a, normaliser * gated_input)
        return self.out_proj(h * F.gelu(gate)), x_in, h[:, -1]

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """x (B, L, D), dt (B, L) or None -> (B, L, D)."""
        batch, length = check_sequence(x, self.d_model, "RGLRU")
        check_dt(dt, batch, length, "RGLRU")
        return self._mix(x, dt)[0]

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """x (B, L, D), dt (B, L) or None -> (y (B, L, D), state after step L)."""
        batch, length = check_sequence(x, self.d_model, "RGLRU.prefill")
        check_dt(dt, batch, length, "RGLRU.prefill")
        y, x_in, h = self._mix(x, dt)
        return y, {"conv": self.conv.final_window(x_in), "h": h.clone()}

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None) -> State:
        """Zeroed {"conv": (B, W, d_conv - 1), "h": (B, W)}."""
        device, dtype = state_placement(self, device, dtype)
        return {"conv": self.conv.allocate_window(batch_size, device, dtype),
                "h": torch.zeros(batch_size, self.width, device=device, dtype=dtype)}

    def step(self, x_t: Tensor, state: State, dt_t: Tensor | None = None) -> Tensor:
        """x_t (B, D), dt_t (B,) or None -> (B, D); `state` updated in place."""
        batch = check_step_input(x_t, self.d_model, "RGLRU")
        check_step_dt(dt_t, batch, "RGLRU")
        check_state_rows(state, batch, "RGLRU")
        x_in, gate = linear_step(x_t, self.in_proj).chunk(2, dim=-1)
        a, normaliser, gated_input = self._recurrence(self.conv.step(x_in, state["conv"]),
                                                      None if dt_t is None else dt_t.reshape(batch))
        h = state["h"]
        h.mul_(a).addcmul_(normaliser, gated_input)
        return linear_step(h * F.gelu(gate), self.out_proj)

