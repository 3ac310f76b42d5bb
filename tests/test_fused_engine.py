"""The fused backend wired into RolloutEngine, RolloutCallback and the Hydra config (issue #6).

On the CPU the kernel runs under the Triton interpreter (`interpreter` fixture of test_fused.py),
so `fused=True` is exercised end to end; `fused="auto"` picks the fused kernel only on a GPU,
which the `cuda` tests at the end check against the graph engine.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lrnn_lightning.callbacks.rollout as rollout_module
import lrnn_lightning.rollout.engine as engine_module
from lrnn_lightning.callbacks import RankReport, RolloutCallback
from lrnn_lightning.models import SequenceModel
from lrnn_lightning.module import NextStepModule
from lrnn_lightning.rollout import RolloutEngine, RolloutStats
from lrnn_lightning.rollout.fingerprint import model_signature
from lrnn_lightning.rollout.fused import FusedKernelError, support
from lrnn_lightning.utils.training import build, summary_line
from tests import test_configs, test_fused
from tests.conftest import relative_error
from tests.helpers import count_calls, record_callback_engines
from tests.test_callback import tiny_data, tiny_module, tiny_trainer
from tests.test_fused import BF16_TOL, FUSED_TOL, make_model
from tests.test_rollout import EagerGraphEngine, TinyMixer

# fixtures shared with those files: the kernel module imported under the Triton interpreter, and Hydra's compose
interpreter = test_fused.interpreter
make_cfg = test_configs.make_cfg

W, B, C, HORIZON = 3, 4, 5, 6


def data(event: bool, device=None, batch: int = B, horizon: int = HORIZON):
    generator = torch.Generator().manual_seed(3)
    context = torch.randn(batch, C, W, generator=generator).to(device)
    dt = (0.3 + 1.7 * torch.rand(batch, C + horizon, generator=generator)).to(device) if event else None
    return context, dt


def loop_engine_rollout(model, context, horizon, dt=None, **kwargs):
    engine = RolloutEngine(model, cuda_graph=False, event_mode=dt is not None, **kwargs)
    out = engine.rollout(context, horizon, dt)
    assert engine.stats.path == "loop"
    return out


@pytest.fixture
def interpreter_on(monkeypatch):
    """Let `fused_support` accept a CPU model without importing the kernel (for tests that launch nothing)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(support, "interpreter_active", lambda: True)


@pytest.fixture
def interpreter_off(monkeypatch):
    monkeypatch.setattr(support, "interpreter_active", lambda: False)


# -- RolloutEngine(fused=...) on the CPU ----------------------------------------------------------

@pytest.mark.parametrize(("name", "event"), [("lru", False), ("lru", True), ("mamba", True)],
                         ids=["lru-no-dt", "lru-event-dt", "mamba-event-dt"])
def test_fused_engine_equals_the_loop_engine(interpreter, name, event):
    model = make_model(name, d_model=16, d_state=4, n_layers=2)
    context, dt = data(event)
    engine = RolloutEngine(model, fused=True, event_mode=event)
    out = engine.rollout(context, HORIZON, dt)
    ref = loop_engine_rollout(model, context, HORIZON, dt)
    assert engine.stats.path == "fused" and not engine.stats.compiled and engine.stats.num_captures == 0
    assert engine.stats.backend_reason.startswith("fused=true: ") and "interpreter" in engine.stats.backend_reason
    assert engine.stats.steps_per_second > 0
    assert torch.equal(out[:, 0], ref[:, 0])  # the same PyTorch prefill
    assert relative_error(out[:, 1:], ref[:, 1:]) < FUSED_TOL
    assert relative_error(ref[:, -1], ref[:, 1]) > 1e-2  # the rollout moves: the comparison has teeth
    if event:  # the steps' dt reaches the kernel: other step timesteps, another rollout, still the loop's
        other_dt = dt.clone()
        other_dt[:, C:] *= 3.0
        other = engine.rollout(context, HORIZON, other_dt)
        other_error = relative_error(other[:, 1:], loop_engine_rollout(model, context, HORIZON, other_dt)[:, 1:])
        assert other_error < FUSED_TOL
        assert relative_error(other[:, 1:], out[:, 1:]) > 100 * max(other_error, 1e-7)


