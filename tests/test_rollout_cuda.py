"""The rollout engine on a GPU: CUDA-graph replay against the plain loop and the parallel forward
for every mixer of the zoo, live weights, re-capture, memory, precision, compile, the seed
API, the lrnnx adapter, and capture failures.

"graph" is RolloutEngine's CUDA-graph path, "loop" the same engine with cuda_graph=False,
"forward" the parallel forward over [context, out[:, :-1]], which must reproduce out.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lrnn_lightning.models import MIXERS, SequenceModel
from lrnn_lightning.rollout import (
    CaptureError,
    LrnnxAdapter,
    RolloutEngine,
    StaleGraphError,
    capture_graph,
    generate,
    rollout,
)
from tests.conftest import relative_error
from tests.helpers import perturb_parameters, random_dt
from tests.test_rollout import (
    forward_continuation,
    reference_generate,
    reference_lrnnx_rollout,
    reference_rollout,
    tiny_model,
    toy_lrnnx,
)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]

SAME = 1e-6  # graph vs loop: the same kernels, launched differently
TOL = 2e-5  # step recurrence vs parallel forward, fp32
COMPILE_TOL = 1e-5  # inductor may fuse and reorder fp32 arithmetic
BF16_TOL = 5e-2  # bf16 autocast vs fp32 over the whole horizon (8 mantissa bits, fed back 37 times)
D, B, C, HORIZON = 5, 6, 9, 37  # 37 outputs = 36 steps: two full chunks of 16 and a partial one


def zoo_model(name: str, d_model: int = 16, d_state: int = 8) -> SequenceModel:
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=D, d_output=D, d_model=d_model, d_state=d_state, n_layers=2)
    perturb_parameters(model)
    return model.cuda().eval()


def cuda_data(batch=B, n_ctx=C, horizon=HORIZON, width=D):
    return torch.randn(batch, n_ctx, width, device="cuda"), random_dt(batch, n_ctx + horizon, device="cuda")


def loop_rollout(model, context, horizon, dt=None, **kwargs):
    return RolloutEngine(model, cuda_graph=False, event_mode=dt is not None, **kwargs).rollout(context, horizon, dt)


def assert_close(actual, expected, tol, what):
    error = relative_error(actual, expected)
    assert error < tol, f"{what}: relative error {error:.3g} exceeds {tol:g}"


# -- every mixer: graph == loop == forward, live weights, repeatability ------------------------

@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_zoo_graph_equals_loop_equals_forward(name, event):
    model = zoo_model(name)
    context, dt = cuda_data()
    dt = dt if event else None
    engine = RolloutEngine(model, event_mode=event, cuda_graph=True)

    graph = engine.rollout(context, HORIZON, dt)
    assert engine.stats.path == "graph" and engine.stats.num_captures == 1 and engine.stats.capture_ms > 0
    assert graph.abs().mean() > 1e-3, "near-zero rollout: the comparison would prove nothing"
    assert_close(graph, loop_rollout(model, context, HORIZON, dt), SAME, "graph vs loop")
    assert_close(forward_continuation(model, context, graph, dt), graph, TOL, "forward over [context, out] vs graph")
    assert torch.equal(engine.rollout(context, HORIZON, dt), graph), "two rollouts in a row differ: state leaked"

    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    model(context, None if dt is None else dt[:, :C]).square().mean().backward()
    optimizer.step()
    model.eval()
    after = engine.rollout(context, HORIZON, dt)
    assert relative_error(after, graph) > 1e-4, "the optimizer step changed nothing: the check would prove nothing"
    assert_close(after, loop_rollout(model, context, HORIZON, dt), SAME, "graph vs loop after an optimizer step")
    assert engine.stats.num_captures == 1, "in-place weight updates must not trigger a re-capture"
    engine.release()


@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_each_step_reads_its_own_dt_inside_the_graph(name):
    model = zoo_model(name)
    context, dt = cuda_data()
    engine = RolloutEngine(model, event_mode=True, chunk=16)
    out = engine.rollout(context, HORIZON, dt)
    step = 20  # output k = 20 is produced by step 20 inside the second chunk, reading dt[:, C + 19]
    changed = dt.clone()
    changed[:, C + step - 1] *= 1.5
    moved = engine.rollout(context, HORIZON, changed)
    assert torch.equal(moved[:, :step], out[:, :step]), "outputs before the changed timestep moved"
    assert relative_error(moved[:, step], out[:, step]) > 1e-5, "the changed timestep was not read by its step"
    assert_close(moved, loop_rollout(model, context, HORIZON, changed), SAME, "graph vs loop")


def test_cpu_loop_gpu_loop_and_gpu_graph_agree():
    model = zoo_model("lru")
    context, dt = cuda_data()
    graph = rollout(model, context, HORIZON, dt)
    gpu_loop = loop_rollout(model, context, HORIZON, dt)
    cpu_loop = rollout(model.cpu(), context.cpu(), HORIZON, dt.cpu())
    assert_close(gpu_loop, graph, SAME, "GPU loop vs GPU graph")
    assert_close(cpu_loop, gpu_loop.cpu(), 1e-5, "CPU loop vs GPU loop")


# -- batches: padding and splitting -----------------------------------------------------------

@pytest.mark.parametrize("name", ["s5", "mamba"])
def test_padding_and_splitting(name):
    model = zoo_model(name)
    context, dt = cuda_data(batch=10)
    expected = loop_rollout(model, context, HORIZON, dt)
    engine = RolloutEngine(model, batch_size=4, event_mode=True)
    assert_close(engine.rollout(context, HORIZON, dt), expected, SAME, "split 4 + 4 + 2 (padded)")
    assert_close(engine.rollout(context[:3], HORIZON, dt[:3]), expected[:3], SAME, "3 rows padded to 4")
    assert_close(engine.rollout(context[7:8], HORIZON, dt[7:8]), expected[7:8], SAME, "1 row padded to 4")
    assert engine.stats.num_captures == 1, "one capture serves every batch size through padding and splitting"


# -- staleness --------------------------------------------------------------------------------

def test_recapture_after_load_state_dict_assign_and_to_dtype():
    model = zoo_model("s4d")
    context, dt = cuda_data()
    engine = RolloutEngine(model, event_mode=True)
    before = engine.rollout(context, HORIZON, dt)
    replaced = {key: value * 1.05 for key, value in model.state_dict().items()}
    model.load_state_dict(replaced, assign=True)  # new storage: the old graph would read the old weights
    after = engine.rollout(context, HORIZON, dt)
    assert engine.stats.num_captures == 2
    assert relative_error(after, before) > 1e-4
    assert_close(after, loop_rollout(model, context, HORIZON, dt), SAME, "re-captured graph vs loop")

    model.to(torch.float64)
    out64 = engine.rollout(context.double(), HORIZON, dt.double())
    assert engine.stats.num_captures == 3 and out64.dtype == torch.float64
    assert_close(out64, loop_rollout(model, context.double(), HORIZON, dt.double()), 1e-12, "float64 graph vs loop")


def test_stale_graph_raises_when_asked_to():
    model = zoo_model("lru")
    context, _ = cuda_data()
    engine = RolloutEngine(model, on_stale="raise")
    engine.rollout(context, HORIZON)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(StaleGraphError, match=r"was replaced.*HINT"):
        engine.rollout(context, HORIZON)


# -- memory -----------------------------------------------------------------------------------

def test_100_capture_cycles_do_not_grow_reserved_memory():
    model = zoo_model("mamba", d_model=64, d_state=16)
    context, _ = cuda_data(batch=8)

    def cycle(batch_size):
        engine = RolloutEngine(model, batch_size=batch_size)
        engine.rollout(context, 20)
        engine.release()

    for batch_size in (4, 8):  # warm the allocator and cuBLAS
        cycle(batch_size)
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for i in range(100):
        cycle(4 + 4 * (i % 2))
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() <= reserved, (
        f"memory_reserved grew from {reserved} to {torch.cuda.memory_reserved()} bytes over 100 capture cycles")

    engine = RolloutEngine(model)  # re-capture inside one engine frees the old graph too
    engine.rollout(context, 20)
    reserved = torch.cuda.memory_reserved()
    for _ in range(30):
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        engine.rollout(context, 20)
    assert engine.stats.num_captures == 31
    assert torch.cuda.memory_reserved() <= reserved, "re-captures grew memory_reserved"


# -- precision and fusion ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MIXERS))
def test_bf16_autocast_graph(name):
    model = zoo_model(name)
    context, dt = cuda_data()
    engine = RolloutEngine(model, event_mode=True, autocast_dtype=torch.bfloat16)
    half = engine.rollout(context, HORIZON, dt)
    full = loop_rollout(model, context, HORIZON, dt)
    assert half.dtype == torch.float32
    assert 0 < relative_error(half, full) < BF16_TOL, f"bf16 vs fp32: {relative_error(half, full):.3g}"
    assert_close(half, loop_rollout(model, context, HORIZON, dt, autocast_dtype=torch.bfloat16), SAME,
                 "bf16 graph vs bf16 loop")
    # the weight casts are inside the graph (autocast cache off), so it follows new weights
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    assert_close(engine.rollout(context, HORIZON, dt),
                 loop_rollout(model, context, HORIZON, dt, autocast_dtype=torch.bfloat16), SAME,
                 "bf16 graph vs bf16 loop after a weight update")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MIXERS))
def test_compiled_graph_equals_eager_graph(name):
    model = zoo_model(name)
    context, dt = cuda_data()
    eager = RolloutEngine(model, event_mode=True, chunk=4).rollout(context, HORIZON, dt)
    engine = RolloutEngine(model, event_mode=True, chunk=4, compile=True)
    fused = engine.rollout(context, HORIZON, dt)
    assert engine.stats.compiled and engine.stats.path == "graph"
    assert_close(fused, eager, COMPILE_TOL, "compiled graph vs eager graph")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    assert_close(engine.rollout(context, HORIZON, dt), loop_rollout(model, context, HORIZON, dt), COMPILE_TOL,
                 "compiled graph vs loop after a weight update")


# -- the seed API -----------------------------------------------------------------------------

@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_seed_api_with_and_without_graph(event):
    model = zoo_model("rglru")
    x = torch.randn(B, D, device="cuda")
    dt_t = torch.rand(B, 1, device="cuda") + 0.5 if event else None
    expected = reference_generate(model, x, 40, None if dt_t is None else dt_t[:, 0])
    assert_close(generate(model, x, 40, integration_timesteps=dt_t), expected, SAME, "generate, plain loop")
    handle = capture_graph(model, batch_size=8, H=D, event_mode=event)
    assert handle.graph is not None and handle.pool is not None and handle.batch_size == 8
    assert (handle.static_dt is not None) == event
    for _ in range(2):
        assert_close(generate(model, x, 40, graph_cache=handle, integration_timesteps=dt_t), expected, SAME,
                     "generate, graph (6 rows padded to 8), from a zeroed state each call")
    with pytest.raises(ValueError, match=r"batch size 9 is larger than the captured batch size 8"):
        generate(model, torch.randn(9, D, device="cuda"), 5, handle, None if dt_t is None else dt_t[:1].expand(9, 1))
    model.load_state_dict({k: v * 1.1 for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(StaleGraphError, match="stale"):
        generate(model, x, 40, handle, dt_t)
    handle.release()


@pytest.mark.parametrize("kind", ["lti", "ltv"])
def test_lrnnx_models_through_the_graph(kind):
    raw = toy_lrnnx(kind).cuda()
    context, dt = cuda_data(width=3)
    expected = reference_lrnnx_rollout(raw, context, HORIZON, dt, ltv=kind == "ltv")
    engine = RolloutEngine(LrnnxAdapter(raw, d_model=3), event_mode=True, batch_size=4)
    assert_close(engine.rollout(context, HORIZON, dt), expected, SAME, "adapter graph vs raw lrnnx protocol")
    assert engine.stats.path == "graph"
    x, dt_t = torch.randn(B, 3, device="cuda"), torch.rand(B, 1, device="cuda") + 0.5
    handle = capture_graph(raw, batch_size=B, H=3, event_mode=True)
    assert_close(generate(raw, x, 20, handle, dt_t), generate(raw, x, 20, integration_timesteps=dt_t), SAME,
                 "seed API on an lrnnx model, graph vs loop")


# -- capture failures -------------------------------------------------------------------------

class HostSyncingModel(torch.nn.Module):
    """Wraps a model whose step reads a value on the host: fine eagerly, uncapturable."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.d_input, self.d_output = inner, inner.d_input, inner.d_output

    def allocate_state(self, *args, **kwargs):
        return self.inner.allocate_state(*args, **kwargs)

    def prefill(self, x, dt=None):
        return self.inner.prefill(x, dt)

    def step(self, x_t, state, dt_t=None):
        scale = float(x_t.abs().max().item() > 1e6)  # host sync
        return self.inner.step(x_t * (1.0 - scale), state, dt_t)


