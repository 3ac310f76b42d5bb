"""What is specific to the time-varying mixers Mamba (S6) and RG-LRU and their causal conv.

The shared step protocol is checked in test_models_protocol.py; here: the conv window,
the chunked selective scan, event-mode formulas against recurrences written out by hand,
initialisation ranges, and the memory the parallel path keeps for backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lrnn_lightning.models.causal_conv import CausalConv1d
from lrnn_lightning.models.mamba import Mamba, selective_scan
from lrnn_lightning.models.rglru import RGLRU, _SqrtWithBoundedGrad
from tests.conftest import relative_error
from tests.helpers import perturb_parameters, random_dt

TOL = 2e-5
BATCH, D_MODEL = 2, 8


def _mixer(cls, **kwargs):
    mixer = cls(D_MODEL, 4, **kwargs)
    perturb_parameters(mixer, scale=0.1)
    return mixer.eval()


def _step_loop(module, x, dt=None, state=None):
    state = module.allocate_state(x.shape[0], x.device, x.dtype) if state is None else state
    ys = [module.step(x[:, t], state, None if dt is None else dt[:, t]) for t in range(x.shape[1])]
    return torch.stack(ys, dim=1), state


# ---------------------------------------------------------------- causal conv


@pytest.mark.parametrize("kernel_size", [1, 2, 4])
def test_causal_conv_step_loop_equals_forward_and_final_window(kernel_size):
    conv = CausalConv1d(5, kernel_size)
    x = torch.randn(BATCH, 9, 5)
    window = conv.allocate_window(BATCH)
    with torch.no_grad():
        y_loop = torch.stack([conv.step(x[:, t], window) for t in range(9)], dim=1)
        y = conv(x)
    assert relative_error(y_loop, y) < 1e-6
    assert torch.equal(window, conv.final_window(x))
    assert torch.equal(conv.final_window(x), x[:, 9 - (kernel_size - 1):].transpose(1, 2))


def test_causal_conv_final_window_of_a_short_context_is_zero_padded_on_the_old_side():
    conv = CausalConv1d(3, 5)
    x = torch.randn(BATCH, 2, 3)
    window = conv.final_window(x)
    assert window.shape == (BATCH, 3, 4)
    assert torch.count_nonzero(window[..., :2]) == 0
    assert torch.equal(window[..., 2:], x.transpose(1, 2))


def test_causal_conv_rejects_a_bad_kernel_size():
    with pytest.raises(ValueError, match=r"kernel_size must be a positive integer, got 0"):
        CausalConv1d(3, 0)


# ---------------------------------------------------------------- conv window after prefill


@pytest.mark.parametrize("cls", [Mamba, RGLRU])
@pytest.mark.parametrize("event", [False, True])
def test_prefill_shorter_than_the_conv_window_then_step_equals_forward(cls, event):
    mixer = _mixer(cls, d_conv=4)
    x = torch.randn(BATCH, 12, D_MODEL)
    dt = random_dt(BATCH, 12) if event else None
    with torch.no_grad():
        y_full = mixer(x, dt)
        _, state = mixer.prefill(x[:, :2], None if dt is None else dt[:, :2])
        pre_conv = mixer.in_proj(x[:, :2]).chunk(2, dim=-1)[0]  # the conv's inputs
        window = state["conv"].clone()
        y_rest, _ = _step_loop(mixer, x[:, 2:], None if dt is None else dt[:, 2:], state)
    assert window.shape == (BATCH, pre_conv.shape[-1], 3)
    assert torch.count_nonzero(window[..., 0]) == 0
    assert relative_error(window[..., 1:], pre_conv.transpose(1, 2)) < 1e-6
    assert relative_error(y_rest, y_full[:, 2:]) < TOL


# ---------------------------------------------------------------- Mamba


def _mamba_reference(mixer: Mamba, x, dt=None):
    """The S6 recurrence written out step by step from the module's weights (float64)."""
    mixer = mixer.double()
    x_in, z = mixer.in_proj(x.double()).chunk(2, dim=-1)
    u = F.silu(mixer.conv(x_in))
    dt_low, B, C = mixer.x_proj(u).split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    delta = F.softplus(mixer.dt_proj(dt_low))
    A = -torch.exp(mixer.A_log)
    h = torch.zeros(x.shape[0], mixer.d_inner, mixer.d_state, dtype=torch.float64)
    ys = []
    for t in range(x.shape[1]):
        step_size = delta[:, t, :, None] if dt is None else dt[:, t, None, None].double()
        h = torch.exp(step_size * A) * h + delta[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + mixer.D * u[:, t])
    y = mixer.out_proj(torch.stack(ys, dim=1) * F.silu(z))
    mixer.float()
    return y, h


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_mamba_matches_the_written_out_recurrence_with_dt_in_the_decay_only(event):
    mixer = _mixer(Mamba, scan_chunk_size=8)
    x = torch.randn(BATCH, 21, D_MODEL)
    dt = random_dt(BATCH, 21) if event else None
    with torch.no_grad():
        y_ref, h_ref = _mamba_reference(mixer, x, dt)
        y, state = mixer.prefill(x, dt)
    assert relative_error(y, y_ref) < TOL
    assert relative_error(state["h"], h_ref) < TOL