def test_fused_engine_under_bf16_autocast_runs_bf16_weights(interpreter):
    model = make_model("s5", d_model=16)
    context, _ = data(False)
    engine = RolloutEngine(model, fused=True, autocast_dtype=torch.bfloat16)
    out = engine.rollout(context, HORIZON)
    assert engine.stats.path == "fused" and out.dtype == torch.float32
    error = relative_error(out[:, 1:], loop_engine_rollout(model, context, HORIZON)[:, 1:])
    assert 1e-5 < error < BF16_TOL  # rounded, but close


def test_float16_autocast_is_not_covered(interpreter_on):
    model = make_model("lru", d_model=16)
    with pytest.raises(ValueError, match=r"fused=True, but the fused kernel cannot run this model: weight_dtype "
                                         r"torch.float16"):
        RolloutEngine(model, fused=True, autocast_dtype=torch.float16)
    engine = RolloutEngine(model, fused="auto", autocast_dtype=torch.float16)
    engine.rollout(data(False)[0], 2)
    assert engine.stats.path == "loop" and "torch.float16" in engine.stats.backend_reason


@pytest.mark.parametrize(("kwargs", "precision"), [({}, "ieee"), ({"tf32": True}, "tf32"),
                                                   ({"tf32": True, "fused_precision": "tf32x3"}, "tf32x3"),
                                                   ({"fused_precision": "tf32"}, "tf32")])
def test_fused_precision_follows_the_tf32_choice(interpreter_on, monkeypatch, kwargs, precision):
    seen = []

    def spy(model, x0, state, num_steps, dt_steps=None, **options):
        seen.append((options, dt_steps, torch.is_autocast_enabled("cpu")))
        return x0.new_zeros(x0.shape[0], num_steps, x0.shape[1])

    monkeypatch.setattr(engine_module, "fused_steps", spy)
    model = make_model("lru", d_model=16)
    context, dt = data(True)
    RolloutEngine(model, fused=True, event_mode=True, **kwargs).rollout(context, HORIZON, dt)
    (options, dt_steps, autocast), = seen
    signature = options.pop("signature")  # the engine's own walk over the model, passed on (see below)
    assert signature == model_signature(model)
    assert options == {"weight_dtype": None, "precision": precision} and not autocast
    torch.testing.assert_close(dt_steps, dt[:, C:C + HORIZON - 1])  # the steps' timesteps, as the loop's


def test_auto_on_the_cpu_takes_the_loop_and_says_why():
    model = make_model("lru", d_model=16)
    context, dt = data(True)
    engine = RolloutEngine(model, fused="auto", event_mode=True)
    out = engine.rollout(context, HORIZON, dt)
    assert engine.stats.path == "loop"
    assert engine.stats.backend_reason.startswith("fused=auto, not fused: ")
    assert engine.stats.backend_reason.endswith("plain step loop (no CUDA GPU)")
    assert torch.equal(out, loop_engine_rollout(model, context, HORIZON, dt))


def test_default_engine_reports_fused_false():
    engine = RolloutEngine(make_model("lru", d_model=16))
    assert engine.fused is False  # off unless asked for: the graph path stays the default
    engine.rollout(data(False)[0], 2)
    assert engine.stats.path == "loop" and engine.stats.backend_reason == "fused=false; plain step loop (no CUDA GPU)"


def test_fused_true_on_an_uncovered_model_or_without_a_gpu_names_the_reason(interpreter_on, monkeypatch):
    with pytest.raises(ValueError, match=r"RolloutEngine: fused=True, but the fused kernel cannot run this model: "
                                         r"mixer TinyMixer is not covered .*HINT: fused='auto'"):
        RolloutEngine(make_model(TinyMixer), fused=True)
    engine = RolloutEngine(make_model(TinyMixer), fused="auto")
    engine.rollout(data(False)[0], 2)
    assert engine.stats.path == "loop" and "TinyMixer is not covered" in engine.stats.backend_reason
    monkeypatch.setattr(support, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match=r"fused=True, but .*the model is on cpu, not a CUDA GPU.*HINT"):
        RolloutEngine(make_model("lru", d_model=16), fused=True)


