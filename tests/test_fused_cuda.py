"""The fused rollout kernel compiled on a GPU: against the plain loop (and the CUDA-graph engine) for
every covered mixer and discretisation, with and without event dt, after an optimizer step, in
tf32x3 and bf16, over several programs and feature blocks, and the backend choice.

Run: pytest -m cuda tests/test_fused_cuda.py

The fp32 bound. Fused and loop are two fp32 evaluations of the same recurrence in different
summation orders, and an autoregressive rollout amplifies rounding: with these random models
the fp32 loop itself drifts from a float64 loop by ~1e-5 after 11 steps but by 0.3 (Mamba) after
36. So every fp32 check measures both against a float64 loop: the fused error must be at most
ACCURACY_RATIO x the fp32 loop's own error + ACCURACY_FLOOR, on horizons short enough that the
loop's error stays below WELL_CONDITIONED (asserted, so a diverging setup fails instead of passing
vacuously).
"""

from __future__ import annotations

import copy

import pytest
import torch

from lrnn_lightning.rollout import RolloutEngine, run_steps
from lrnn_lightning.rollout.fused import KernelConfig, choose_backend, fused_rollout, fused_steps, fused_support
from tests.conftest import relative_error
from tests.test_fused import CASES, case_id, loop_rollout, make_model
from tests.test_rollout import TinyMixer

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]

ACCURACY_RATIO, ACCURACY_FLOOR = 3.0, 2e-6
WELL_CONDITIONED = 1e-3  # the fp32 loop's own error vs float64 must stay below this for a meaningful check
TF32X3_TOL = 1e-4  # three TF32 products per fp32 product: about fp32 accuracy (vs the fp32 loop, 11 steps)
BF16_TOL = 5e-2  # bf16 weights and matmul operands, fp32 accumulation and state, vs the fp32 loop
W, B, C, HORIZON = 5, 37, 9, 12  # 37 rows: three programs of 16, the last one mostly padding


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


def gpu_model(name: str, kwargs: dict | None = None, d_model: int = 96, d_state: int = 24, n_layers: int = 2):
    # d_model 96 > the 64-wide blocks: every matmul loops over a full and a ragged block
    return make_model(name, kwargs, d_model=d_model, d_state=d_state, n_layers=n_layers, width=W).cuda()


def gpu_data(batch: int = B, horizon: int = HORIZON, event: bool = False):
    context = torch.randn(batch, C, W, device="cuda")
    dt = 0.3 + 1.7 * torch.rand(batch, C + horizon, device="cuda") if event else None
    return context, dt


def as_double(model, context, dt):
    return copy.deepcopy(model).double(), context.double(), None if dt is None else dt.double()


def check_against_float64(fused, loop32, loop64, what: str = "outputs") -> None:
    loop_error = relative_error(loop32, loop64)
    fused_error = relative_error(fused, loop64)
    assert torch.isfinite(fused).all(), what
    assert loop_error < WELL_CONDITIONED, f"{what}: the fp32 loop itself is off by {loop_error:.1e}; shorten the test"
    assert fused_error <= ACCURACY_RATIO * loop_error + ACCURACY_FLOOR, \
        f"{what}: fused error {fused_error:.2e} vs the fp32 loop's {loop_error:.2e} (both against float64)"


def assert_fp32_accurate(model, context, horizon, dt, out) -> None:
    """The fused rollout `out` is as accurate as the fp32 step loop, both measured against a float64 loop."""
    ref32 = loop_rollout(model, context, horizon, dt)
    model64, context64, dt64 = as_double(model, context, dt)
    ref64 = loop_rollout(model64, context64, horizon, dt64)
    check_against_float64(out[:, 1:], ref32[:, 1:], ref64[:, 1:])
    assert relative_error(ref32[:, -1], ref32[:, 1]) > 1e-2  # the rollout moves


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_equals_the_loop_on_gpu(case, event):
    model = gpu_model(*case)
    context, dt = gpu_data(event=event)
    assert_fp32_accurate(model, context, HORIZON, dt, fused_rollout(model, context, HORIZON, dt))


def test_long_rollout_of_a_well_conditioned_model():
    # LRU stays within ~3e-5 of float64 over 100 fed-back steps, so 100 kernel-internal steps can be checked
    model = gpu_model("lru")
    context, dt = gpu_data(horizon=101, event=True)
    assert_fp32_accurate(model, context, 101, dt, fused_rollout(model, context, 101, dt))


