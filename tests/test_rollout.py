"""The rollout engine on the CPU: the loop path against references written out here, the graph
path's static-buffer program (padding, splitting, chunking, reset) run eagerly, staleness
detection, every error message, the lrnnx adapter and the seed API's plain loop.

Semantics under test (see lrnn_lightning/rollout/engine.py):
    y_ctx, state = prefill(context, dt[:, :C]);  out[:, 0] = y_ctx[:, -1]
    out[:, k] = step(out[:, k - 1], state, dt[:, C + k - 1])   for k = 1 .. horizon - 1
"""

from __future__ import annotations

import importlib.util
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lrnn_lightning.models import MIXERS, Mixer, SequenceModel, linear_scan
from lrnn_lightning.rollout import (
    CaptureError,
    LrnnxAdapter,
    RolloutEngine,
    StaleGraphError,
    StepGraph,
    capture_graph,
    describe_change,
    generate,
    model_fingerprint,
    rollout,
)
from tests.conftest import relative_error
from tests.helpers import perturb_parameters, random_dt

TOL = 2e-5  # fp32, loop vs parallel forward
SAME = 1e-6  # the same kernels in the same order, only batch slicing differs
H, B, C, HORIZON = 3, 5, 7, 11


# -- tiny models: a step-protocol mixer, and two lrnnx-protocol models (LTI, LTV) -------------

class TinyMixer(Mixer):
    """h_t = exp(-softplus(r) dt_t) h_{t-1} + W_in x_t,  y_t = W_out tanh(h_t); state {"h": (B, N)}."""

    def __init__(self, d_model: int, d_state: int):
        super().__init__()
        self.d_model = d_model
        self.log_rate = nn.Parameter(torch.randn(d_state))
        self.w_in = nn.Linear(d_model, d_state, bias=False)
        self.w_out = nn.Linear(d_state, d_model)

    def _decay(self, dt):  # dt (...) or None -> (..., N)
        rate = F.softplus(self.log_rate)
        return torch.exp(-rate) if dt is None else torch.exp(-rate * dt.unsqueeze(-1))

    def forward(self, x, dt=None):
        return self.prefill(x, dt)[0]

    def prefill(self, x, dt=None):
        b = self.w_in(x)
        h = linear_scan(self._decay(dt).expand_as(b), b)
        return self.w_out(torch.tanh(h)), {"h": h[:, -1]}

    def allocate_state(self, batch_size, device=None, dtype=torch.float32):
        return {"h": torch.zeros(batch_size, self.log_rate.shape[0], device=device, dtype=dtype)}

    def step(self, x_t, state, dt_t=None):
        h = state["h"]
        h.mul_(self._decay(None if dt_t is None else dt_t.reshape(-1))).add_(self.w_in(x_t))
        return self.w_out(torch.tanh(h))


def tiny_model(n_layers: int = 2, dropout: float = 0.0, mixer=TinyMixer) -> SequenceModel:
    torch.manual_seed(0)
    model = SequenceModel(mixer, d_input=H, d_output=H, d_model=8, d_state=4, n_layers=n_layers, dropout=dropout)
    perturb_parameters(model, scale=0.1)
    return model.eval()


class LTI_LRNN(nn.Module):  # noqa: N801  (named like lrnnx's base classes; the adapter detects LTV by name)
    pass


class LTV_LRNN(nn.Module):  # noqa: N801
    pass


class ToyLTI(LTI_LRNN):
    """lrnnx-style LTI model: step(x (B, H), cache) updates cache["lrnn_state"] in place."""

    def __init__(self, width: int = H, n: int = 6):
        super().__init__()
        self.log_rate = nn.Parameter(torch.randn(n))
        self.w_in, self.w_out = nn.Linear(width, n, bias=False), nn.Linear(n, width)

    def allocate_inference_cache(self, batch_size, max_seqlen):
        return {"lrnn_state": torch.zeros(batch_size, self.log_rate.shape[0]), "seqlen_offset": 0}

    def step(self, x, cache, integration_timesteps=None):
        assert cache["seqlen_offset"] == 0, "non-tensor cache entries must reach step unchanged"
        dt = 1.0 if integration_timesteps is None else integration_timesteps  # (B, 1)
        h = cache["lrnn_state"]
        h.mul_(torch.exp(-F.softplus(self.log_rate) * dt)).add_(self.w_in(x))
        return self.w_out(torch.tanh(h)), cache


