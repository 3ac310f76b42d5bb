"""The step's fused small matmul (models/step_ops.py, step_kernels.py) against the PyTorch composition.

On the CPU the kernel runs under the Triton interpreter: every epilogue and prologue
against the composition it replaces, whole model steps with the kernel against steps
without it, and the conditions under which the kernel must not run. The GPU counterpart is
tests/test_step_ops_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrnn_lightning.models import SequenceModel, step_ops
from tests.conftest import relative_error
from tests.helpers import count_calls, import_interpreted, perturb_parameters

TOL = 2e-6  # float32: the kernel's and PyTorch's sums differ only in order


@pytest.fixture(scope="module")
def kernels():
    """The kernel module imported interpreted, CPU only."""
    return import_interpreted(step_ops.KERNEL_MODULE)


@pytest.fixture
def kernels_on_cpu(kernels, monkeypatch):
    """Route step_ops' dispatch to the interpreted kernel for CPU tensors; returns the list of launches."""
    monkeypatch.setattr(step_ops, "KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(step_ops, "_kernel_module", lambda: kernels)
    return count_calls(monkeypatch, step_ops, "launch_step_matmul")


def layers(k: int, n: int, seed: int = 0) -> tuple[nn.Linear, nn.LayerNorm]:
    torch.manual_seed(seed)
    linear, norm = nn.Linear(k, n), nn.LayerNorm(k)
    perturb_parameters(norm, scale=0.3)  # not the identity affine of a fresh LayerNorm
    return linear, norm


SHAPES = [(1, 8, 12), (5, 40, 70), (33, 16, 16)]  # (rows, in, out): one row, ragged blocks, two row blocks


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_norm", [False, True], ids=["plain", "norm"])
def test_linear_with_norm_and_residual(kernels, m, k, n, with_norm):
    linear, norm = layers(k, n)
    x, residual = 3.0 + torch.randn(m, k), torch.randn(m, n)  # a nonzero mean: the LayerNorm must centre
    norm = norm if with_norm else None
    expected = linear(x if norm is None else norm(x))
    got = step_ops.launch_step_matmul(kernels, x, linear.weight.detach(), n, bias=linear.bias.detach(), norm=norm)
    assert relative_error(got, expected) < TOL
    got = step_ops.launch_step_matmul(kernels, x, linear.weight.detach(), n, bias=linear.bias.detach(), norm=norm,
                                      residual=residual)
    assert relative_error(got, expected + residual) < TOL


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gated_linear_is_geglu(kernels, m, k, n):
    linear, norm = layers(k, 2 * n)
    x = torch.randn(m, k)
    value, gate = linear(norm(x)).chunk(2, dim=-1)
    got = step_ops.launch_step_matmul(kernels, x, linear.weight.detach(), n, bias=linear.bias.detach(), norm=norm,
                                      glu=True)
    assert relative_error(got, value * F.gelu(gate)) < TOL


def test_dual_readout_and_plain_matmul(kernels):
    torch.manual_seed(2)
    a, b, skip = torch.randn(7, 24), torch.randn(7, 24), torch.randn(7, 20)
    wa, wb, d = torch.randn(20, 24), torch.randn(20, 24), torch.randn(20)
    expected = skip * d + 2.0 * a @ wa.T - 2.0 * b @ wb.T
    got = step_ops.launch_step_matmul(kernels, a, wa, 20, x2=b, weight2=wb, alpha=2.0, alpha2=-2.0, skip=skip,
                                      skip_scale=d)
    assert relative_error(got, expected) < TOL
    assert relative_error(step_ops.launch_step_matmul(kernels, a, wa, 20), a @ wa.T) < TOL


def test_strided_rows_are_read_in_place(kernels):
    """Chunked views (row stride > width), as `in_proj(x).chunk(2)` gives."""
    torch.manual_seed(3)
    wide = torch.randn(6, 2 * 16)
    x = wide[:, 16:]
    weight = torch.randn(10, 16)
    assert relative_error(step_ops.launch_step_matmul(kernels, x, weight, 10), x @ weight.T) < TOL


MIXERS = [("lru", {}), ("s5", {"discretization": "zoh"}), ("mamba", {}), ("rglru", {}), ("s4d", {})]


def steps_with_and_without_kernels(model, x, dt, n_steps: int) -> dict[bool, tuple[torch.Tensor, dict]]:
    """{kernels on: (outputs (n_steps, B, H), final state)} for `n_steps` fed-back steps from a zero state."""
    outputs = {}
    for enabled in (False, True):
        state = model.allocate_state(x.shape[0], x.device, torch.float32)
        y, ys = x, []
        with torch.no_grad(), step_ops.use_step_kernels(enabled):
            for _ in range(n_steps):
                y = model.step(y, state, dt)
                ys.append(y)
        outputs[enabled] = (torch.stack(ys), state)
    return outputs


@pytest.mark.parametrize("name,kwargs", MIXERS, ids=[m for m, _ in MIXERS])
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_model_steps_with_the_kernel_equal_steps_without(kernels_on_cpu, name, kwargs, event):
    torch.manual_seed(4)
    model = SequenceModel(name, d_input=3, d_output=3, d_model=24, d_state=8, n_layers=2, mixer_kwargs=kwargs).eval()
    perturb_parameters(model)
    x = torch.randn(5, 3)
    dt = 0.5 + torch.rand(5) if event else None
    outputs = steps_with_and_without_kernels(model, x, dt, 4)
    assert kernels_on_cpu, "the kernel never ran"
    assert relative_error(outputs[True][0], outputs[False][0]) < 1e-5
    for key, value in outputs[False][1].items():
        assert relative_error(outputs[True][1][key], value) < 1e-5, key
    # encoder, decoder and the MLP's two kernels per layer, whatever the mixer
    assert len(kernels_on_cpu) >= 4 * 2 + 2 * 2 * 4


def test_the_kernel_stays_out_where_it_would_change_the_numbers(kernels_on_cpu):
    linear, norm = layers(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        step_ops.linear_step(x, linear, norm=norm)
    assert len(kernels_on_cpu) == 1  # the positive control
    with torch.no_grad():
        step_ops.linear_step(x.double(), linear.double(), norm=norm.double())  # not float32
        linear.float(), norm.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step_ops.linear_step(x, linear)
        with step_ops.use_step_kernels(False):
            step_ops.linear_step(x, linear)
        step_ops.linear_step(torch.randn(4096, 16), nn.Linear(16, 1024))  # above MAX_MACS: cuBLAS is faster
    y = step_ops.linear_step(x, linear)  # autograd through the call: the kernel has no backward
    y.sum().backward()
    assert linear.weight.grad is not None
    assert len(kernels_on_cpu) == 1


def test_no_triton_means_the_composition(monkeypatch):
    monkeypatch.setattr(step_ops, "KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(step_ops, "_loaded", {})
    monkeypatch.setattr(step_ops.importlib.util, "find_spec", lambda name: None)
    linear, norm = layers(16, 8)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert not step_ops.preload()
        assert not step_ops.kernel_applies(x, linear.weight, macs=64)
        assert torch.equal(step_ops.linear_step(x, linear, norm=norm), linear(norm(x)))


@pytest.mark.parametrize("name,kwargs", MIXERS, ids=[m for m, _ in MIXERS])
def test_parallel_forward_and_prefill_are_untouched(kernels_on_cpu, name, kwargs):
    """The kernel is for 2-D step inputs: sequence paths keep PyTorch (and must not trip over it)."""
    torch.manual_seed(5)
    model = SequenceModel(name, d_input=3, d_output=3, d_model=16, d_state=4, n_layers=1, mixer_kwargs=kwargs).eval()
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        with step_ops.use_step_kernels(False):
            expected, expected_prefill = model(x), model.prefill(x)[0]
        assert torch.equal(model(x), expected) and torch.equal(model.prefill(x)[0], expected_prefill)
    assert not kernels_on_cpu


class CountingKernel:
    """kernel[grid](...) that counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("event", [False, True], ids=["shared-decay", "per-row-decay"])
@pytest.mark.parametrize("with_scale", [False, True], ids=["no-scale", "scale"])
def test_modal_update_is_the_complex_recurrence(kernels, monkeypatch, event, with_scale):
    from types import SimpleNamespace

    from lrnn_lightning.models.lti_complex import complex_decay_add_, complex_mul

    counting = CountingKernel(kernels.modal_update_kernel)
    monkeypatch.setattr(step_ops, "KERNEL_DEVICE", "cpu")
    monkeypatch.setattr(step_ops, "_kernel_module", lambda: SimpleNamespace(modal_update_kernel=counting))
    torch.manual_seed(6)
    rows, modes = 5, 12
    shape = (rows, modes) if event else (modes,)
    decay = torch.polar(0.5 + 0.5 * torch.rand(shape), torch.randn(shape))
    scale = torch.complex(torch.randn(shape), torch.randn(shape)) if with_scale else None
    u = torch.randn(rows, 2 * modes)  # the views of B x the step passes: row stride 2P
    h_re, h_im = torch.randn(rows, modes), torch.randn(rows, modes)
    ref_re, ref_im = h_re.clone(), h_im.clone()
    u_re, u_im = u[:, :modes], u[:, modes:]
    scaled = complex_mul(scale, u_re, u_im) if with_scale else (u_re, u_im)
    complex_decay_add_(ref_re, ref_im, decay, *scaled)
    out_re, out_im = step_ops.modal_update_step(h_re, h_im, decay, u_re, u_im, scale)
    assert counting.launches == 1
    assert out_re is h_re and out_im is h_im  # in place
    assert relative_error(h_re, ref_re) < TOL and relative_error(h_im, ref_im) < TOL


def test_tf32_keeps_the_matmul_kernel_out_but_not_the_modal_update(kernels_on_cpu, kernels, monkeypatch):
    """TF32 changes matmuls only: the matmul kernel must fall back (PyTorch's matmul would round its inputs), the
    elementwise modal update computes what PyTorch's elementwise ops do and keeps its kernel."""
    from types import SimpleNamespace

    from lrnn_lightning.models.lti_complex import complex_decay_add_
    from lrnn_lightning.rollout.inference import matmul_tf32

    counting = CountingKernel(kernels.modal_update_kernel)
    monkeypatch.setattr(step_ops, "_kernel_module", lambda: SimpleNamespace(
        modal_update_kernel=counting, step_matmul_kernel=kernels.step_matmul_kernel))
    torch.manual_seed(7)
    linear, _ = layers(16, 8)
    x = torch.randn(4, 16)
    decay = torch.polar(0.5 + 0.5 * torch.rand(12), torch.randn(12))
    h_re, h_im, u_re, u_im = (torch.randn(4, 12) for _ in range(4))
    ref_re, ref_im = h_re.clone(), h_im.clone()
    complex_decay_add_(ref_re, ref_im, decay, u_re, u_im)
    with torch.no_grad(), matmul_tf32(True):
        assert relative_error(step_ops.linear_step(x, linear), linear(x)) < TOL
        step_ops.modal_update_step(h_re, h_im, decay, u_re, u_im)
    assert not kernels_on_cpu  # the matmul fell back to PyTorch
    assert counting.launches == 1  # the modal update did not
    assert relative_error(h_re, ref_re) < TOL and relative_error(h_im, ref_im) < TOL
    with torch.no_grad(), matmul_tf32(False):
        step_ops.linear_step(x, linear)
    assert len(kernels_on_cpu) == 1  # the positive control: TF32 was what kept it out


@pytest.mark.parametrize("value, applies", [("0", False), ("1", True), (None, True)])
def test_the_environment_switch_turns_the_kernel_off(value, applies):
    # LRNN_STEP_KERNELS=0 (README) is read once, at import: check it in a fresh interpreter; the device type the
    # kernel would run on is pointed at the CPU, so the answer depends on the switch alone
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LRNN_STEP_KERNELS"}
    if value is not None:
        env["LRNN_STEP_KERNELS"] = value
    code = ("import torch; from lrnn_lightning.models import step_ops; step_ops.KERNEL_DEVICE = 'cpu'; "
            "print(step_ops.elementwise_kernel_applies(torch.randn(4, 8)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(applies)
