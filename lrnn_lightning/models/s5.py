"""S5: the simplified state space layer (Smith, Warrington & Linderman, 2023), a MIMO
diagonal SSM, with the event-driven timesteps of Event-SSM (Schoene et al., 2024).

Continuous time, per mode p of a complex diagonal state:

    h' = Lambda h + B x        y = c Re(C h) + D x

Lambda (P,), B (P, H), C (H, P) complex, D (H,) real, and a learnable step Delta_p =
exp(log_step_p) per mode. It is discretised with the rule named by `discretization`:

- "zoh":      decay exp(Delta Lambda), B-bar = (exp(Delta Lambda) - 1) / Lambda * B
- "bilinear": decay (1 + Delta Lambda/2) / (1 - Delta Lambda/2), B-bar = Delta / (1 - Delta Lambda/2) * B
- "dirac":    decay exp(Delta Lambda), B-bar = B (each input is an impulse, as in Event-SSM)

Event mode: the step over an event gap dt is dt * Delta, so both the transition and
(for zoh, bilinear) the input matrix depend on dt.

With `conj_sym=True` (the default) only one mode of each conjugate pair is kept,
P = d_state / 2, and c = 2; otherwise P = d_state and c = 1.

Initialisation follows S5: Lambda and the eigenvectors V come from the normal part of
the HiPPO-LegS matrix (HiPPO-N), B = V^-1 B0 and C = C0 V for Gaussian B0, C0, and the
log steps are log-uniform in [dt_min, dt_max]. Re(Lambda) is parameterised as
-exp(Lambda_real_log), so the system is stable for every parameter value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lrnn_lightning.models.lti_complex import eigenvalues_from_log, stacked_eigenvalues, stacked_parameter, upcast
from lrnn_lightning.models.lti_discretization import get_discretization
from lrnn_lightning.models.lti_init import check_even_state, check_step_range, log_uniform
from lrnn_lightning.models.lti_modal import ModalLTIMixer
from lrnn_lightning.models.validation import check_positive_int


def hippo_normal_eig(n: int) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the n x n HiPPO-N matrix (the normal part of HiPPO-LegS).

    HiPPO-N = -1/2 I + S with S skew-symmetric, S_nk = -1/2 sqrt((2n+1)(2k+1)) sign(n - k),
    so its eigenvalues are -1/2 + i w with w real (from the Hermitian matrix -i S) and
    its eigenvectors are unitary.

    Returns:
        eigenvalues, complex128 (n,), sorted by increasing imaginary part, and the
        unitary eigenvector matrix V, complex128 (n, n), columns in the same order.
    """
    idx = torch.arange(n, dtype=torch.float64)
    scale = torch.sqrt(2 * idx + 1)
    skew = -0.5 * torch.outer(scale, scale) * torch.sign(idx[:, None] - idx[None, :])
    w, vectors = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    return torch.complex(torch.full_like(w, -0.5), w), vectors


class S5(ModalLTIMixer):
    """S5 mixer: (B, L, d_model) -> (B, L, d_model).

    Args:
        d_model: H, features in and out.
        d_state: size of the HiPPO-N state; the layer keeps P = d_state / 2 modes with
            `conj_sym`, else P = d_state.
        discretization: "zoh", "bilinear" or "dirac" (see the module doc).
        conj_sym: keep one mode per conjugate pair and output 2 Re(C h); needs an even d_state.
        dt_min, dt_max: range of the initial per-mode step Delta.

    State: {"h_re", "h_im"}, each (batch, P).

    Example:
        >>> s5 = S5(d_model=32, d_state=64, discretization="dirac")
        >>> y = s5(torch.randn(4, 100, 32), dt=torch.rand(4, 100) + 0.1)   # (4, 100, 32)
    """

    def __init__(self, d_model: int, d_state: int, discretization: str = "zoh", conj_sym: bool = True,
                 dt_min: float = 0.001, dt_max: float = 0.1):
        check_positive_int(d_model, "d_model", "S5")
        check_positive_int(d_state, "d_state", "S5")
        rule = get_discretization(discretization, "S5")
        if conj_sym:
            check_even_state(d_state, "S5", "with conj_sym=True (modes are kept in conjugate pairs)")
        check_step_range(dt_min, dt_max, "S5")
        n_modes = d_state // 2 if conj_sym else d_state
        super().__init__(d_model, n_modes, output_scale=2.0 if conj_sym else 1.0)
        self._rule = rule
        self.discretization = discretization.lower()
        self.conj_sym = bool(conj_sym)

        eigenvalues, vectors = hippo_normal_eig(d_state)
        keep = slice(d_state - n_modes, d_state)  # with conj_sym: the modes with Im(Lambda) > 0
        eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
        b0 = torch.randn(d_state, d_model, dtype=torch.float64) / math.sqrt(d_model)
        c0 = torch.complex(torch.randn(d_model, d_state, dtype=torch.float64),
                           torch.randn(d_model, d_state, dtype=torch.float64)) / math.sqrt(2 * d_state)
        b = vectors.conj().T @ b0.to(torch.complex128)  # V^-1 = V^H for unitary V
        c = c0 @ vectors
        self.Lambda_real_log = nn.Parameter(torch.log(-eigenvalues.real).float())
        self.Lambda_imag = nn.Parameter(eigenvalues.imag.float())
        self.log_step = nn.Parameter(log_uniform((n_modes,), dt_min, dt_max))
        self.B = nn.Parameter(torch.stack([b.real, b.imag]).float())
        self.C = nn.Parameter(torch.stack([c.real, c.imag]).float())
        self.D = nn.Parameter(torch.randn(d_model))

    def eigenvalues(self) -> Tensor:
        """Continuous-time Lambda, complex (P,)."""
        return eigenvalues_from_log(upcast(self.Lambda_real_log), upcast(self.Lambda_imag))

    def _discretize(self, dt: Tensor | None) -> tuple[Tensor, Tensor | None]:
        delta = torch.exp(upcast(self.log_step))
        if dt is not None:
            delta = dt.unsqueeze(-1) * delta
        return self._rule(self.eigenvalues(), delta)

    @classmethod
    def stacked_eigenvalues(cls, mixers: Sequence[S5]) -> Tensor:
        """Lambda of L S5 layers of one size, stacked: (L, P) complex."""
        return stacked_eigenvalues(mixers, "Lambda_real_log", "Lambda_imag")

    @classmethod
    def stacked_steps(cls, mixers: Sequence[S5]) -> Tensor:
        """Delta = exp(log_step) of L S5 layers of one size, stacked: (L, P) real."""
        return torch.exp(stacked_parameter(mixers, "log_step"))

    @classmethod
    def stacked_discretization(cls, mixers: Sequence[S5]) -> tuple[Tensor, Tensor | None]:
        rule = mixers[0]._rule
        if any(m._rule is not rule for m in mixers):  # layers of several rules: each its own
            return super().stacked_discretization(mixers)
        return rule(cls.stacked_eigenvalues(mixers), cls.stacked_steps(mixers))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_modes={self.n_modes}, discretization={self.discretization!r}, "
                f"conj_sym={self.conj_sym}")
