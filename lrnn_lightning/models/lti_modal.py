"""`ModalLTIMixer`: the shared machinery of the MIMO diagonal complex SSMs (LRU, S5).

Both are, per mode p = 1..P of a complex diagonal state,

    h_t = decay_t * h_{t-1} + scale_t * (B x_t)        y_t = c Re(C h_t) + D x_t

with B (P, H), C (H, P) complex, D (H,) real and c = 2 when only one mode of each
conjugate pair is kept, else 1. A subclass says how `decay` and `scale` follow from its
parameters and the event timestep (`_discretize`), and may fold per-mode gains into B
(`_input_weight`); this class does the rest of the step protocol:

- forward, dt=None: time-invariant, so the states are a causal FFT convolution of B x
  with decay^l in mode space, O(B P L log L);
- forward, dt given: time-varying, solved by the associative scan (`pairwise_scan`);
- step: one real matmul for B x, six kernels for the complex update, three for the
  readout, all on real tensors (on a GPU, one kernel each for B x, the update and the
  readout, see step_ops); the rest is the discretisation, recomputed from the live parameters on
  every call (once per rollout chunk inside the engine's `shared_derivations` scope, see
  derived.py).

All paths run with autocast off, in the parameters' dtype promoted to at least float32
(see `working_precision`): subclasses read their parameters through `upcast`.

Parameters are real tensors: B is (2, P, H) and C is (2, H, P), holding real and
imaginary parts, so Re and Im of B x come from one matmul against B.flatten(0, 1).
The state is {"h_re": (batch, P), "h_im": (batch, P)}.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lrnn_lightning.models.complex_state import ComplexStateMixer
from lrnn_lightning.models.derived import derived
from lrnn_lightning.models.fft_conv import causal_fft_conv
from lrnn_lightning.models.lti_complex import (
    powers_from_log,
    upcast,
    working_precision,
)
from lrnn_lightning.models.mixer import State
from lrnn_lightning.models.scan import pairwise_scan
from lrnn_lightning.models.step_ops import dual_readout_step, matmul_step, modal_update_step
from lrnn_lightning.models.validation import check_dt, check_sequence


class ModalLTIMixer(ComplexStateMixer):
    """Base of the diagonal complex SSMs with dense complex B and C (see the module doc).

    Subclasses must set `self.B` (2, P, H), `self.C` (2, H, P) and `self.D` (H,) as
    parameters and implement `_discretize`, reading parameters through `upcast`.

    Args:
        d_model: H, features in and out.
        n_modes: P, number of complex modes held in the state.
        output_scale: c in y = c Re(C h) + D x (2 for conjugate-symmetric halves, else 1).
    """

    B: nn.Parameter
    C: nn.Parameter
    D: nn.Parameter

    def __init__(self, d_model: int, n_modes: int, output_scale: float):
        super().__init__()
        self.d_model = d_model
        self.n_modes = n_modes
        self.output_scale = float(output_scale)

    @abc.abstractmethod
    def _discretize(self, dt: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Per-mode (log_decay, input_scale), complex.

        Args:
            dt: None (unit step) or event timesteps of any shape S (e.g. (B,) or (B, L)).

        Returns:
            log_decay and input_scale of shape (P,) for dt=None, else S + (P,), complex of
            at least single precision; input_scale may be None (input enters unscaled).
        """

    def _input_weight(self) -> Tensor:
        """(2P, H) real matrix whose product with x gives [Re(B x), Im(B x)]."""
        return upcast(self.B).flatten(0, 1)

    @classmethod
    def stacked_discretization(cls, mixers: Sequence[ModalLTIMixer]) -> tuple[Tensor, Tensor | None]:
        """`_discretize(None)` of L mixers of this class and one configuration, stacked over layers.

        Returns:
            log_decay (L, P) and input_scale (L, P) complex, None where no layer scales its input (a layer that
            does not, by 1): the same values as stacking each mixer's own. This default stacks those (a
            few ops per layer); subclasses compute them from the stacked parameters in a few ops for all layers,
            which is what the fused kernel's packing replays before every call.
        """
        pairs = [m._discretize(None) for m in mixers]
        if all(scale is None for _, scale in pairs):
            return torch.stack([log_decay for log_decay, _ in pairs]), None
        scales = [torch.ones_like(log_decay) if scale is None else scale for log_decay, scale in pairs]  # None: 1
        return torch.stack([log_decay for log_decay, _ in pairs]), torch.stack(scales)

    @classmethod
    def stacked_input_weights(cls, mixers: Sequence[ModalLTIMixer]) -> Tensor:
        """`_input_weight()` of L mixers of this class and one configuration, stacked: (L, 2P, H) (see
        `stacked_discretization`)."""
        return torch.stack([m._input_weight() for m in mixers])

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_modes={self.n_modes}"

    def _unit_step_coefficients(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(decay, input scale, input weight) of a step without an event timestep."""
        log_decay, scale = self._discretize(None)
        return torch.exp(log_decay), scale, self._input_weight()

    def _readout(self, h_re: Tensor, h_im: Tensor, x: Tensor, step: bool = False) -> Tensor:
        """c Re(C h) + D x for 2-D h_re, h_im (N, P) and x (N, H) -> (N, H); three kernels, or one fused
        step kernel when `step` (see step_ops)."""
        C = upcast(self.C)
        return dual_readout_step(h_re, C[0], h_im, C[1], self.output_scale, x, upcast(self.D), allow_kernel=step)

    def _states(self, x: Tensor, dt: Tensor | None) -> Tensor:
        """All states h_t, complex (B, L, P), from a zero initial state."""
        u = x @ self._input_weight().T
        u = torch.complex(u[..., : self.n_modes], u[..., self.n_modes:])
        log_decay, scale = self._discretize(dt)
        if scale is not None:
            u = u * scale
        if dt is None:
            return causal_fft_conv(u, powers_from_log(log_decay, x.shape[1]))
        return pairwise_scan(torch.exp(log_decay), u)

    def _parallel(self, x: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor]:
        """y (B, L, H) in the output dtype, and all states (B, L, P) complex."""
        batch, length = check_sequence(x, self.d_model, self._owner)
        check_dt(dt, batch, length, self._owner)
        with torch.autocast(x.device.type, enabled=False):  # see `working_precision`
            x, dt, out_dtype = working_precision(self.D, x, dt)
            h = self._states(x, dt)
            y = self._readout(h.real.flatten(0, 1), h.imag.flatten(0, 1), x.flatten(0, 1))
        return y.view(batch, length, self.d_model).to(out_dtype), h

    def forward(self, x: Tensor, dt: Tensor | None = None) -> Tensor:
        """Parallel pass from a zero state.

        Args:
            x: input, shape (B, L, H).
            dt: optional event timesteps, shape (B, L), positive.

        Returns:
            y of shape (B, L, H).
        """
        return self._parallel(x, dt)[0]

    def prefill(self, x: Tensor, dt: Tensor | None = None) -> tuple[Tensor, State]:
        """Parallel pass that also returns the state after the last step.

        Args:
            x: context, shape (B, L, H).
            dt: optional event timesteps, shape (B, L).

        Returns:
            y (B, L, H) and the state {"h_re", "h_im"}, each (B, P), both in y's dtype.
        """
        y, h = self._parallel(x, dt)
        return y, self._state_from(h[:, -1], y.dtype)

    def _state_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.n_modes)

    def _complex_step(self, x_t: Tensor, state: State, dt_t: Tensor | None) -> Tensor:
        if dt_t is None:  # time-invariant: every weight-derived tensor is shared across a chunk
            decay, scale, weight = derived(self, "step", self._unit_step_coefficients)
        else:
            log_decay, scale = self._discretize(dt_t)
            decay, weight = torch.exp(log_decay), derived(self, "input_weight", self._input_weight)
        u = matmul_step(x_t, weight)
        u_re, u_im = u[:, : self.n_modes], u[:, self.n_modes:]
        h_re, h_im = modal_update_step(state["h_re"], state["h_im"], decay, u_re, u_im, scale)
        return self._readout(h_re, h_im, x_t, step=True)
