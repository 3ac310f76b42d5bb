"""What is specific to the LTI mixers (LRU, S4D, S5): their initialisation, their maths
against a float64 reference written from the papers' equations, the FFT path against
the scan path, the discretisations, event mode, and their constructor errors."""

from __future__ import annotations

import math

import pytest
import torch

from lrnn_lightning.models.fft_conv import causal_fft_conv
from lrnn_lightning.models.lru import LRU
from lrnn_lightning.models.s4d import S4D
from lrnn_lightning.models.s5 import S5, hippo_normal_eig
from tests.conftest import relative_error
from tests.helpers import perturb_parameters, random_dt

TOL = 2e-5
D_MODEL, D_STATE, BATCH, LENGTH = 6, 8, 2, 29

LTI_CASES = [
    pytest.param(LRU, {}, id="lru"),
    pytest.param(S4D, {}, id="s4d"),
    pytest.param(S5, {}, id="s5-zoh"),
    pytest.param(S5, {"discretization": "bilinear"}, id="s5-bilinear"),
    pytest.param(S5, {"discretization": "dirac"}, id="s5-dirac"),
    pytest.param(S5, {"conj_sym": False}, id="s5-full"),
]


def make(cls, kwargs, d_state=D_STATE, dtype=torch.float32):
    torch.manual_seed(0)
    mixer = cls(D_MODEL, d_state, **kwargs)
    perturb_parameters(mixer)
    return mixer.to(dtype).eval()


# ---- float64 references, one step at a time, straight from the papers' equations ----

def _complex(pair):
    return torch.complex(pair[0].double(), pair[1].double())