def test_fused_true_checks_again_at_each_rollout(interpreter_on, monkeypatch):
    model = make_model("lru", d_model=16)
    engine = RolloutEngine(model, fused=True)
    model.double()  # now uncovered where it lives
    with pytest.raises(ValueError, match=r"fused=True, but .*weights in torch.float64"):
        engine.rollout(data(False)[0].double(), 2)


@pytest.mark.parametrize("bad", ["yes", "True", 1, 0, None])
def test_bad_fused_values_are_named(bad):
    with pytest.raises(ValueError, match=rf"fused must be True, False or 'auto', got {bad!r}"):
        RolloutEngine(make_model("lru", d_model=16), fused=bad)


def test_bad_fused_precision_is_named():
    with pytest.raises(ValueError, match=r"fused_precision must be None or one of \('ieee', 'tf32x3', 'tf32'\), "
                                         r"got 'fp64'"):
        RolloutEngine(make_model("lru", d_model=16), fused_precision="fp64")


def test_kernel_failure_under_auto_warns_once_and_falls_back(interpreter_on, monkeypatch):
    real_choose = engine_module.choose_fused
    launches = []

    def force_fused(model, fused, weight_dtype, on_gpu, batch=None, n_sms=None, **options):  # as on a GPU
        return real_choose(model, fused, weight_dtype, fused == "auto" or on_gpu, batch, n_sms or 132, **options)

    def broken(*args, **kwargs):
        launches.append(1)
        raise FusedKernelError("fused rollout kernel failed (out of resources)")

    monkeypatch.setattr(engine_module, "choose_fused", force_fused)
    monkeypatch.setattr(engine_module, "fused_steps", broken)
    model = make_model("lru", d_model=16)
    context, _ = data(False)
    engine = RolloutEngine(model, fused="auto")
    with pytest.warns(RuntimeWarning, match=r"fused='auto', but the fused kernel failed: fused rollout kernel "
                                            r"failed \(out of resources\) Falling back"):
        out = engine.rollout(context, HORIZON)
    assert engine.stats.path == "loop" and "out of resources" in engine.stats.fallback_reason
    assert engine.stats.backend_reason.startswith("fused=auto, not fused: the kernel failed earlier")
    assert torch.equal(out, loop_engine_rollout(model, context, HORIZON))
    engine.rollout(context, HORIZON)  # no second try, no second warning (pytest's filter turns warnings on)
    assert len(launches) == 1 and engine.stats.path == "loop"
    engine.release()
    with pytest.warns(RuntimeWarning):
        engine.rollout(context, HORIZON)  # release() lets the kernel be tried again
    assert len(launches) == 2

    strict = RolloutEngine(model, fused=True)
    with pytest.raises(FusedKernelError, match="out of resources"):
        strict.rollout(context, HORIZON)


def test_the_engine_asks_fused_support_once_per_rollout(interpreter_on, monkeypatch):
    from lrnn_lightning.rollout.fused import selection

    asked = count_calls(monkeypatch, selection, "fused_support")
    monkeypatch.setattr(engine_module, "fused_steps", lambda model, x0, state, num_steps, dt_steps=None, **options:
                        x0.new_zeros(x0.shape[0], num_steps, x0.shape[1]))  # (fused_steps asks once more itself)
    model = make_model("lru", d_model=16)
    context, _ = data(False)
    for fused, path in ((True, "fused"), ("auto", "loop"), (False, "loop")):
        engine = RolloutEngine(model, fused=fused)
        asked.clear()
        engine.rollout(context, HORIZON)
        assert engine.stats.path == path and len(asked) == (0 if fused is False else 1), fused
        assert engine.next_backend(context.device) == (path, engine.stats.backend_reason)


