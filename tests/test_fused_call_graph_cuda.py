"""Fused calls replayed as CUDA graphs (`fused.call_graph`) on a GPU: a replay computes exactly what the
eager launch computes (same kernel, same inputs), reads the live weights, never hands out its static
buffers, and is captured again when the model's tensors are replaced.

Run: pytest -m cuda tests/test_fused_call_graph_cuda.py
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

from lrnn_lightning.rollout import RolloutEngine
from lrnn_lightning.rollout.fused import KernelConfig, fused_steps
from lrnn_lightning.rollout.fused.call_graph import captured_calls, release_calls
from lrnn_lightning.rollout.fused.config import small_tile_config
from lrnn_lightning.rollout.fused.pack import pack_model
from tests.helpers import perturb_parameters
from tests.test_fused import case_id, take_an_optimizer_step
from tests.test_fused_cuda import HORIZON, B, C, assert_fp32_accurate, gpu_data, gpu_model

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_fp32")]
STEPS = HORIZON - 1


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


def inputs(model, event: bool, seed: int):
    """A prefilled state, the next input and the step timesteps from a random context (B rows)."""
    torch.manual_seed(seed)
    context, dt = gpu_data(event=event)
    with torch.no_grad():
        y, state = model.prefill(context, None if dt is None else dt[:, :C])
    return y[:, -1], state, None if dt is None else dt[:, C:C + STEPS]


def eager(model, x0, state, dt_steps, **options):
    """The same call launched eagerly: given packed weights, fused_steps never replays a graph."""
    weight_dtype = options.pop("weight_dtype", torch.float32)
    packed = pack_model(model, weight_dtype, dt_steps is not None)
    return fused_steps(model, x0, state, STEPS, dt_steps, packed=packed, weight_dtype=weight_dtype,
                       return_state=True, **options)


def assert_same(result, reference) -> None:
    (out, state), (out_ref, state_ref) = result, reference
    assert torch.equal(out, out_ref), float((out - out_ref).abs().max())
    assert state.keys() == state_ref.keys()
    for key in state:
        assert torch.equal(state[key], state_ref[key]), key


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("case, config", [
    (("lru", {}), None),  # the default launch: one-row programs
    (("s5", {"discretization": "zoh"}), KernelConfig(block_b=16)),  # tl.dot tiles
    (("mamba", {}), replace(small_tile_config(4), activations="scratch")),  # the scratch kernel
], ids=lambda value: case_id(value) if isinstance(value, tuple) else None)
def test_a_repeated_call_replays_exactly_the_eager_launch(case, config, event):
    model = gpu_model(*case)
    release_calls(model)
    x0, state, dt_steps = inputs(model, event, seed=0)
    first = fused_steps(model, x0, state, STEPS, dt_steps, config=config, return_state=True)
    assert captured_calls(model) == []  # seen once: launched eagerly
    second = fused_steps(model, x0, state, STEPS, dt_steps, config=config, return_state=True)
    (key,) = captured_calls(model)
    assert (key.batch, key.num_steps, key.event, key.config) == (B, STEPS, event, config)
    assert_same(second, first)
    kept = second[0].clone(), {name: value.clone() for name, value in second[1].items()}
    # other values through the same graph: the replay copies them in, and its outputs are fresh tensors
    x1, state1, dt1 = inputs(model, event, seed=1)
    third = fused_steps(model, x1, state1, STEPS, dt1, config=config, return_state=True)
    assert captured_calls(model) == [key]
    assert_same(second, kept)  # neither the outputs nor the final state were the graph's own buffers
    assert_same(third, eager(model, x1, state1, dt1, config=config))
    assert (third[0] - second[0]).abs().max() > 1e-3
    # no state: captured separately (zeros laid out inside the graph)
    for _ in range(2):
        zero_state = fused_steps(model, x1, None, STEPS, dt1, config=config)
    assert len(captured_calls(model)) == 2
    assert torch.equal(zero_state, eager(model, x1, None, dt1, config=config)[0])


def test_a_replayed_call_reads_the_live_weights_and_is_captured_again_after_replacement():
    model = gpu_model("s5", {"discretization": "bilinear"})
    context, dt = gpu_data(event=True)
    x0, state, dt_steps = inputs(model, True, seed=2)
    for _ in range(2):
        before = fused_steps(model, x0, state, STEPS, dt_steps)
    (key,) = captured_calls(model)
    take_an_optimizer_step(model, context, dt)  # in place: the same graph reads the new values
    model.eval()
    after = fused_steps(model, x0, state, STEPS, dt_steps, return_state=True)
    assert captured_calls(model) == [key]
    assert_same(after, eager(model, x0, state, dt_steps))
    assert (after[0] - before).abs().max() > 1e-3
    # replaced storage: the old graph would read the old memory, so it is dropped and the shape seen anew
    model.load_state_dict({name: value.clone() for name, value in model.state_dict().items()}, assign=True)
    perturb_parameters(model, scale=0.01, seed=7)
    for calls in (0, 1):
        replaced = fused_steps(model, x0, state, STEPS, dt_steps, return_state=True)
        assert len(captured_calls(model)) == calls
        assert_same(replaced, eager(model, x0, state, dt_steps))


def test_bf16_weights_and_a_split_step_replay_too():
    model = gpu_model("lru", d_model=128, d_state=64, n_layers=2)
    x0, state, dt_steps = inputs(model, True, seed=3)
    for _ in range(2):
        replayed = fused_steps(model, x0, state, STEPS, dt_steps, weight_dtype=torch.bfloat16, return_state=True)
    assert captured_calls(model)[-1].weight_dtype == torch.bfloat16
    assert_same(replayed, eager(model, x0, state, dt_steps, weight_dtype=torch.bfloat16))
    # a split step is a cooperative launch: replayed where the graph takes it, else eager after one warning
    split = replace(small_tile_config(1), split=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            out = fused_steps(model, x0, state, STEPS, dt_steps, config=split, return_state=True)
    captured = any(key.config == split for key in captured_calls(model))
    refused = [w for w in caught if "could not be captured as a CUDA graph" in str(w.message)]
    assert captured != bool(refused) and len(refused) <= 1, [str(w.message) for w in caught]
    assert_same(out, eager(model, x0, state, dt_steps, config=split))


def test_the_engine_replays_its_fused_rollouts_and_release_frees_them():
    model = gpu_model("lru")
    context, dt = gpu_data(event=True)
    engine = RolloutEngine(model, fused=True, event_mode=True)
    outs = [engine.rollout(context, HORIZON, dt) for _ in range(3)]
    assert engine.stats.path == "fused" and len(captured_calls(model)) == 1
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert_fp32_accurate(model, context, HORIZON, dt, outs[2])
    engine.release()
    assert captured_calls(model) == []


def test_inference_mode_and_other_streams_and_dtypes_get_their_own_working_replays():
    model = gpu_model("lru")
    x0, state, dt_steps = inputs(model, True, seed=4)
    expected = eager(model, x0, state, dt_steps)
    with torch.inference_mode():  # captured here, then replayed outside: the static inputs are normal tensors
        for _ in range(2):
            fused_steps(model, x0, state, STEPS, dt_steps, return_state=True)
    assert len(captured_calls(model)) == 1
    assert_same(fused_steps(model, x0, state, STEPS, dt_steps, return_state=True), expected)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a stream of its own: its own graph and buffers
        for _ in range(2):
            on_side = fused_steps(model, x0, state, STEPS, dt_steps, return_state=True)
    torch.cuda.current_stream().wait_stream(side)
    assert len(captured_calls(model)) == 2 and captured_calls(model)[-1].stream == side.cuda_stream
    assert_same(on_side, expected)
    # x0 and dt in float64: their own key; copied into the float32 kernel inputs, outputs back in float64
    for _ in range(2):
        wide = fused_steps(model, x0.double(), state, STEPS, dt_steps.double())
    assert captured_calls(model)[-1].x_dtype == torch.float64 and wide.dtype == torch.float64
    assert torch.equal(wide, expected[0].double())


def test_a_call_whose_capture_fails_warns_once_and_runs_eagerly(monkeypatch):
    from lrnn_lightning.rollout.fused.launch import KernelCall

    model = gpu_model("s5", {"discretization": "zoh"})
    x0, state, dt_steps = inputs(model, False, seed=5)
    expected = eager(model, x0, state, dt_steps)
    launch = KernelCall.launch

    def syncing_launch(self, kernels):  # a host sync: fine eagerly, invalidates a capture
        torch.cuda.synchronize()
        launch(self, kernels)

    monkeypatch.setattr(KernelCall, "launch", syncing_launch)
    stream = torch.cuda.current_stream()
    fused_steps(model, x0, state, STEPS, dt_steps)
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph"):
        second = fused_steps(model, x0, state, STEPS, dt_steps, return_state=True)
    assert torch.cuda.current_stream() == stream and captured_calls(model) == []
    assert torch.randn(3, device="cuda").isfinite().all()  # the CUDA generator left capture mode
    assert_same(second, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second try
        assert_same(fused_steps(model, x0, state, STEPS, dt_steps, return_state=True), expected)