@pytest.mark.parametrize("cls", [Mamba, RGLRU])
def test_event_dt_changes_the_output(cls):
    mixer = _mixer(cls)
    x = torch.randn(BATCH, 10, D_MODEL)
    with torch.no_grad():
        assert relative_error(mixer(x, random_dt(BATCH, 10)), mixer(x)) > 1e-3


def test_mamba_delta_bias_starts_in_the_dt_range():
    mixer = Mamba(32, 4, dt_min=0.01, dt_max=0.05)
    delta = F.softplus(mixer.dt_proj.bias)
    assert delta.min() >= 0.01 * (1 - 1e-5) and delta.max() <= 0.05 * (1 + 1e-5)
    assert delta.max() / delta.min() > 1.5, "the biases should spread over the range"
    assert torch.allclose(-torch.exp(mixer.A_log[0]), -torch.arange(1.0, 5.0))  # S4D-real


@pytest.mark.parametrize("event", [False, True])
def test_selective_scan_is_the_same_across_chunk_sizes_and_checkpointing(event):
    b, length, e, n = 2, 37, 3, 4
    inputs = [torch.randn(b, length, e), F.softplus(torch.randn(b, length, e)), -torch.rand(e, n) * 3,
              torch.randn(b, length, n), torch.randn(b, length, n)]
    decay_time = random_dt(b, length) if event else None
    h0 = torch.randn(b, e, n)
    results = []
    for chunk_size, checkpoint_chunks in ((5, True), (16, False), (16, True), (64, False)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, h = selective_scan(*leaves, decay_time=decay_time, h0=h0, chunk_size=chunk_size,
                              checkpoint_chunks=checkpoint_chunks)
        (y.square().sum() + h.sum()).backward()
        results.append((y.detach(), h.detach(), [t.grad for t in leaves]))
    y_ref, h_ref, grads_ref = results[-1]  # a single chunk, no checkpoint
    for y, h, grads in results[:-1]:
        assert relative_error(y, y_ref) < 1e-6 and relative_error(h, h_ref) < 1e-6
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            assert relative_error(grad, grad_ref) < 1e-5


def test_mamba_backward_keeps_far_less_than_one_full_state_history():
    """Chunk checkpointing: autograd must not hold (B, L, E, N) tensors for the whole sequence."""
    mixer = Mamba(8, 64, scan_chunk_size=16).train()
    x = torch.randn(2, 256, 8)
    full_history = 2 * 256 * mixer.d_inner * 64 * 4  # bytes of one (B, L, E, N) fp32 tensor
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mixer(x)
    # all autograd keeps for the layer (its (B, L, E) activations and per-chunk carries) against the
    # ~20 state histories of a naive scan; a carry kept as a view of its chunk would add 1 history
    assert sum(saved.values()) < 0.5 * full_history
    y.square().mean().backward()
    assert mixer.A_log.grad is not None and mixer.A_log.grad.abs().sum() > 0


def test_mamba_rejects_bad_options():
    with pytest.raises(ValueError, match=r"0 < dt_min <= dt_max, got dt_min=0.5, dt_max=0.1"):
        Mamba(8, 4, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match=r"expand must be a positive integer, got 0"):
        Mamba(8, 4, expand=0)
    with pytest.raises(ValueError, match=r'dt_rank must be a positive integer or "auto".*got \'full\''):
        Mamba(8, 4, dt_rank="full")


# ---------------------------------------------------------------- RG-LRU


def test_rglru_decay_starts_in_the_griffin_range():
    mixer = RGLRU(256, 1)
    decay = torch.sigmoid(mixer.Lambda) ** mixer.c
    assert decay.min() >= 0.9 * (1 - 1e-5) and decay.max() <= 0.999 * (1 + 1e-5)
    assert decay.min() < 0.93 and decay.max() > 0.99, "the decays should spread over the range"


def _rglru_reference(mixer: RGLRU, x, dt):
    """The RG-LRU written out step by step from the module's weights (float64)."""
    mixer = mixer.double()
    x_in, gate = mixer.in_proj(x.double()).chunk(2, dim=-1)
    u = mixer.conv(x_in)
    r, i = torch.sigmoid(mixer.gates(u)).chunk(2, dim=-1)
    a = torch.sigmoid(mixer.Lambda)
    h = torch.zeros(x.shape[0], mixer.width, dtype=torch.float64)
    hs = []
    for t in range(x.shape[1]):
        a_t = a ** (mixer.c * r[:, t] * dt[:, t, None].double())
        h = a_t * h + torch.sqrt(1 - a_t**2) * i[:, t] * u[:, t]
        hs.append(h)
    y = mixer.out_proj(torch.stack(hs, dim=1) * F.gelu(gate))
    mixer.float()
    return y


def test_rglru_event_mode_matches_the_written_out_recurrence():
    mixer = _mixer(RGLRU, expand=2)
    x = torch.randn(BATCH, 15, D_MODEL)
    dt = random_dt(BATCH, 15)
    with torch.no_grad():
        assert relative_error(mixer(x, dt), _rglru_reference(mixer, x, dt)) < TOL
        # a^(c r dt) with dt = 1 is the plain RG-LRU
        assert relative_error(mixer(x, torch.ones(BATCH, 15)), mixer(x)) < 1e-6


def test_rglru_d_state_changes_nothing():
    torch.manual_seed(3)
    small = RGLRU(D_MODEL, 1)
    torch.manual_seed(3)
    large = RGLRU(D_MODEL, 64)
    x = torch.randn(BATCH, 6, D_MODEL)
    assert small.allocate_state(BATCH)["h"].shape == large.allocate_state(BATCH)["h"].shape == (BATCH, D_MODEL)
    assert torch.equal(small(x), large(x))


def test_rglru_gradients_stay_finite_when_the_recurrence_gate_closes():
    mixer = RGLRU(D_MODEL, 1).train()
    with torch.no_grad():
        mixer.gates.bias[:D_MODEL].fill_(-120.0)  # r_t ~ 1e-52 -> a_t == 1 in fp32, normaliser 0
    mixer(torch.randn(BATCH, 6, D_MODEL)).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_rglru_rejects_bad_options():
    with pytest.raises(ValueError, match=r"0 < decay_min <= decay_max < 1.*decay_max=1.0.*HINT"):
        RGLRU(8, 1, decay_max=1.0)
    with pytest.raises(ValueError, match=r"d_state must be a positive integer, got 0"):
        RGLRU(8, 0)


def test_rglru_normaliser_slope_is_capped_at_max_grad_and_exact_elsewhere():
    x = torch.tensor([1e-12, 1e-8, 0.25, 0.81], dtype=torch.float64, requires_grad=True)
    root = _SqrtWithBoundedGrad.apply(x, 1000.0)
    torch.testing.assert_close(root, x.detach().sqrt())
    (slope,) = torch.autograd.grad(root.sum(), x)
    # the true slope 1 / (2 sqrt x) is 5e5 and 5e3 at the first two: capped at max_grad, exact at the others
    torch.testing.assert_close(slope, torch.tensor([1000.0, 1000.0, 1.0, 1 / 1.8], dtype=torch.float64))