def test_a_fused_rollout_walks_the_model_once(interpreter, monkeypatch):
    # the signature walk is host time before the kernel starts: the backend choice and fused_steps share one
    from lrnn_lightning.rollout.fused import launch

    model = make_model("lru", d_model=16)
    context, _ = data(False)
    engine = RolloutEngine(model, fused=True)
    walks = [count_calls(monkeypatch, owner, "model_signature") for owner in (engine_module, launch, support)]
    out = engine.rollout(context, HORIZON)
    assert engine.stats.path == "fused"
    assert sum(len(calls) for calls in walks) == 1
    assert relative_error(out, loop_engine_rollout(model, context, HORIZON)) < FUSED_TOL


def test_choose_backend_returns_a_named_pair(interpreter_off):
    from lrnn_lightning.rollout.fused import choose_backend
    from lrnn_lightning.rollout.fused.selection import BackendChoice

    choice = choose_backend(make_model("lru", d_model=16), fused="auto", cuda_graph=False)
    backend, reason = choice
    assert isinstance(choice, BackendChoice) and (choice.backend, choice.reason) == (backend, reason)
    assert choice == ("loop", "fused=auto, not fused: the model is on cpu, not a CUDA GPU; plain step loop "
                              "(cuda_graph=false)")


def test_functional_rollout_passes_fused_through(interpreter_on):
    from lrnn_lightning.rollout import rollout

    with pytest.raises(ValueError, match="TinyMixer is not covered"):
        rollout(make_model(TinyMixer), data(False)[0], 2, fused=True)


# -- RolloutCallback(fused=...) ---------------------------------------------------------------------

def test_callback_runs_the_fused_path_and_logs_it(interpreter, tmp_path, caplog):
    callback = RolloutCallback(num_sequences=2, batch_size=2, context=8, horizon=HORIZON, fused=True)
    module, datamodule = tiny_module(), tiny_data(event=True)
    trainer = tiny_trainer(tmp_path, [callback], logger=False)
    with caplog.at_level(logging.INFO):
        trainer.validate(module, datamodule=datamodule)
    result = callback.last_result
    assert result.stats.path == "fused" and result.ranks[0].path == "fused"
    assert float(trainer.callback_metrics["rollout/uses_fused"]) == 1.0
    assert float(trainer.callback_metrics["rollout/uses_graph"]) == 0.0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("RolloutCallback: epoch"))
    assert "rank 0 on cpu: 2 sequences, fused path" in line and "Path on rank 0: fused (fused=true: lru x 1" in line

    windows = [datamodule.val_dataset[i] for i in result.indices]
    context = torch.stack([w["context"][-8:] for w in windows])
    dt = torch.stack([w["dt"][16 - 8:16 + HORIZON] for w in windows])
    expected = loop_engine_rollout(module.model, context, HORIZON, dt)
    assert relative_error(result.prediction[:, 1:], expected[:, 1:]) < FUSED_TOL


def test_callback_warms_the_fused_path_up_once_with_the_real_rollout(interpreter, tmp_path, monkeypatch):
    """Triton compiles at the first launch and a call is captured at the second: two rollouts of every row and
    the full horizon (in event mode, as validation end) before the first timed rollout, none before later ones."""
    made = record_callback_engines(monkeypatch)
    rollouts = count_calls(monkeypatch, rollout_module.RolloutEngine, "rollout")
    callback = RolloutCallback(num_sequences=3, batch_size=2, context=8, horizon=HORIZON, fused=True)
    trainer = tiny_trainer(tmp_path, [callback], logger=False, max_epochs=2)
    trainer.fit(tiny_module(), datamodule=tiny_data(event=True))
    shapes = [(call["horizon"], tuple(call["dt"].shape)) for call in rollouts]
    assert shapes == [(HORIZON, (3, 8 + HORIZON))] * 4  # two warm-ups, then one timed rollout an epoch
    assert len(made) == 1 and callback.last_result.stats.path == "fused" and callback.last_result.epoch == 1