class ToyLTV(LTV_LRNN):
    """lrnnx-style LTV model: step(x (B, 1, H), cache) -> ((B, 1, H), a cache of NEW tensors)."""

    def __init__(self, width: int = H, n: int = 6):
        super().__init__()
        self.log_rate = nn.Parameter(torch.randn(n))
        self.gate = nn.Linear(width, n)
        self.w_in, self.w_out = nn.Linear(2 * width, n, bias=False), nn.Linear(n, width)

    def allocate_inference_cache(self, batch_size, max_seqlen):
        width = self.gate.in_features
        return {"lrnn_state": torch.zeros(batch_size, self.log_rate.shape[0]),
                "conv_state": torch.zeros(batch_size, width)}

    def step(self, x, cache, integration_timesteps=None):
        assert x.dim() == 3 and x.shape[1] == 1, "LTV models take (B, 1, H)"
        u = x[:, 0]
        dt = 1.0 if integration_timesteps is None else integration_timesteps
        decay = torch.exp(-F.softplus(self.log_rate) * dt) * torch.sigmoid(self.gate(u))
        h = decay * cache["lrnn_state"] + self.w_in(torch.cat([u, cache["conv_state"]], -1))
        return self.w_out(torch.tanh(h)).unsqueeze(1), {"lrnn_state": h, "conv_state": u.clone()}


def toy_lrnnx(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = ToyLTI() if kind == "lti" else ToyLTV()
    perturb_parameters(model, scale=0.1)
    return model.eval()


class EagerGraphEngine(RolloutEngine):
    """The engine's graph path with an eager StepGraph, so padding, splitting, chunking and
    re-capture run on the CPU; only the CUDA capture itself is left to test_rollout_cuda.py."""

    def _graph_wanted(self, device):
        return self.cuda_graph is not False and not self._fell_back

    def _make_graph(self, model, batch_size, width, **options):
        return StepGraph(model, batch_size, width, capture=False, **options)


# -- references, written out -------------------------------------------------------------------

def reference_rollout(model, context, horizon, dt=None):
    """The documented semantics, one explicit step at a time."""
    with torch.no_grad():
        n_ctx = context.shape[1]
        y_ctx, state = model.prefill(context, None if dt is None else dt[:, :n_ctx])
        state = {k: v.clone() for k, v in state.items()}
        outputs = [y_ctx[:, -1]]
        for k in range(1, horizon):
            outputs.append(model.step(outputs[-1], state, None if dt is None else dt[:, n_ctx + k - 1]))
        return torch.stack(outputs, 1)


def forward_continuation(model, context, out, dt=None):
    """forward over [context, out[:, :-1]] predicts out: the parallel path checks the rollout."""
    with torch.no_grad():
        y = model(torch.cat([context, out[:, :-1]], 1), None if dt is None else dt[:, :-1])
    return y[:, context.shape[1] - 1:]


def reference_lrnnx_rollout(raw, context, horizon, dt=None, ltv=False):
    """The same semantics written against lrnnx's protocol directly (no adapter)."""
    with torch.no_grad():
        cache = {key: value.to(context.device) if torch.is_tensor(value) else value
                 for key, value in raw.allocate_inference_cache(context.shape[0], 1).items()}

        def step(x, t):
            kw = {} if dt is None else {"integration_timesteps": dt[:, t:t + 1]}
            y, new_cache = raw.step(x.unsqueeze(1) if ltv else x, cache, **kw)
            cache.update(new_cache)
            return y.reshape(x.shape)

        y = None
        for t in range(context.shape[1]):
            y = step(context[:, t], t)
        outputs = [y]
        for k in range(1, horizon):
            outputs.append(step(outputs[-1], context.shape[1] + k - 1))
        return torch.stack(outputs, 1)


def data(batch=B, n_ctx=C, horizon=HORIZON, width=H):
    context = torch.randn(batch, n_ctx, width)
    return context, random_dt(batch, n_ctx + horizon)


# -- loop path --------------------------------------------------------------------------------

@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_loop_rollout_matches_reference_and_forward(event):
    model = tiny_model()
    context, dt = data()
    dt = dt if event else None
    engine = RolloutEngine(model, event_mode=event)
    out = engine.rollout(context, HORIZON, dt)
    assert out.shape == (B, HORIZON, H)
    assert out.abs().mean() > 1e-2, "near-zero rollout: the comparison would prove nothing"
    assert relative_error(out, reference_rollout(model, context, HORIZON, dt)) < SAME
    assert relative_error(forward_continuation(model, context, out, dt), out) < TOL
    assert engine.stats.path == "loop" and engine.stats.num_captures == 0 and engine.stats.steps_per_second > 0


def test_rollout_depends_on_every_dt_column_but_the_last():
    model = tiny_model()
    context, dt = data()
    out = rollout(model, context, HORIZON, dt)
    for column in (1, C - 1, C, C + HORIZON - 2):  # dt[:, 0] decays the zero initial state: no effect
        changed = dt.clone()
        changed[:, column] *= 1.7
        assert relative_error(rollout(model, context, HORIZON, changed), out) > 1e-4, f"dt[:, {column}] ignored"
    unused = dt.clone()
    unused[:, -1] = 123.0
    assert torch.equal(rollout(model, context, HORIZON, unused), out)


def test_horizon_one_is_the_prefill_prediction():
    model = tiny_model()
    context, _ = data()
    with torch.no_grad():
        expected = model(context)[:, -1:]
    assert relative_error(rollout(model, context, 1), expected) < TOL


_ZOO = [name for name, target in MIXERS.items() if importlib.util.find_spec(target.split(":")[0]) is not None]


@pytest.mark.parametrize("name", _ZOO)
def test_zoo_loop_rollout_is_a_forward_continuation(name):
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=H, d_output=H, d_model=8, d_state=4, n_layers=2)
    perturb_parameters(model)
    context, dt = data(batch=2, n_ctx=5, horizon=6)
    out = RolloutEngine(model, event_mode=True).rollout(context, 6, dt)
    assert out.abs().mean() > 1e-3
    assert relative_error(forward_continuation(model, context, out, dt), out) < TOL


