"""S4D: the diagonal structured state space model (Gu, Gupta, Goel & Re, 2022, "On the
Parameterization and Initialization of Diagonal State Space Models").

Each of the H channels is its own single-input single-output system with N = d_state / 2
complex modes (one of each conjugate pair, hence the factor 2 in the readout):

    h' = A h + x        y = 2 Re(C h) + D x        (per channel; A, C complex (N,))

S4D-Lin initialisation: A_n = -1/2 + i pi n, C complex Gaussian, a learnable step
Delta = exp(log_dt) per channel, log-uniform in [dt_min, dt_max]. The input matrix is
fixed to ones (it is redundant with C for a SISO system). Zero-order hold gives

    h_t = exp(Delta A) h_{t-1} + (exp(Delta A) - 1) / A * x_t.

Event mode: Delta_t = dt_t * exp(log_dt), so both the transition and the input gain of
step t follow its timestep. Re(A) is parameterised as -exp(A_real_log): stable always.

For dt=None the layer is a per-channel convolution with the real kernel
K_l = 2 Re(C (exp(Delta A) - 1) / A exp(l Delta A)), applied by FFT; with dt it is solved
by the associative scan (`pairwise_scan`). Every path computes in the parameters' dtype
promoted to at least float32 (see `working_precision`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lrnn_lightning.models.complex_state import ComplexStateMixer
from lrnn_lightning.models.derived import derived
from lrnn_lightning.models.fft_conv import causal_fft_conv
from lrnn_lightning.models.lti_complex import (
    complex_decay_add_,
    eigenvalues_from_log,
    powers_from_log,
    stacked_eigenvalues,
    stacked_parameter,
    upcast,
    working_precision,
)
from lrnn_lightning.models.lti_discretization import zoh
from lrnn_lightning.models.lti_init import check_even_state, check_step_range, log_uniform
from lrnn_lightning.models.mixer import State
from lrnn_lightning.models.scan import pairwise_scan
from lrnn_lightning.models.validation import (
    check_dt,
    check_positive_int,
    check_sequence,
)


class S4D(ComplexStateMixer):
    """Diagonal S4 mixer (S4D-Lin): (B, L, d_model) -> (B, L, d_model).

    Args:
        d_model: H, channels, each an independent SISO SSM.
        d_state: real state size per channel; the layer keeps N = d_state / 2 complex
            modes, so d_state must be even.
        dt_min, dt_max: range of the initial per-channel step Delta.

    State: {"h_re", "h_im"}, each (batch, d_model, d_state / 2).

    Example:
        >>> s4d = S4D(d_model=32, d_state=64)
        >>> y = s4d(torch.randn(4, 100, 32))                                # (4, 100, 32)
        >>> y_events = s4d(torch.randn(4, 100, 32), dt=torch.rand(4, 100) + 0.5)
    """

    def __init__(self, d_model: int, d_state: int, dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__()
        check_positive_int(d_model, "d_model", "S4D")
        check_positive_int(d_state, "d_state", "S4D")
        check_even_state(d_state, "S4D", "(N = d_state / 2 conjugate pairs of modes)")
        check_step_range(dt_min, dt_max, "S4D")
        self.d_model = d_model
        self.n_modes = d_state // 2
        self.log_dt = nn.Parameter(log_uniform((d_model,), dt_min, dt_max))
        self.A_real_log = nn.Parameter(torch.full((d_model, self.n_modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(self.n_modes, dtype=torch.float32).repeat(d_model, 1))
        self.C = nn.Parameter(torch.randn(2, d_model, self.n_modes) / math.sqrt(2))
        self.D = nn.Parameter(torch.randn(d_model))

    def eigenvalues(self) -> Tensor:
        """Continuous-time A, complex (d_model, N)."""
        return eigenvalues_from_log(upcast(self.A_real_log), upcast(self.A_imag))

    @classmethod
    def stacked_eigenvalues(cls, mixers: Sequence[S4D]) -> Tensor:
        """A of L S4D layers of one size, stacked: (L, d_model, N) complex."""
        return stacked_eigenvalues(mixers, "A_real_log", "A_imag")

    @classmethod
    def stacked_steps(cls, mixers: Sequence[S4D]) -> Tensor:
        """Delta = exp(log_dt) of L S4D layers of one size, stacked: (L, d_model, 1) real."""
        return torch.exp(stacked_parameter(mixers, "log_dt")).unsqueeze(-1)

    @classmethod
    def stacked_discretization(cls, mixers: Sequence[S4D]) -> tuple[Tensor, Tensor]:
        """`_discretize(None)` of L S4D layers of one size, stacked: ZOH (log_decay, input_scale), complex
        (L, d_model, N), bit for bit each layer's own, in a few ops for all layers (the fused kernel's packing)."""
        return zoh(cls.stacked_eigenvalues(mixers), cls.stacked_steps(mixers))

    def _discretize(self, dt: Tensor | None) -> tuple[Tensor, Tensor]:
        """ZOH (log_decay, input_scale), complex (H, N) for dt=None, else dt.shape + (H, N)."""
        delta = torch.exp(upcast(self.log_dt)).unsqueeze(-1)
        if dt is not None:
            delta = dt[..., None, None] * delta
        return zoh(self.eigenvalues(), delta)

    def _unit_step_coefficients(self) -> tuple[Tensor, Tensor]:
        """(decay, input scale) of a step without an event timestep, complex (H, N)."""
        log_decay, scale = self._discretize(None)
        return torch.exp(log_decay), scale

    def _readout(self, h_re: Tensor, h_im: Tensor, x: Tensor) -> Tensor:
        """2 Re(C h) + D x for h (..., H, N) and x (..., H) -> (..., H)."""
        C = upcast(self.C)
        re_ch = torch.mul(h_re, C[0]).addcmul_(h_im, C[1], value=-1).sum(-1)
        return torch.add(x * upcast(self.D), re_ch, alpha=2)

    def _time_invariant(self, x: Tensor, with_state: bool) -> tuple[Tensor, Tensor | None]:
        """FFT path for dt=None: y (B, L, H) and, if asked, the final state (B, H, N) complex."""
        log_decay, scale = self._discretize(None)
        powers = powers_from_log(log_decay, x.shape[1])  # (L, H, N)
        C = upcast(self.C)
        kernel = 2 * torch.einsum("lhn,hn->lh", powers, torch.complex(C[0], C[1]) * scale).real
        y = causal_fft_conv(x, kernel) + x * upcast(self.D)
        if not with_state:
            return y, None
        # h_{L-1} = scale * sum_l decay^l x_{L-1-l}
        h_last = torch.einsum("lhn,blh->bhn", powers, x.flip(1).to(powers.dtype)) * scale
        return y, h_last

    def _time_varying(self, x: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
        """Scan path: y (B, L, H) and all states (B, L, H, N) complex."""
        log_decay, scale = self._discretize(dt)
        h = pairwise_scan(torch.exp(log_decay), scale * x.unsqueeze(-1))
        return self._readout(h.real, h.imag, x), h

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """Parallel pass from a zero state.

        Args:
            x: input, shape (B, L, H).
            dt: optional event timesteps, shape (B, L), positive.

        Returns:
            y of shape (B, L, H).
        """
        batch, length = check_sequence(x, self.d_model, "S4D")
        check_dt(dt, batch, length, "S4D")
        with torch.autocast(x.device.type, enabled=False):  # see `working_precision`
            x, dt, out_dtype = working_precision(self.D, x, dt)
            y = self._time_invariant(x, with_state=False)[0] if dt is None else self._time_varying(x, dt)[0]
        return y.to(out_dtype)

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """Parallel pass that also returns the state after the last step.

        Args:
            x: context, shape (B, L, H).
            dt: optional event timesteps, shape (B, L).

        Returns:
            y (B, L, H) and the state {"h_re", "h_im"}, each (B, H, N), both in y's dtype.
        """
        batch, length = check_sequence(x, self.d_model, "S4D")
        check_dt(dt, batch, length, "S4D")
        with torch.autocast(x.device.type, enabled=False):
            x, dt, out_dtype = working_precision(self.D, x, dt)
            if dt is None:
                y, h_last = self._time_invariant(x, with_state=True)
            else:
                y, h = self._time_varying(x, dt)
                h_last = h[:, -1]
        return y.to(out_dtype), self._state_from(h_last, out_dtype)

    def _state_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.d_model, self.n_modes)

    def _complex_step(self, x_t: Tensor, state: State, dt_t: Tensor | None) -> Tensor:
        if dt_t is None:  # time-invariant: shared across a chunk (see derived.py)
            decay, scale = derived(self, "step", self._unit_step_coefficients)
        else:
            log_decay, scale = self._discretize(dt_t)
            decay = torch.exp(log_decay)
        x_col = x_t.unsqueeze(-1)
        h_re, h_im = complex_decay_add_(state["h_re"], state["h_im"], decay, x_col * scale.real, x_col * scale.imag)
        return self._readout(h_re, h_im, x_t)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_modes={self.n_modes}"
