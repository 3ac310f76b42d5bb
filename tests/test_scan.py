import pytest
import torch

from lrnn_lightning.models.scan import linear_scan
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