def test_rollout_runs_in_eval_mode_and_restores_train_mode():
    model = tiny_model(dropout=0.5).train()
    model.layers[0].mixer.eval()  # a mixed state must come back exactly
    context, _ = data()
    first = rollout(model, context, HORIZON)
    assert torch.equal(first, rollout(model, context, HORIZON)), "dropout was active during the rollout"
    assert model.training and not model.layers[0].mixer.training and model.layers[1].mixer.training


def test_bf16_autocast_stays_close_to_fp32_on_cpu():
    model = tiny_model()
    context, _ = data()
    full = rollout(model, context, HORIZON)
    half = rollout(model, context, HORIZON, autocast_dtype=torch.bfloat16)
    assert half.dtype == torch.float32
    assert 0 < relative_error(half, full) < 5e-2  # bf16 has 8 mantissa bits; 11 steps of feedback


# -- the graph path's program, run eagerly on the CPU -----------------------------------------

@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
@pytest.mark.parametrize("batch_size,chunk", [(None, 4), (3, 4), (8, 16), (5, 1)],
                         ids=["exact", "split-and-pad", "padded", "chunk1"])
def test_graph_program_equals_loop(event, batch_size, chunk):
    model = tiny_model()
    context, dt = data()
    dt = dt if event else None
    engine = EagerGraphEngine(model, batch_size=batch_size, chunk=chunk, event_mode=event)
    out = engine.rollout(context, HORIZON, dt)
    assert engine.stats.path == "graph" and engine.stats.num_captures == 1
    assert relative_error(out, reference_rollout(model, context, HORIZON, dt)) < SAME
    assert relative_error(forward_continuation(model, context, out, dt), out) < TOL


