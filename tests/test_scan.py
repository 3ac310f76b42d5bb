import pytest
import torch

from lrnn_lightning.models.scan import linear_scan, pairwise_scan
from tests.conftest import relative_error


def _loop(a, b, h0):
    h, out = h0, []
    for t in range(b.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("length", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_linear_scan_matches_sequential_recurrence(length, dtype):
    b = torch.randn(3, length, 5, dtype=dtype)
    a = 0.3 + 0.69 * torch.rand(3, length, 5, dtype=torch.float64)
    if dtype.is_complex:
        a = a * torch.exp(1j * torch.randn(3, length, 5, dtype=torch.float64))
    h0 = torch.randn(3, 5, dtype=dtype)
    assert relative_error(linear_scan(a, b, h0), _loop(a, b, h0)) < 1e-12
    assert relative_error(linear_scan(a, b), _loop(a, b, torch.zeros_like(h0))) < 1e-12


def test_linear_scan_broadcasts_time_invariant_decay_and_backprops():
    a = (0.5 + 0.4 * torch.rand(1, 1, 4)).requires_grad_()
    b = torch.randn(2, 33, 4, requires_grad=True)
    h = linear_scan(a, b)
    assert relative_error(h, _loop(a.expand(2, 33, 4), b, torch.zeros(2, 4))) < 1e-6
    h.square().sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


@pytest.mark.parametrize("length", [1, 2, 3, 7, 64, 129])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_pairwise_scan_matches_sequential_recurrence(length, dtype):
    b = torch.randn(3, length, 5, dtype=dtype)
    a = 0.3 + 0.69 * torch.rand(3, length, 5, dtype=torch.float64)
    if dtype.is_complex:
        a = a * torch.exp(1j * torch.randn(3, length, 5, dtype=torch.float64))
    h0 = torch.randn(3, 5, dtype=dtype)
    as_real = torch.view_as_real if dtype.is_complex else (lambda t: t)  # keep the imaginary part compared
    assert relative_error(as_real(pairwise_scan(a, b, h0)), as_real(_loop(a, b, h0))) < 1e-12
    assert relative_error(as_real(pairwise_scan(a, b)), as_real(_loop(a, b, torch.zeros_like(h0)))) < 1e-12


def test_pairwise_scan_gradients_match_linear_scan_with_broadcast_decay():
    a = (0.5 + 0.4 * torch.rand(1, 1, 4, dtype=torch.float64)).requires_grad_()
    b = torch.randn(2, 45, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for scan in (pairwise_scan, linear_scan):
        h = scan(a, b, h0)
        grads.append(torch.autograd.grad(h.square().sum(), (a, b, h0)))
    for grad, grad_ref in zip(*grads, strict=True):
        assert grad.abs().sum() > 0 and relative_error(grad, grad_ref) < 1e-12


def test_pairwise_scan_is_stable_for_vanishing_decays():
    # decays far below exp(-88) overflow any log/cumsum formulation; products must just underflow to 0
    a = torch.full((1, 300, 2), 1e-30)
    b = torch.randn(1, 300, 2)
    h = pairwise_scan(a, b)
    assert torch.isfinite(h).all() and relative_error(h, _loop(a, b, torch.zeros(1, 2))) < 1e-6


@pytest.mark.parametrize("length", [1, 6, 11])
@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.float64, torch.float64), (torch.complex128, torch.complex128),
                                             (torch.float64, torch.complex128)])
def test_pairwise_scan_hand_written_backward_passes_gradcheck(length, a_dtype, b_dtype):
    a = (0.2 + 0.7 * torch.rand(2, length, 3, dtype=torch.float64)).to(a_dtype)
    if a_dtype.is_complex:
        a = a * torch.exp(1j * torch.randn(2, length, 3, dtype=torch.float64))
    b = torch.randn(2, length, 3, dtype=b_dtype)
    h0 = torch.randn(2, 3, dtype=b_dtype)
    inputs = tuple(t.requires_grad_() for t in (a, b, h0))
    assert torch.autograd.gradcheck(pairwise_scan, inputs)
    broadcast = (a[:1, :, :1].detach().requires_grad_(), b.detach().requires_grad_())
    assert torch.autograd.gradcheck(pairwise_scan, broadcast)