def test_callback_warms_the_fused_path_up_again_after_the_weights_are_replaced(interpreter, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    class ReplaceWeightsAtEpochOne(pl.Callback):  # new storage: the captured calls are dropped
        def on_validation_start(self, trainer, module):  # runs before the rollout callback's (listed first)
            if trainer.current_epoch == 1:
                state = {k: v.clone() for k, v in module.model.state_dict().items()}
                module.model.load_state_dict(state, assign=True)

    rollouts = count_calls(monkeypatch, rollout_module.RolloutEngine, "rollout")
    callback = RolloutCallback(num_sequences=3, batch_size=2, context=8, horizon=HORIZON, fused=True)
    trainer = tiny_trainer(tmp_path, [ReplaceWeightsAtEpochOne(), callback], logger=False, max_epochs=2)
    trainer.fit(tiny_module(), datamodule=tiny_data(event=True))
    assert len(rollouts) == 6  # each epoch: two warm-ups (compile, capture) and the timed rollout
    assert callback.last_result.stats.path == "fused" and callback.last_result.epoch == 1


@pytest.mark.parametrize("path", ["graph", "loop"])
def test_callback_warms_up_the_graph_path_and_not_the_loop_path(tmp_path, monkeypatch, path):
    made = record_callback_engines(monkeypatch, EagerGraphEngine if path == "graph" else None)
    rollouts = count_calls(monkeypatch, rollout_module.RolloutEngine, "rollout")
    callback = RolloutCallback(num_sequences=3, batch_size=2, context=8, horizon=HORIZON, fused="auto")
    tiny_trainer(tmp_path, [callback], logger=False).validate(tiny_module(), datamodule=tiny_data(event=True))
    # graph: a prefill-only rollout of one graph batch captures, so validation end only replays
    warm_up = [(1, (2, 8 + 1))] if path == "graph" else []
    assert [(call["horizon"], tuple(call["dt"].shape)) for call in rollouts] == [*warm_up, (HORIZON, (3, 8 + HORIZON))]
    assert callback.last_result.stats.path == path and len(made) == 1


def test_callback_passes_fused_auto_and_logs_the_loop_on_the_cpu(tmp_path, monkeypatch, caplog):
    made = record_callback_engines(monkeypatch)
    callback = RolloutCallback(num_sequences=2, horizon=4, fused="auto")
    trainer = tiny_trainer(tmp_path, [callback], logger=False)
    with caplog.at_level(logging.INFO):
        trainer.validate(tiny_module(), datamodule=tiny_data())
    assert made[0][1]["fused"] == "auto" and callback.last_result.stats.path == "loop"
    assert float(trainer.callback_metrics["rollout/uses_fused"]) == 0.0
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("RolloutCallback: epoch"))
    assert "loop path" in line and "Path on rank 0: loop (fused=auto, not fused: " in line


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("TRUE", True), ("false", False), (False, False)])
def test_callback_fused_option_spellings(interpreter_on, value, expected):
    assert RolloutCallback(fused=value).fused == expected


@pytest.mark.parametrize("bad", ["sometimes", 1, None])
def test_callback_bad_fused_value_is_named(bad):
    with pytest.raises(ValueError, match=rf"RolloutCallback: fused must be 'auto', true or false, got {bad!r}. "
                                         r"HINT: 'auto'"):
        RolloutCallback(fused=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_callback_fused_true_without_cuda_is_a_configuration_error(interpreter_off):
    with pytest.raises(ValueError, match=r"fused=true needs a CUDA GPU, but torch.cuda.is_available\(\) is False.*"
                                         r"HINT: set generation.fused=auto"):
        RolloutCallback(fused=True)


def test_callback_fused_true_without_triton_is_a_configuration_error(monkeypatch):
    monkeypatch.setattr(support, "triton_version", lambda: None)
    with pytest.raises(ValueError, match=r"fused=true needs Triton.*HINT: pip install"):
        RolloutCallback(fused=True)


def test_callback_fused_true_on_an_uncovered_model_fails_in_setup(interpreter_on, tmp_path):
    torch.manual_seed(0)
    model = SequenceModel(TinyMixer, d_input=3, d_output=3, d_model=8, d_state=4, n_layers=1)
    module = NextStepModule(model, torch.optim.AdamW)
    trainer = tiny_trainer(tmp_path, [RolloutCallback(num_sequences=2, fused=True)], logger=False)
    with pytest.raises(ValueError, match=r"fused=true, but the fused kernel does not cover this model: mixer "
                                         r"TinyMixer is not covered.*HINT: set generation.fused=auto"):
        trainer.fit(module, datamodule=tiny_data())
    assert trainer.global_step == 0


def test_rank_reports_code_the_fused_path():
    stats = RolloutStats(path="fused", capture_ms=5.0)
    vector = RankReport.vector(torch.device("cpu"), 16, stats, 100.0)
    report = RankReport.from_vector(0, vector, "cuda")
    assert report.path == "fused" and report.describe() == "rank 0 on cpu: 16 sequences, fused path"
    metrics = {"rollout/nrmse": 0.1, "rollout/persistence_nrmse": 0.2, "rollout/skill": 0.5, "rollout/mse": 0.01,
               "rollout/persistence_mse": 0.02,
               "rollout/valid_steps": 3.0, "rollout/steps_per_second": 10.0, "rollout/uses_graph": 0.0,
               "rollout/uses_fused": 1.0}
    assert summary_line(metrics).endswith("on the fused path.")
    assert summary_line({**metrics, "rollout/uses_fused": 0.0, "rollout/uses_graph": 1.0}).endswith("graph path.")


# -- the Hydra config ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "expected"), [(None, False), ("generation.fused=false", False),
                                                    ("generation.fused=auto", "auto"),
                                                    ("generation.fused=true", True)])