def test_padding_rows_never_leak_into_results():
    model = tiny_model()
    context, dt = data()
    engine = EagerGraphEngine(model, batch_size=4, chunk=4, event_mode=True)
    together = engine.rollout(context, HORIZON, dt)  # rows 4.. go through a padded slice
    for row in range(B):
        alone = engine.rollout(context[row:row + 1], HORIZON, dt[row:row + 1])  # 1 row + 3 pad rows
        assert relative_error(alone, together[row:row + 1]) < SAME, row
    assert engine.stats.num_captures == 1, "a smaller batch must be padded, not re-captured"


def test_no_state_leaks_between_rollouts():
    model = tiny_model()
    engine = EagerGraphEngine(model, batch_size=B, chunk=4, event_mode=True)
    context_a, dt_a = data()
    context_b, dt_b = data()
    first = engine.rollout(context_a, HORIZON, dt_a)
    other = engine.rollout(context_b * 3, HORIZON, dt_b)
    assert relative_error(other, first) > 1e-2
    assert torch.equal(engine.rollout(context_a, HORIZON, dt_a), first)
    # a smaller batch after a larger one: the former rows of the static state are zeroed
    assert torch.equal(engine.rollout(context_a[:2], HORIZON, dt_a[:2]), first[:2])


def test_batch_size_none_grows_the_graph_for_a_larger_batch():
    model = tiny_model()
    engine = EagerGraphEngine(model, chunk=4)
    context, _ = data(batch=6)
    engine.rollout(context[:2], HORIZON)
    out = engine.rollout(context, HORIZON)
    engine.rollout(context[:3], HORIZON)
    assert engine.stats.num_captures == 2
    assert relative_error(out, reference_rollout(model, context, HORIZON)) < SAME


def test_graph_program_follows_an_optimizer_step_without_recapture():
    model = tiny_model()
    context, _ = data()
    engine = EagerGraphEngine(model, chunk=4)
    before = engine.rollout(context, HORIZON)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(context).square().mean().backward()
    optimizer.step()
    after = engine.rollout(context, HORIZON)
    assert relative_error(after, before) > 1e-3
    assert relative_error(after, reference_rollout(model, context, HORIZON)) < SAME
    assert engine.stats.num_captures == 1


def test_step_graph_pads_with_zero_input_and_unit_dt():
    model = tiny_model()
    graph = StepGraph(model, 4, H, chunk=3, event_mode=True, device="cpu", capture=False)
    graph.run(torch.randn(4, H), 5, torch.empty(4, 5, H), dt_steps=random_dt(4, 5))  # all 4 rows dirty
    out = torch.empty(2, 5, H)
    with torch.no_grad():
        _, prefilled = model.prefill(torch.randn(2, 4, H))
    graph.run(torch.randn(2, H), 5, out, state=prefilled, dt_steps=random_dt(2, 5))
    assert torch.equal(graph.static_dt[2:], torch.ones(2, 3))
    pad_rows_after_6_steps = graph.static_output[2:, -1].clone()  # 5 steps in chunks of 3: 6 were run
    # pad rows restarted from zero input and zero state, so they hold the zero-input response
    zero_run = torch.empty(2, 6, H)
    graph.run(torch.zeros(2, H), 6, zero_run, dt_steps=torch.ones(2, 6))
    assert zero_run.abs().mean() > 1e-3
    assert relative_error(pad_rows_after_6_steps, zero_run[:, -1]) < SAME
    graph.release()
    with pytest.raises(RuntimeError, match="released"):
        graph.run(torch.randn(2, H), 5, out, dt_steps=random_dt(2, 5))


# -- staleness ------------------------------------------------------------------------------------

def test_fingerprint_ignores_in_place_updates_and_sees_replaced_storage():
    model = tiny_model()
    before = model_fingerprint(model)
    torch.optim.SGD(model.parameters(), lr=0.1).zero_grad()
    model(torch.randn(2, 4, H)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()})  # copies in place
    assert model_fingerprint(model) == before and describe_change(before, model_fingerprint(model)) is None

    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assigned = model_fingerprint(model)
    assert re.search(r"parameter 'encoder.weight' was replaced", describe_change(before, assigned))

    model.to(torch.float64)
    assert "changed dtype from torch.float32 to torch.float64" in describe_change(assigned, model_fingerprint(model))


