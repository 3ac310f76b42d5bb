"""LRU: the Linear Recurrent Unit (Orvieto et al., 2023, "Resurrecting Recurrent Neural
Networks for Long Sequences").

    h_t = lambda * h_{t-1} + gamma * (B x_t)        y_t = Re(C h_t) + D x_t

with a complex diagonal lambda = exp(-exp(nu_log) + i exp(theta_log)), whose magnitude
is < 1 for any parameter value, initialised uniformly on the ring r_min <= |lambda| <= r_max
with phase in [0, max_phase]; gamma = exp(gamma_log) starts at sqrt(1 - |lambda|^2) so
every mode's state keeps the variance of its input.

Event mode (dt given): lambda^dt = exp(dt (-exp(nu_log) + i exp(theta_log))), the exact
decay over an interval dt of the continuous system whose unit step is lambda. gamma does
not depend on dt: each event is an impulse that adds gamma * B x_t to the state whatever
the gap before it (the Dirac input of Event-SSM). Then dt = 1 everywhere reproduces the
plain LRU exactly, and the state after a long gap decays instead of being rescaled.
forward and step share this rule. With dt[t] the gap from sample t to t + 1 (the data's
convention), step t decays the state carried into it by dt[t] and adds x_t undecayed, so a
sequence's first gap dt[:, 0] does not change its outputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lrnn_lightning.models.lti_complex import stacked_parameter, upcast
from lrnn_lightning.models.lti_modal import ModalLTIMixer
from lrnn_lightning.models.validation import check_positive_int


def lru_log_lambda(nu_log: Tensor, theta_log: Tensor) -> Tensor:
    """log lambda = -exp(nu_log) + i exp(theta_log), complex, of the parameters' shape (..., P)."""
    return torch.complex(-torch.exp(nu_log), torch.exp(theta_log))


def lru_input_weight(B: Tensor, gamma_log: Tensor) -> Tensor:
    """B (..., 2, P, H), each mode's row scaled by gamma = exp(gamma_log) (..., P), as [Re; Im] rows (..., 2P, H)."""
    return (B * torch.exp(gamma_log)[..., None, :, None]).flatten(-3, -2)


class LRU(ModalLTIMixer):
    """Linear Recurrent Unit mixer: (B, L, d_model) -> (B, L, d_model).

    Args:
        d_model: H, features in and out.
        d_state: P, number of complex modes.
        r_min: smallest initial eigenvalue magnitude, in [0, 1).
        r_max: largest initial eigenvalue magnitude, in (r_min, 1]; below 1 keeps
            long autoregressive rollouts from ringing.
        max_phase: initial eigenvalue phases are uniform in [0, max_phase].

    State: {"h_re", "h_im"}, each (batch, d_state).

    Example:
        >>> lru = LRU(d_model=32, d_state=64)
        >>> y = lru(torch.randn(4, 100, 32))                          # (4, 100, 32)
        >>> y_events = lru(torch.randn(4, 100, 32), torch.rand(4, 100) + 0.5)
    """

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.4, r_max: float = 0.99,
                 max_phase: float = 2 * math.pi):
        check_positive_int(d_model, "d_model", "LRU")
        check_positive_int(d_state, "d_state", "LRU")
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(
                f"LRU: expected 0 <= r_min < r_max <= 1 for the eigenvalue ring, got r_min={r_min!r}, "
                f"r_max={r_max!r}. HINT: magnitudes >= 1 would make the recurrence unstable."
            )
        if not 0.0 < max_phase <= 2 * math.pi:
            raise ValueError(f"LRU: expected max_phase in (0, 2*pi], got {max_phase!r}.")
        super().__init__(d_model, d_state, output_scale=1.0)
        # uniform on the ring: |lambda|^2 uniform in [r_min^2, r_max^2]; the clamp keeps
        # log() finite in the corner case r_min = 0, r_max = 1
        u1, u2 = torch.rand(d_state), torch.rand(d_state)
        magnitude_sq = (u1 * (r_max**2 - r_min**2) + r_min**2).clamp(1e-8, 1 - 1e-7)
        self.nu_log = nn.Parameter(torch.log(-0.5 * torch.log(magnitude_sq)))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2.clamp_min(1e-4)))
        self.gamma_log = nn.Parameter(0.5 * torch.log1p(-magnitude_sq))
        self.B = nn.Parameter(torch.randn(2, d_state, d_model) / math.sqrt(2 * d_model))
        self.C = nn.Parameter(torch.randn(2, d_model, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model))

    def eigenvalues(self) -> Tensor:
        """lambda, complex (d_state,): the decay over a unit step."""
        return torch.exp(self._log_lambda())

    def _log_lambda(self) -> Tensor:
        return lru_log_lambda(upcast(self.nu_log), upcast(self.theta_log))

    def _discretize(self, dt: Tensor | None) -> tuple[Tensor, None]:
        log_lambda = self._log_lambda()
        return (log_lambda if dt is None else dt.unsqueeze(-1) * log_lambda), None

    def _input_weight(self) -> Tensor:
        return lru_input_weight(upcast(self.B), upcast(self.gamma_log))

    @classmethod
    def stacked_log_lambda(cls, mixers: Sequence[LRU]) -> Tensor:
        """log lambda of L LRUs of one size, stacked: (L, P) complex."""
        return lru_log_lambda(stacked_parameter(mixers, "nu_log"), stacked_parameter(mixers, "theta_log"))

    @classmethod
    def stacked_discretization(cls, mixers: Sequence[LRU]) -> tuple[Tensor, None]:
        return cls.stacked_log_lambda(mixers), None

    @classmethod
    def stacked_input_weights(cls, mixers: Sequence[LRU]) -> Tensor:
        return lru_input_weight(stacked_parameter(mixers, "B"), stacked_parameter(mixers, "gamma_log"))