def test_uncapturable_model_falls_back_to_the_loop():
    inner = zoo_model("lru")
    model = HostSyncingModel(inner)
    context, _ = cuda_data()
    with pytest.raises(CaptureError, match=r"HINT: `step` must be capturable"):
        RolloutEngine(model).rollout(context, HORIZON)
    engine = RolloutEngine(model, on_capture_error="fallback")
    with pytest.warns(RuntimeWarning, match=r"capturing the rollout graph .* failed .*plain step loop"):
        out = engine.rollout(context, HORIZON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        engine.rollout(context, HORIZON)
    assert engine.stats.path == "loop" and engine.stats.fallback_reason
    assert_close(out, loop_rollout(inner, context, HORIZON), SAME, "fallback loop vs loop")
    # the failed capture left the GPU usable: the same current stream, random ops, graphs
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.randn(3, device="cuda").isfinite().all()
    healthy = RolloutEngine(inner)
    assert_close(healthy.rollout(context, HORIZON), out, SAME, "graph after a failed capture")
    assert healthy.stats.path == "graph"


def test_out_of_memory_at_capture():
    model = zoo_model("lru")
    context, _ = cuda_data()
    with pytest.raises(CaptureError, match=r"out of GPU memory .*batch_size=8589934592.*HINT: pass a smaller"):
        RolloutEngine(model, batch_size=2**33).rollout(context, HORIZON)
    engine = RolloutEngine(model, batch_size=2**33, on_capture_error="fallback")
    with pytest.warns(RuntimeWarning, match="out of GPU memory"):
        out = engine.rollout(context, HORIZON)
    assert engine.stats.path == "loop"
    assert_close(out, loop_rollout(model, context, HORIZON), SAME, "fallback after OOM vs loop")


def test_tiny_model_graph_matches_written_out_reference():
    model = tiny_model().cuda()
    context = torch.randn(B, 4, 3, device="cuda")
    dt = random_dt(B, 4 + HORIZON, device="cuda")
    out = RolloutEngine(model, event_mode=True, chunk=5).rollout(context, HORIZON, dt)
    assert_close(out, reference_rollout(model, context, HORIZON, dt), SAME, "graph vs written-out reference")


TF32_TOL = 2e-2  # TF32 matmuls (10 mantissa bits) vs fp32 over the whole horizon


def test_tf32_graph_matches_tf32_loop_and_stays_near_fp32():
    model = zoo_model("lru", d_model=64, d_state=32)
    context, _ = cuda_data(batch=8)
    fp32 = RolloutEngine(model, cuda_graph=True).rollout(context, HORIZON)
    engine = RolloutEngine(model, cuda_graph=True, tf32=True)
    graph = engine.rollout(context, HORIZON)
    assert not torch.backends.cuda.matmul.allow_tf32, "the engine must restore the global TF32 flag"
    assert_close(graph, loop_rollout(model, context, HORIZON, tf32=True), 1e-5, "tf32 graph vs tf32 loop")
    assert_close(graph, fp32, TF32_TOL, "tf32 vs fp32")
    engine.rollout(context, HORIZON)
    assert engine.stats.num_captures == 1
    engine.release()