@pytest.mark.parametrize("case", [("s5", {"discretization": "zoh"}), ("s4d", {}), ("mamba", {}), ("rglru", {})],
                         ids=case_id)
def test_fused_final_state_on_gpu(case):
    model = gpu_model(*case)
    context, dt = gpu_data(event=True)
    model64, context64, dt64 = as_double(model, context, dt)
    steps = HORIZON - 1
    with torch.no_grad():
        y, state = model.prefill(context, dt[:, :C])
        _, final = fused_steps(model, y[:, -1], state, steps, dt[:, C:C + steps], return_state=True)
        run_steps(model, y[:, -1], state, steps, dt[:, C:C + steps])  # the fp32 loop, in place
        y64, state64 = model64.prefill(context64, dt64[:, :C])
        run_steps(model64, y64[:, -1], state64, steps, dt64[:, C:C + steps])
    assert set(final) == set(state)
    for key in state:
        check_against_float64(final[key], state[key], state64[key], f"state {key}")


def test_fused_follows_an_optimizer_step_on_gpu():
    model = gpu_model("s5", {"discretization": "bilinear"})
    context, dt = gpu_data(event=True)
    before = fused_rollout(model, context, HORIZON, dt)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    model(context, dt[:, :C]).square().mean().backward()
    optimizer.step()
    model.eval()
    after = fused_rollout(model, context, HORIZON, dt)
    assert_fp32_accurate(model, context, HORIZON, dt, after)
    assert relative_error(after[:, 1:], before[:, 1:]) > 1e-3


@pytest.mark.parametrize("case", [("lru", {}), ("s5", {"discretization": "zoh"})], ids=case_id)
def test_tf32x3_and_bf16_on_gpu(case):
    model = gpu_model(*case)
    context, dt = gpu_data(event=True)
    ref = loop_rollout(model, context, HORIZON, dt)
    tf32x3 = fused_rollout(model, context, HORIZON, dt, precision="tf32x3")
    error = relative_error(tf32x3[:, 1:], ref[:, 1:])
    assert error < TF32X3_TOL, f"tf32x3 relative error {error:.2e}"
    bf16 = fused_rollout(model, context, HORIZON, dt, weight_dtype=torch.bfloat16)
    error = relative_error(bf16[:, 1:], ref[:, 1:])
    assert 1e-5 < error < BF16_TOL, f"bf16 relative error {error:.2e}"


@pytest.mark.parametrize("config", [KernelConfig(block_b=32, block_n=64, block_k=32, num_warps=8),
                                    KernelConfig(block_b=64, block_n=32, block_k=16, num_warps=4)],
                         ids=["b32-n64-k32-w8", "b64-n32-k16-w4"])
def test_kernel_configs_agree(config):
    model = gpu_model("lru")
    context, dt = gpu_data(batch=100, event=True)
    assert_fp32_accurate(model, context, HORIZON, dt, fused_rollout(model, context, HORIZON, dt, config=config))


def test_large_model_on_gpu():
    # the benchmark's widest shapes: d_model 512, MLP hidden 1024, 128 modes, 19 programs
    model = gpu_model("lru", d_model=512, d_state=128, n_layers=2)
    context, _ = gpu_data(batch=300)
    assert_fp32_accurate(model, context, 20, None, fused_rollout(model, context, 20))


def test_fused_equals_the_graph_engine():
    model = gpu_model("mamba")
    context, dt = gpu_data(event=True)
    engine = RolloutEngine(model, chunk=4, event_mode=True)
    graph = engine.rollout(context, HORIZON, dt)
    engine.release()
    assert engine.stats.path == "graph"
    out = fused_rollout(model, context, HORIZON, dt)
    assert relative_error(out[:, 1:], graph[:, 1:]) < WELL_CONDITIONED
    assert_fp32_accurate(model, context, HORIZON, dt, out)


def test_choose_backend_on_gpu():
    model = gpu_model("lru")
    assert fused_support(model)[0]
    backend, reason = choose_backend(model, fused="auto")
    assert backend == "fused" and "Triton" in reason
    assert choose_backend(model, fused=False)[0] == "graph"
    assert choose_backend(model, fused=True)[0] == "fused"
    assert choose_backend(model, fused="auto", weight_dtype=torch.float16)[0] == "graph"
    backend, reason = choose_backend(make_model(TinyMixer).cuda(), fused="auto")
    assert backend == "graph" and "TinyMixer is not covered" in reason
    with pytest.raises(ValueError, match="TinyMixer is not covered"):
        choose_backend(make_model(TinyMixer).cuda(), fused=True)