def test_generation_fused_reaches_the_callback(make_cfg, interpreter_on, override, expected):
    cfg = make_cfg("model=lru", "logger=none", *([override] if override else []))
    assert cfg.generation.fused == expected and cfg.callbacks.rollout.fused == expected
    rollout = next(c for c in build(cfg)["callbacks"] if isinstance(c, RolloutCallback))
    assert rollout.fused == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_generation_fused_true_fails_fast_without_cuda(make_cfg, interpreter_off):
    with pytest.raises(Exception, match=r"fused=true needs a CUDA GPU.*HINT: set generation.fused=auto"):
        build(make_cfg("model=lru", "logger=none", "generation.fused=true"))


def test_generation_fused_bad_value_is_named(make_cfg):
    with pytest.raises(Exception, match=r"fused must be 'auto', true or false, got 'maybe'"):
        build(make_cfg("logger=none", "generation.fused=maybe"))


# -- on a GPU ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.usefixtures("exact_fp32")
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_auto_takes_the_fused_path_on_a_gpu_and_matches_the_graph(event):
    pytest.importorskip("triton")
    from tests.test_fused_cuda import HORIZON as GPU_HORIZON
    from tests.test_fused_cuda import WELL_CONDITIONED, assert_fp32_accurate, gpu_data, gpu_model
    from tests.test_fused_cuda import C as GPU_C

    model = gpu_model("lru")
    context, dt = gpu_data(event=event)
    fused = RolloutEngine(model, fused="auto", event_mode=event)
    out = fused.rollout(context, GPU_HORIZON, dt)
    assert fused.stats.path == "fused" and fused.stats.backend_reason.startswith("fused=auto: lru x 2 layers")
    graph_engine = RolloutEngine(model, chunk=4, event_mode=event)
    graph = graph_engine.rollout(context, GPU_HORIZON, dt)
    graph_engine.release()
    assert graph_engine.stats.path == "graph" and graph_engine.stats.backend_reason.startswith("fused=false; CUDA")
    assert out.shape == (context.shape[0], GPU_HORIZON, context.shape[2]) and context.shape[1] == GPU_C
    assert relative_error(out[:, 1:], graph[:, 1:]) < WELL_CONDITIONED
    assert_fp32_accurate(model, context, GPU_HORIZON, dt, out)


