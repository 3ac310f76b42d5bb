"""The fused step kernel compiled on a GPU: against the cuBLAS composition, inside whole model steps,
and inside a captured rollout graph (where it must replace every cuBLAS GEMM of a small model).

Run: pytest -m cuda tests/test_step_ops_cuda.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrnn_lightning.models import SequenceModel, step_ops
from lrnn_lightning.rollout import StepGraph
from lrnn_lightning.rollout.inference import matmul_tf32, rollout_mode
from tests.conftest import relative_error
from tests.helpers import count_calls, perturb_parameters
from tests.test_step_ops import CountingKernel, steps_with_and_without_kernels

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]

TOL = 1e-5  # float32 FMA dot vs cuBLAS float32 GEMM: summation order only
MIXERS = [("lru", {}), ("s5", {"discretization": "zoh"}), ("s5", {"discretization": "bilinear"}), ("mamba", {}),
          ("rglru", {}), ("s4d", {})]


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


@pytest.fixture
def launches(monkeypatch):
    return count_calls(monkeypatch, step_ops, "launch_step_matmul")


@pytest.mark.parametrize("m,k,n", [(1, 8, 12), (32, 128, 128), (32, 128, 256), (64, 256, 256), (37, 96, 70)])
@torch.no_grad()
def test_kernel_equals_the_composition(m, k, n, launches):
    torch.manual_seed(0)
    up, norm, down = nn.Linear(k, 2 * n).cuda(), nn.LayerNorm(k).cuda(), nn.Linear(n, k).cuda()
    perturb_parameters(norm, scale=0.3)
    x = 2.0 + torch.randn(m, k, device="cuda")
    value, gate = up(norm(x)).chunk(2, dim=-1)
    hidden = step_ops.gated_linear_step(x, up, norm=norm)
    assert relative_error(hidden, value * F.gelu(gate)) < TOL
    assert relative_error(step_ops.linear_step(hidden, down, residual=x), x + down(hidden)) < TOL
    a, b, skip = (torch.randn(m, k, device="cuda"), torch.randn(m, k, device="cuda"), torch.randn(m, n, device="cuda"))
    wa, wb, d = torch.randn(n, k, device="cuda"), torch.randn(n, k, device="cuda"), torch.randn(n, device="cuda")
    assert relative_error(step_ops.dual_readout_step(a, wa, b, wb, 2.0, skip, d),
                          skip * d + 2.0 * (a @ wa.T) - 2.0 * (b @ wb.T)) < TOL
    assert len(launches) == 3  # every call above took the kernel


@pytest.mark.parametrize("name,kwargs", MIXERS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values()))
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_model_steps_with_the_kernel_equal_cublas_steps(name, kwargs, event, launches):
    torch.manual_seed(1)
    model = SequenceModel(name, d_input=5, d_output=5, d_model=64, d_state=16, n_layers=2,
                          mixer_kwargs=kwargs).cuda().eval()
    perturb_parameters(model)
    x = torch.randn(9, 5, device="cuda")
    dt = 0.5 + torch.rand(9, device="cuda") if event else None
    outputs = steps_with_and_without_kernels(model, x, dt, 6)
    assert launches
    assert relative_error(outputs[True][0], outputs[False][0]) < 1e-5
    for key, value in outputs[False][1].items():
        assert relative_error(outputs[True][1][key], value) < 1e-5, key


def test_under_tf32_the_matmuls_take_cublas_and_the_modal_update_keeps_its_kernel(monkeypatch, launches):
    """TF32 changes matmuls only: an LRU step under TF32 runs cuBLAS's matmuls and the modal update kernel."""
    from types import SimpleNamespace

    compiled = step_ops._kernel_module()
    assert compiled is not None
    counting = CountingKernel(compiled.modal_update_kernel)
    monkeypatch.setattr(step_ops, "_kernel_module", lambda: SimpleNamespace(
        modal_update_kernel=counting, step_matmul_kernel=compiled.step_matmul_kernel))
    torch.manual_seed(3)
    model = SequenceModel("lru", d_input=5, d_output=5, d_model=64, d_state=16, n_layers=2).cuda().eval()
    perturb_parameters(model)
    x = torch.randn(9, 5, device="cuda")
    with matmul_tf32(True):
        outputs = steps_with_and_without_kernels(model, x, None, 4)
    assert counting.launches == 2 * 4  # every layer's update at every step, TF32 on
    assert not launches  # no matmul kernel under TF32
    assert relative_error(outputs[True][0], outputs[False][0]) < 1e-5  # the same TF32 matmuls either way


@pytest.mark.parametrize("compile", [False, True], ids=["eager-step", "compiled-step"])
@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_a_captured_small_model_runs_no_cublas_gemm(name, compile):
    """The point of the kernel: at (32, 32, 16, 1) the graph holds it instead of cuBLAS's split-K kernels
    (also when torch.compile traces the step)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(2)
    model = SequenceModel(name, d_input=8, d_output=8, d_model=32, d_state=16, n_layers=1).cuda()
    perturb_parameters(model)
    x0 = torch.randn(32, 8, device="cuda")
    outs = {}
    for enabled in (True, False):
        with rollout_mode(model, "cuda"), step_ops.use_step_kernels(enabled):
            graph = StepGraph(model, 32, 8, chunk=4, device="cuda", compile=compile and enabled)
        out = torch.empty(32, 8, 8, device="cuda")
        graph.run(x0, 8, out)
        outs[enabled] = out
        if enabled:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                graph.replay()
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            assert any("step_matmul_kernel" in n for n in names), names
            assert not [n for n in names if "gemm" in n.lower() or "splitk" in n.lower()], names
        graph.release()
    assert relative_error(outs[True], outs[False]) < 1e-5
