"""The step protocol on the GPU: equivalences on CUDA, no host sync, and CUDA-graph capture
of `step` replaying to the same numbers as eager `step`."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import relative_error
from tests.helpers import random_dt
from tests.test_models_protocol import BATCH, CASES, LENGTH, make_mixer, make_model, step_loop

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]
TOL = 2e-5


def _cuda_modules(name, kwargs):
    return [make_mixer(name, kwargs).cuda(), make_model(name, kwargs).cuda()]


def _input(module, length=LENGTH):
    width = getattr(module, "d_input", None) or module.d_model
    return torch.randn(BATCH, length, width, device="cuda")


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_cuda_step_loop_prefill_and_forward_agree(name, kwargs, event):
    for module in _cuda_modules(name, kwargs):
        x = _input(module)
        dt = random_dt(BATCH, LENGTH, device="cuda") if event else None
        with torch.no_grad():
            y = module(x, dt)
            y_loop, _ = step_loop(module, x, dt)
            _, state = module.prefill(x[:, :20], None if dt is None else dt[:, :20])
            y_rest, _ = step_loop(module, x[:, 20:], None if dt is None else dt[:, 20:], state)
        assert relative_error(y_loop, y) < TOL
        assert relative_error(y_rest, y[:, 20:]) < TOL
        # and the GPU computes what the CPU computes
        cpu = module.to("cpu")
        with torch.no_grad():
            y_cpu = cpu(x.cpu(), None if dt is None else dt.cpu())
        assert relative_error(y.cpu(), y_cpu) < 1e-4


@pytest.mark.parametrize("name,kwargs", CASES)
def test_cuda_step_has_no_host_sync(name, kwargs):
    model = make_model(name, kwargs).cuda()
    x = _input(model, 2)
    dt = random_dt(BATCH, 2, device="cuda")
    state = model.allocate_state(BATCH, "cuda", torch.float32)
    with torch.no_grad():
        model.step(x[:, 0], state, dt[:, 0])  # first call may initialise lazy CUDA handles
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model.step(x[:, 1], state, dt[:, 1])
            model.step(x[:, 1], state)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_captured_step_replays_like_eager_step_and_sees_new_weights(name, kwargs, event):
    model = make_model(name, kwargs).cuda()
    x = _input(model)
    dt = random_dt(BATCH, LENGTH, device="cuda") if event else None
    static_x = torch.zeros(BATCH, model.d_input, device="cuda")
    static_dt = torch.ones(BATCH, device="cuda") if event else None
    state = model.allocate_state(BATCH, "cuda", torch.float32)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            model.step(static_x, state, static_dt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y = model.step(static_x, state, static_dt)

    def replay_all():
        for tensor in state.values():
            tensor.zero_()
        ys = []
        for t in range(LENGTH):
            static_x.copy_(x[:, t])
            if event:
                static_dt.copy_(dt[:, t])
            graph.replay()
            ys.append(static_y.clone())
        return torch.stack(ys, 1)

    with torch.no_grad():
        y_graph = replay_all()
        y_eager, _ = step_loop(model, x, dt)
    assert relative_error(y_graph, y_eager) < 1e-6

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x, dt).square().mean().backward()
    optimizer.step()  # in place: the graph must follow
    with torch.no_grad():
        y_graph_new = replay_all()
        y_eager_new, _ = step_loop(model, x, dt)
    assert relative_error(y_graph_new, y_graph) > 1e-3
    assert relative_error(y_graph_new, y_eager_new) < 1e-6