@pytest.mark.cuda
def test_callback_warm_up_leaves_the_timed_rollout_a_replay(tmp_path, monkeypatch):
    """The warm-up compiles the kernel and captures the call: the timed rollout compiles nothing and replays."""
    pytest.importorskip("triton")
    from lrnn_lightning.rollout.fused.call_graph import captured_calls
    from lrnn_lightning.rollout.fused.launch import kernel_module

    kernels = [k for k in vars(kernel_module()).values() if hasattr(k, "device_caches")]  # whichever is launched
    compiled, captured = [], []  # kernels in Triton's caches after each rollout; call graphs before it
    original = rollout_module.RolloutEngine.rollout

    def spy(self, context, horizon, dt=None):
        captured.append(len(captured_calls(self.model)))
        out = original(self, context, horizon, dt)
        compiled.append(sum(len(caches[0]) for kernel in kernels for caches in kernel.device_caches.values()))
        return out

    monkeypatch.setattr(rollout_module.RolloutEngine, "rollout", spy)
    callback = RolloutCallback(num_sequences=3, batch_size=2, context=8, horizon=HORIZON, fused=True)
    trainer = tiny_trainer(tmp_path, [callback], logger=False, accelerator="gpu")
    trainer.validate(tiny_module(), datamodule=tiny_data(event=True))
    assert callback.last_result.stats.path == "fused"
    assert len(compiled) == 3 and compiled[2] == compiled[0] >= 1
    assert captured == [0, 0, 1]  # two warm-ups (compile, capture), then the timed rollout replays


@pytest.mark.cuda
def test_auto_falls_back_to_the_graph_for_an_uncovered_model_on_a_gpu():
    pytest.importorskip("triton")
    model = make_model(TinyMixer).cuda()
    context = torch.randn(4, 5, 3, device="cuda")
    engine = RolloutEngine(model, fused="auto", chunk=4)
    out = engine.rollout(context, 8)
    engine.release()
    assert engine.stats.path == "graph" and "TinyMixer is not covered" in engine.stats.backend_reason
    with torch.no_grad():
        expected = loop_engine_rollout(model, context, 8)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"fused=True, but the fused kernel cannot run this model: mixer TinyMixer"):
        RolloutEngine(model, fused=True)


@pytest.mark.cuda
def test_kernel_failure_on_a_gpu_warns_and_takes_the_graph(monkeypatch):
    pytest.importorskip("triton")

    def broken(*args, **kwargs):
        raise FusedKernelError("fused rollout kernel failed (simulated)")

    monkeypatch.setattr(engine_module, "fused_steps", broken)
    model = make_model("lru").cuda()
    context = torch.randn(4, 5, 3, device="cuda")
    engine = RolloutEngine(model, fused="auto", chunk=4)
    with pytest.warns(RuntimeWarning, match=r"fused kernel failed.*simulated"):
        engine.rollout(context, 8)
    engine.release()
    assert engine.stats.path == "graph" and "simulated" in engine.stats.fallback_reason
    assert engine.stats.backend_reason.startswith("fused=auto, not fused: the kernel failed earlier")
    assert "; CUDA graph on cuda" in engine.stats.backend_reason


def test_auto_leaves_a_batch_of_more_than_two_rows_per_sm_to_the_graph(interpreter_on, monkeypatch):
    real_choose = engine_module.choose_fused
    sms = {"n": 132}

    def on_a_gpu(model, fused, weight_dtype, on_gpu, batch=None, n_sms=None, **options):  # a GPU of sms["n"] SMs
        return real_choose(model, fused, weight_dtype, True, batch, sms["n"], **options)

    monkeypatch.setattr(engine_module, "choose_fused", on_a_gpu)
    monkeypatch.setattr(engine_module, "fused_steps", lambda model, x0, state, num_steps, dt_steps=None, **options:
                        x0.new_zeros(x0.shape[0], num_steps, x0.shape[1]))
    model = make_model("lru", d_model=16)
    context, _ = data(False)
    engine = RolloutEngine(model, fused="auto", cuda_graph=False)
    engine.rollout(context, HORIZON)
    assert engine.stats.path == "fused"
    sms["n"] = 1  # the same rows are now more than two per SM
    engine.rollout(context, HORIZON)
    assert engine.stats.path == "loop"
    reason = engine.stats.backend_reason
    assert f"fused=auto, not fused: {context.shape[0]} rows are more than 2 per SM (1 SMs)" in reason
    assert engine.next_backend(context.device, context.shape[0]) == ("loop", engine.stats.backend_reason)