def test_engine_recaptures_after_parameters_are_replaced():
    model = tiny_model()
    context, _ = data()
    engine = EagerGraphEngine(model, chunk=4)
    engine.rollout(context, HORIZON)
    model.load_state_dict({k: v * 1.1 for k, v in model.state_dict().items()}, assign=True)
    out = engine.rollout(context, HORIZON)
    assert engine.stats.num_captures == 2
    assert relative_error(out, reference_rollout(model, context, HORIZON)) < SAME
    engine.rollout(context, HORIZON)
    assert engine.stats.num_captures == 2, "an unchanged model must reuse its graph"
    model.double()
    out64 = engine.rollout(context.double(), HORIZON)
    assert engine.stats.num_captures == 3 and out64.dtype == torch.float64


def test_engine_can_refuse_a_stale_graph():
    model = tiny_model()
    context, _ = data()
    engine = EagerGraphEngine(model, chunk=4, on_stale="raise")
    engine.rollout(context, HORIZON)
    model.encoder.weight = nn.Parameter(model.encoder.weight.detach().clone())
    with pytest.raises(StaleGraphError, match=r"parameter 'encoder.weight' was replaced.*HINT"):
        engine.rollout(context, HORIZON)
    engine.release()
    engine.rollout(context, HORIZON)  # released: captures afresh


# -- capture failures (the capture itself is simulated; the CUDA test does it for real) --------

class FailingCaptureEngine(EagerGraphEngine):
    error: Exception = RuntimeError("operation not permitted when stream is capturing")

    def _make_graph(self, model, batch_size, width, **options):
        raise self.error