def lru_reference(m: LRU, x, dt):
    p = {k: v.detach().double() for k, v in m.named_parameters()}
    log_lam = torch.complex(-p["nu_log"].exp(), p["theta_log"].exp())
    b = _complex(m.B.detach()) * p["gamma_log"].exp()[:, None]
    c = _complex(m.C.detach())
    h = torch.zeros(x.shape[0], m.n_modes, dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        lam = torch.exp(log_lam * dt[:, t, None])
        h = lam * h + x[:, t].to(h.dtype) @ b.T
        ys.append((h @ c.T).real + p["D"] * x[:, t])
    return torch.stack(ys, 1)


def s4d_reference(m: S4D, x, dt):
    p = {k: v.detach().double() for k, v in m.named_parameters()}
    a = torch.complex(-p["A_real_log"].exp(), p["A_imag"])
    c = _complex(m.C.detach())
    h = torch.zeros(x.shape[0], m.d_model, m.n_modes, dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        delta = (dt[:, t, None] * p["log_dt"].exp())[..., None]  # (B, H, 1)
        lam = torch.exp(delta * a)
        h = lam * h + (lam - 1) / a * x[:, t, :, None]
        ys.append(2 * (h * c).sum(-1).real + p["D"] * x[:, t])
    return torch.stack(ys, 1)


def s5_reference(m: S5, x, dt):
    p = {k: v.detach().double() for k, v in m.named_parameters()}
    lam_c = torch.complex(-p["Lambda_real_log"].exp(), p["Lambda_imag"])
    b, c = _complex(m.B.detach()), _complex(m.C.detach())
    h = torch.zeros(x.shape[0], m.n_modes, dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        delta = dt[:, t, None] * p["log_step"].exp()  # (B, P)
        if m.discretization == "bilinear":  # (I - Delta/2 Lambda)^-1 (I + Delta/2 Lambda), diagonal
            lam = (1 + delta / 2 * lam_c) / (1 - delta / 2 * lam_c)
            gain = delta / (1 - delta / 2 * lam_c)
        else:
            lam = torch.exp(delta * lam_c)
            gain = (lam - 1) / lam_c if m.discretization == "zoh" else torch.ones_like(lam)
        h = lam * h + gain * (x[:, t].to(h.dtype) @ b.T)
        ys.append(m.output_scale * (h @ c.T).real + p["D"] * x[:, t])
    return torch.stack(ys, 1)


REFERENCES = {LRU: lru_reference, S4D: s4d_reference, S5: s5_reference}


@pytest.mark.parametrize("cls,kwargs", LTI_CASES)
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_forward_matches_the_float64_reference(cls, kwargs, event):
    mixer = make(cls, kwargs, dtype=torch.float64)
    x = torch.randn(BATCH, LENGTH, D_MODEL, dtype=torch.float64)
    dt = random_dt(BATCH, LENGTH).double() if event else None
    with torch.no_grad():
        y = mixer(x, dt)
    reference = REFERENCES[cls](mixer, x, torch.ones(BATCH, LENGTH, dtype=torch.float64) if dt is None else dt)
    assert relative_error(y, reference) < 1e-10


@pytest.mark.parametrize("cls,kwargs", LTI_CASES)
def test_fft_path_equals_scan_path(cls, kwargs):
    mixer = make(cls, kwargs)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        y_fft, state_fft = mixer.prefill(x)
        y_scan, state_scan = mixer.prefill(x, torch.ones(BATCH, LENGTH))
    assert relative_error(y_fft, y_scan) < TOL
    for key in state_scan:
        assert relative_error(state_fft[key], state_scan[key]) < TOL, key


@pytest.mark.parametrize("cls,kwargs", LTI_CASES)
def test_step_accepts_dt_of_shape_b_or_b1(cls, kwargs):
    mixer = make(cls, kwargs)
    x, dt = torch.randn(BATCH, D_MODEL), random_dt(BATCH, 1)
    state_a, state_b = mixer.allocate_state(BATCH), mixer.allocate_state(BATCH)
    with torch.no_grad():
        y_a = mixer.step(x, state_a, dt[:, 0])
        y_b = mixer.step(x, state_b, dt)
    assert torch.equal(y_a, y_b)


@pytest.mark.parametrize("cls,kwargs", LTI_CASES)
def test_event_timesteps_change_the_output(cls, kwargs):
    mixer = make(cls, kwargs)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        mixer.D.zero_()  # compare only the recurrent part
        y_plain = mixer(x)
        y_event = mixer(x, random_dt(BATCH, LENGTH))
    assert relative_error(y_event, y_plain) > 0.05


@pytest.mark.parametrize("kwargs", [{}, {"discretization": "bilinear"}, {"discretization": "dirac"}],
                         ids=["zoh", "bilinear", "dirac"])
def test_s5_event_step_is_dt_times_the_learned_step(kwargs):
    mixer = make(S5, kwargs)
    x, dt = torch.randn(BATCH, LENGTH, D_MODEL), random_dt(BATCH, LENGTH)
    with torch.no_grad():
        y = mixer(x, 2 * dt)
        mixer.log_step.add_(math.log(2.0))
        y_doubled_step = mixer(x, dt)
    assert relative_error(y_doubled_step, y) < TOL


def test_s4d_event_step_is_dt_times_the_learned_step():
    mixer = make(S4D, {})
    x, dt = torch.randn(BATCH, LENGTH, D_MODEL), random_dt(BATCH, LENGTH)
    with torch.no_grad():
        y = mixer(x, 3 * dt)
        mixer.log_dt.add_(math.log(3.0))
        y_tripled_step = mixer(x, dt)
    assert relative_error(y_tripled_step, y) < TOL


def test_lru_eigenvalues_start_on_the_ring():
    torch.manual_seed(0)
    r_min, r_max, max_phase = 0.6, 0.9, 1.5
    lru = LRU(D_MODEL, 512, r_min=r_min, r_max=r_max, max_phase=max_phase)
    lam = lru.eigenvalues().detach()
    magnitude, phase = lam.abs(), lam.angle()
    assert magnitude.min() >= r_min - 1e-6 and magnitude.max() <= r_max + 1e-6
    # spread over the whole ring, not collapsed to one radius
    assert magnitude.min() < r_min + 0.02 and magnitude.max() > r_max - 0.02
    assert phase.min() >= 0 and phase.max() <= max_phase + 1e-6 and phase.max() > 0.9 * max_phase
    # gamma normalises each mode's stationary variance: gamma^2 = 1 - |lambda|^2
    torch.testing.assert_close(lru.gamma_log.exp() ** 2, 1 - magnitude**2, rtol=1e-4, atol=1e-6)


def test_lru_with_unit_dt_and_dt_two_is_the_squared_eigenvalue():
    lru = make(LRU, {})
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    squared = make(LRU, {})
    with torch.no_grad():
        squared.nu_log.add_(math.log(2.0))     # |lambda|^2 = exp(-2 exp(nu_log))
        squared.theta_log.add_(math.log(2.0))  # arg(lambda^2) = 2 exp(theta_log)
        y_dt2 = lru(x, torch.full((BATCH, LENGTH), 2.0))
        y_sq = squared(x)
    assert relative_error(y_dt2, y_sq) < TOL


def test_s4d_starts_from_s4d_lin():
    s4d = S4D(D_MODEL, 2 * 5, dt_min=0.01, dt_max=0.05)
    a = s4d.eigenvalues().detach()
    s4d_lin = torch.complex(torch.full((D_MODEL, 5), -0.5), math.pi * torch.arange(5.0).expand(D_MODEL, 5))
    torch.testing.assert_close(a, s4d_lin)
    step = s4d.log_dt.detach().exp()
    assert step.min() >= 0.01 - 1e-7 and step.max() <= 0.05 + 1e-7


def test_hippo_normal_eig_diagonalises_the_normal_part_of_legs():
    n = 10
    idx = torch.arange(n, dtype=torch.float64)
    legs = -torch.sqrt(torch.outer(2 * idx + 1, 2 * idx + 1)).tril(-1) - torch.diag(idx + 1)
    p = torch.sqrt(idx + 0.5)
    hippo_n = (legs + torch.outer(p, p)).to(torch.complex128)
    lam, v = hippo_normal_eig(n)
    torch.testing.assert_close(v @ torch.diag(lam) @ v.conj().T, hippo_n)
    torch.testing.assert_close(lam.real, torch.full((n,), -0.5, dtype=torch.float64))


def test_s5_conj_sym_keeps_one_of_each_pair():
    half, full = S5(D_MODEL, 8), S5(D_MODEL, 8, conj_sym=False)
    assert (half.n_modes, full.n_modes) == (4, 8)
    assert (half.output_scale, full.output_scale) == (2.0, 1.0)
    lam_half, lam_full = half.eigenvalues().detach(), full.eigenvalues().detach()
    assert torch.all(lam_half.imag > 0)
    # the full spectrum is the kept half and its conjugates
    both = torch.cat([lam_half, lam_half.conj()])
    torch.testing.assert_close(both.imag.sort().values, lam_full.imag.sort().values)


def test_s5_zoh_and_bilinear_agree_for_a_small_step_only():
    zoh, bilinear = make(S5, {}), make(S5, {"discretization": "bilinear"})
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    gaps = []
    for log_step in (math.log(1e-3), math.log(1.0)):
        with torch.no_grad():
            for m in (zoh, bilinear):
                m.log_step.fill_(log_step)
                m.D.zero_()
            gaps.append(relative_error(bilinear(x), zoh(x)))
    assert gaps[0] < 1e-4, "ZOH and bilinear must agree to second order in the step"
    assert gaps[1] > 1e-2, "at a unit step they must differ, or this check proves nothing"


def test_s5_conj_sym_with_odd_d_state_raises():
    with pytest.raises(ValueError, match=r"d_state must be even with conj_sym=True.*got d_state=7.*HINT"):
        S5(D_MODEL, 7)
    assert S5(D_MODEL, 7, conj_sym=False).n_modes == 7


def test_s5_unknown_discretization_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown discretization 'euler'\. Valid names: zoh, bilinear, dirac"):
        S5(D_MODEL, D_STATE, discretization="euler")


def test_constructor_errors_name_the_bad_value():
    with pytest.raises(ValueError, match=r"S4D: d_state must be even.*got d_state=5"):
        S4D(D_MODEL, 5)
    with pytest.raises(ValueError, match=r"r_min=0\.9, r_max=0\.5"):
        LRU(D_MODEL, D_STATE, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match=r"max_phase in \(0, 2\*pi\], got 7"):
        LRU(D_MODEL, D_STATE, max_phase=7.0)
    with pytest.raises(ValueError, match=r"dt_min=0\.5, dt_max=0\.1"):
        S5(D_MODEL, D_STATE, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match=r"d_model must be a positive integer, got 0"):
        LRU(0, D_STATE)


@pytest.mark.parametrize("complex_input", [False, True], ids=["real", "complex"])
def test_causal_fft_conv_matches_direct_convolution(complex_input):
    dtype = torch.complex128 if complex_input else torch.float64
    u, kernel = torch.randn(2, 13, 3, dtype=dtype), torch.randn(9, 3, dtype=dtype)
    direct = torch.stack([sum(kernel[j] * u[:, t - j] for j in range(min(t + 1, 9))) for t in range(13)], 1)
    assert relative_error(torch.view_as_real(causal_fft_conv(u, kernel).to(torch.complex128)),
                          torch.view_as_real(direct.to(torch.complex128))) < 1e-12
    with pytest.raises(ValueError, match=r"kernel length 14 exceeds the sequence length 13"):
        causal_fft_conv(u, torch.randn(14, 3, dtype=dtype))


def test_long_rollout_step_loop_stays_on_the_fft_forward():
    """Slow modes (|lambda| near 1) over a few hundred steps: rounding must not build up."""
    lru = make(LRU, {"r_min": 0.99, "r_max": 0.999})
    x = torch.randn(1, 300, D_MODEL)
    with torch.no_grad():
        y = lru(x)
        state = lru.allocate_state(1)
        y_loop = torch.stack([lru.step(x[:, t], state) for t in range(x.shape[1])], 1)
    assert relative_error(y_loop, y) < TOL


@pytest.mark.parametrize("cls,kwargs", LTI_CASES)
def test_autocast_and_float64_timesteps_run_in_the_parameters_precision(cls, kwargs):
    """Complex tensors have no bfloat16 kind: under autocast the mixers compute in float32."""
    mixer = make(cls, kwargs)
    x, dt = torch.randn(BATCH, LENGTH, D_MODEL), random_dt(BATCH, LENGTH)
    with torch.no_grad():
        y = mixer(x, dt)
        state = mixer.allocate_state(BATCH)
        y_step = mixer.step(x[:, 0], state, dt[:, 0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_autocast = mixer(x.bfloat16(), dt.double())
            state = mixer.allocate_state(BATCH)
            y_step_autocast = mixer.step(x[:, 0], state, dt[:, 0].double())
    assert y_autocast.dtype == torch.float32 and state["h_re"].dtype == torch.float32
    assert relative_error(y_autocast, mixer(x.bfloat16().float(), dt)) < TOL
    assert relative_error(y_step_autocast, y_step) < TOL
    assert relative_error(y_autocast, y) < 2e-2  # only the bfloat16 rounding of x differs


MODAL_CASES = [case for case in LTI_CASES if case.values[0] is not S4D]


def make_layers(cls, kwargs, n_layers=3, dtype=torch.float32):
    layers = []
    for seed in range(n_layers):
        torch.manual_seed(seed)
        mixer = cls(D_MODEL, D_STATE, **kwargs)
        perturb_parameters(mixer, seed=seed)
        layers.append(mixer.to(dtype))
    return layers


@pytest.mark.parametrize("cls,kwargs", MODAL_CASES)
@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stacked_coefficients_are_each_layers_own(cls, kwargs, n_layers, dtype):
    """The batched coefficients the fused packing reads equal each layer's own methods bit for bit."""
    layers = make_layers(cls, kwargs, n_layers, dtype)
    log_decay, scale = cls.stacked_discretization(layers)
    own = [m._discretize(None) for m in layers]
    assert log_decay.shape == (n_layers, layers[0].n_modes) and log_decay.abs().min() > 0
    assert torch.equal(log_decay, torch.stack([pair[0] for pair in own]))
    assert (scale is None) == (own[0][1] is None)
    if scale is not None:
        assert torch.equal(scale, torch.stack([pair[1] for pair in own]))
    weights = cls.stacked_input_weights(layers)
    assert weights.shape == (n_layers, 2 * layers[0].n_modes, D_MODEL)
    assert torch.equal(weights, torch.stack([m._input_weight() for m in layers]))
    if cls is LRU:
        assert torch.equal(LRU.stacked_log_lambda(layers), torch.stack([m._log_lambda() for m in layers]))
    else:
        assert torch.equal(S5.stacked_eigenvalues(layers), torch.stack([m.eigenvalues() for m in layers]))
        assert torch.equal(S5.stacked_steps(layers), torch.stack([m.log_step.float().exp() for m in layers]))


def test_stacked_s5_layers_of_several_rules_take_each_layers_own():
    layers = make_layers(S5, {"discretization": "zoh"}, 2) + make_layers(S5, {"discretization": "dirac"}, 1)
    log_decay, scale = S5.stacked_discretization(layers)
    assert torch.equal(log_decay, torch.stack([m._discretize(None)[0] for m in layers]))
    # dirac's input enters unscaled, so its layer scales by 1 (the fused kernel does not cover such a model,
    # support.model_coverage; this must only not be wrong)
    assert torch.equal(scale[:2], torch.stack([m._discretize(None)[1] for m in layers[:2]]))
    assert torch.equal(scale[2], torch.ones_like(scale[2])) and not torch.equal(scale[0], torch.ones_like(scale[0]))