def test_capture_failure_falls_back_to_the_loop_and_warns_once():
    model = tiny_model()
    context, _ = data()
    engine = FailingCaptureEngine(model, on_capture_error="fallback")
    with pytest.warns(RuntimeWarning, match=r"not permitted when stream is capturing.*plain step loop"):
        out = engine.rollout(context, HORIZON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.rollout(context, HORIZON)
    assert engine.stats.path == "loop" and "not permitted" in engine.stats.fallback_reason
    assert relative_error(out, reference_rollout(model, context, HORIZON)) < SAME


def test_capture_failure_raises_with_a_hint():
    engine = FailingCaptureEngine(tiny_model())
    with pytest.raises(CaptureError, match=r"batch_size=5 failed .*not permitted.*HINT: `step` must be capturable"):
        engine.rollout(*data()[:1], HORIZON)


def test_out_of_memory_at_capture_names_the_batch_size():
    engine = FailingCaptureEngine(tiny_model(), batch_size=4096)
    engine.error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
    with pytest.raises(CaptureError, match=r"out of GPU memory .* batch_size=4096 .*HINT: pass a smaller batch_size"):
        engine.rollout(*data()[:1], HORIZON)


# -- errors ---------------------------------------------------------------------------------------

def test_engine_argument_errors():
    model = tiny_model()
    cases = [
        (dict(chunk=0), r"chunk must be a positive integer, got 0"),
        (dict(batch_size=2.5), r"batch_size must be a positive integer, got 2.5"),
        (dict(cuda_graph="yes"), r"cuda_graph must be True, False or 'auto', got 'yes'"),
        (dict(autocast_dtype=torch.float64), r"autocast_dtype must be None, torch.bfloat16 or torch.float16"),
        (dict(on_capture_error="ignore"), r"on_capture_error must be one of \('raise', 'fallback'\), got 'ignore'"),
        (dict(on_stale="skip"), r"on_stale must be one of \('recapture', 'raise'\)"),
        (dict(cuda_graph=True), r"cuda_graph=True needs the model on a CUDA GPU.*HINT: set cuda_graph='auto' or False"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            RolloutEngine(model, **kwargs)


def test_model_errors():
    with pytest.raises(ValueError, match=r"d_input == d_output, got d_input=3, d_output=2"):
        RolloutEngine(SequenceModel(TinyMixer, d_input=3, d_output=2, d_model=8, d_state=4))
    with pytest.raises(ValueError, match=r"ToyLTI does not implement the step protocol.*LrnnxAdapter\(model\)"):
        RolloutEngine(toy_lrnnx("lti"))
    with pytest.raises(ValueError, match=r"missing allocate_state, step, prefill"):
        RolloutEngine(nn.Linear(3, 3))


def test_rollout_input_errors():
    model = tiny_model()
    engine = RolloutEngine(model)
    event = RolloutEngine(model, event_mode=True)
    context, dt = data()
    cases = [
        (engine, (context[0], HORIZON), r"expected context of shape \(B, C, 3\), got shape \(7, 3\)"),
        (engine, (context[:, :, :2], HORIZON), r"got shape \(5, 7, 2\): the model takes 3 features"),
        (engine, (context[:, :0], HORIZON), r"at least one step \(C >= 1\)"),
        (engine, (context.double(), HORIZON), r"dtype torch.float64 but the model's weights are torch.float32"),
        (engine, (context.long(), HORIZON), r"floating-point context"),
        (engine, (context, 0), r"horizon must be a positive integer, got 0"),
        (engine, (context, 2.0), r"horizon must be a positive integer, got 2.0"),
        (engine, (context, HORIZON, dt), r"got dt, but event_mode is False.*HINT: .*event_mode=True"),
        (event, (context, HORIZON), r"needs dt of shape \(B, C \+ horizon\) = \(5, 18\), got None"),
        (event, (context, HORIZON, dt[:, :-1]), r"expected dt of shape \(B, C \+ horizon\) = \(5, 18\), got \(5, 17\)"),
        (event, (context, HORIZON, dt.index_fill(1, torch.tensor([9]), -0.5)), r"strictly positive, got -0.5"),
        (event, (context, HORIZON, dt.index_fill(1, torch.tensor([3]), float("inf"))), r"finite, got inf"),
        (event, (context, HORIZON, dt.index_fill(1, torch.tensor([0]), 0.0)), r"strictly positive, got 0.0"),
    ]
    for eng, args, message in cases:
        with pytest.raises(ValueError, match=message):
            eng.rollout(*args)


def test_model_output_width_is_checked_after_prefill():
    class Widening(TinyMixer):  # declares nothing about its width, so only the output can tell
        def prefill(self, x, dt=None):
            y, state = super().prefill(x, dt)
            return torch.cat([y, y], -1), state

    mixer = Widening(4, 3)
    del mixer.d_model
    with pytest.raises(ValueError, match=r"prefill returned shape \(2, 5, 8\) for a context of shape \(2, 5, 4\)"):
        rollout(mixer, torch.randn(2, 5, 4), 3)


def test_prefill_state_must_match_allocate_state():
    class Forgetful(TinyMixer):
        def prefill(self, x, dt=None):
            y, state = super().prefill(x, dt)
            return y, {"hidden": state["h"]}

    with pytest.raises(ValueError, match=r"prefill returned state keys \['hidden'\], but allocate_state declares"):
        rollout(Forgetful(4, 3), torch.randn(2, 5, 4), 3)


def test_functional_rollout_with_an_engine():
    model = tiny_model()
    context, _ = data()
    engine = RolloutEngine(model)
    assert torch.equal(rollout(model, context, HORIZON, engine=engine), engine.rollout(context, HORIZON))
    with pytest.raises(ValueError, match=r"got an engine and engine options \['chunk'\]"):
        rollout(model, context, HORIZON, engine=engine, chunk=4)
    with pytest.raises(ValueError, match=r"engine was created for a different model"):
        rollout(tiny_model(), context, HORIZON, engine=engine)


# -- lrnnx adapter --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lti", "ltv"])
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_lrnnx_adapter_rollout_matches_the_raw_protocol(kind, event):
    raw = toy_lrnnx(kind)
    adapter = LrnnxAdapter(raw, d_model=H)
    assert adapter.ltv == (kind == "ltv")
    context, dt = data()
    dt = dt if event else None
    expected = reference_lrnnx_rollout(raw, context, HORIZON, dt, ltv=kind == "ltv")
    assert expected.abs().mean() > 1e-2
    loop = RolloutEngine(adapter, event_mode=event).rollout(context, HORIZON, dt)
    graph_program = EagerGraphEngine(adapter, batch_size=3, chunk=4, event_mode=event).rollout(context, HORIZON, dt)
    assert relative_error(loop, expected) < SAME
    assert relative_error(graph_program, expected) < SAME


def test_lrnnx_adapter_keeps_state_addresses_fixed():
    adapter = LrnnxAdapter(toy_lrnnx("ltv"))
    state = adapter.allocate_state(2, "cpu", torch.float32)
    pointers = {k: v.data_ptr() for k, v in state.items()}
    with torch.no_grad():
        adapter.step(torch.randn(2, H), state, torch.rand(2) + 0.5)
    assert {k: v.data_ptr() for k, v in state.items()} == pointers
    assert all(torch.count_nonzero(v) > 0 for v in state.values()), "the new cache was not copied in"
    with pytest.raises(ValueError, match=r"has no allocate_inference_cache\(\).*need no adapter"):
        LrnnxAdapter(tiny_model())


# -- the seed API ---------------------------------------------------------------------------------

def reference_generate(model, x, num_steps, dt_t=None):
    with torch.no_grad():
        state = model.allocate_state(x.shape[0], x.device, x.dtype)
        outputs = [x]
        for _ in range(num_steps):
            outputs.append(model.step(outputs[-1], state, dt_t))
        return torch.stack(outputs[1:], 1)


@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_generate_plain_loop_and_eager_handle(event):
    model = tiny_model()
    x = torch.randn(B, H)
    dt_t = torch.rand(B, 1) + 0.5 if event else None
    expected = reference_generate(model, x, 9, None if dt_t is None else dt_t[:, 0])
    assert expected.abs().mean() > 1e-2
    assert relative_error(generate(model, x, 9, integration_timesteps=dt_t), expected) < SAME
    handle = StepGraph(model, 8, H, chunk=4, event_mode=event, device="cpu", capture=False)
    for _ in range(2):  # a second call starts from a zeroed state again
        assert relative_error(generate(model, x, 9, handle, dt_t), expected) < SAME


def test_generate_wraps_lrnnx_models():
    raw = toy_lrnnx("ltv")
    x, dt_t = torch.randn(B, H), torch.rand(B, 1) + 0.5
    expected = reference_generate(LrnnxAdapter(raw), x, 6, dt_t[:, 0])
    with torch.no_grad():  # against the raw protocol, too
        cache, y, raw_out = raw.allocate_inference_cache(B, 6), x, []
        for _ in range(6):
            y, cache = raw.step(y.unsqueeze(1), cache, integration_timesteps=dt_t)
            y = y[:, 0]
            raw_out.append(y)
    assert relative_error(expected, torch.stack(raw_out, 1)) < SAME
    assert relative_error(generate(raw, x, 6, integration_timesteps=dt_t), expected) < SAME


def test_generate_errors():
    model = tiny_model()
    x = torch.randn(4, H)
    handle = StepGraph(model, 4, H, chunk=4, device="cpu", capture=False)
    event_handle = StepGraph(model, 4, H, chunk=4, event_mode=True, device="cpu", capture=False)
    dt_t = torch.ones(4, 1)
    cases = [
        ((model, x[0], 5), r"expected x of shape \(B, H\), got \(3,\)"),
        ((model, x, 0), r"num_steps must be a positive integer, got 0"),
        ((model, x, 5, None, torch.ones(4, 2)), r"integration_timesteps of shape \(4, 1\), got \(4, 2\)"),
        ((model, x, 5, None, -dt_t), r"strictly positive, got -1"),
        ((model, torch.randn(6, H), 5, handle), r"batch size 6 is larger than the captured batch size 4.*"
                                                r"capture_graph\(model, batch_size=6, H=3\)"),
        ((model, x, 5, event_handle), r"captured with event_mode=True, so integration_timesteps"),
        ((model, x, 5, handle, dt_t), r"graph_cache was captured without event mode"),
        ((tiny_model(), x, 5, handle), r"captured for another model"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(*args)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(StaleGraphError, match=r"graph_cache is stale: parameter .* was replaced.*capture_graph"):
        generate(model, x, 5, handle)
    with pytest.raises(ValueError, match=r"needs the model on a CUDA GPU, got device cpu.*without graph_cache"):
        capture_graph(model, 4, H)



class _FlagRecorder(torch.nn.Module):
    """A tiny step-protocol model that records the TF32 flag each step runs under."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.d_input = self.d_output = width
        self.weight = torch.nn.Parameter(0.5 * torch.randn(width, width))
        self.seen: list[bool] = []

    def allocate_state(self, batch_size, device=None, dtype=torch.float32):
        return {"h": torch.zeros(batch_size, self.d_input, device=device, dtype=dtype)}

    def step(self, x_t, state, dt_t=None):
        from lrnn_lightning.rollout.inference import matmul_tf32_enabled

        self.seen.append(matmul_tf32_enabled())
        state["h"].mul_(0.5).add_(x_t @ self.weight)
        return state["h"].clone()

    def prefill(self, x, dt=None):
        state = self.allocate_state(x.shape[0], x.device, x.dtype)
        ys = [self.step(x[:, t], state) for t in range(x.shape[1])]
        return torch.stack(ys, 1), state

    def forward(self, x, dt=None):
        return self.prefill(x, dt)[0]


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_choice_holds_during_the_rollout_and_is_restored(tf32):
    from lrnn_lightning.rollout import RolloutEngine

    model = _FlagRecorder()
    before = torch.backends.cuda.matmul.allow_tf32
    RolloutEngine(model, tf32=tf32).rollout(torch.randn(2, 4, 3), horizon=5)
    assert model.seen and all(flag is tf32 for flag in model.seen)
    assert torch.backends.cuda.matmul.allow_tf32 is before


def test_tf32_switch_works_when_the_process_uses_the_new_precision_api():
    from lrnn_lightning.rollout import RolloutEngine
    from lrnn_lightning.rollout.inference import matmul_tf32_enabled

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has only the legacy TF32 flags")
    model = _FlagRecorder()
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # reading allow_tf32 now raises in torch >= 2.9
    try:
        out = RolloutEngine(model, tf32=False).rollout(torch.randn(2, 4, 3), horizon=3)
        assert out.shape == (2, 3, 3)
        assert matmul_tf32_enabled() and torch.backends.cuda.matmul.fp32_precision == "tf32"
        with torch.no_grad():
            RolloutEngine(model, tf32=None).rollout(torch.randn(2, 4, 3), horizon=3)
    finally:
        torch.backends.cuda.matmul.fp32_precision = "none"
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_fingerprint_sees_a_restrided_parameter_and_names_it():
    from lrnn_lightning.rollout.fingerprint import describe_change, model_fingerprint

    layer = torch.nn.Linear(4, 4)
    before = model_fingerprint(layer)
    layer.weight.data = layer.weight.data.t()  # same storage, same shape, transposed layout
    assert describe_change(before, model_fingerprint(layer)) == \
        "parameter 'weight' changed stride from (4, 1) to (1, 4)"


def test_load_state_names_the_buffer_capacity():
    from lrnn_lightning.rollout.state import load_state

    with pytest.raises(ValueError, match=r"'h' of shape \(3, 4\), expected \(b, 4\) with b <= 2"):
        load_state({"h": torch.zeros(2, 4)}, {"h": torch.randn(3, 4)}, "M")


def test_step_graph_refuses_a_start_state_with_other_rows():
    from lrnn_lightning.rollout import StepGraph

    model = _FlagRecorder()
    graph = StepGraph(model, 4, 3, chunk=2, device="cpu", capture=False)
    with pytest.raises(ValueError, match=r"x0 has 3 rows but the start state has \{'h': 2\}"):
        graph.run(torch.randn(3, 3), 4, torch.empty(3, 4, 3), state={"h": torch.randn(2, 3)})


def test_capture_graph_names_a_wrong_H():
    from lrnn_lightning.rollout import capture_graph

    with pytest.raises(ValueError, match=r"H=5, but the model takes 3 features per step.*H=3"):
        capture_graph(_FlagRecorder(), batch_size=2, H=5)
