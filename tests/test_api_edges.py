"""The library API at its edges: where a state lives by default, options given to the wrong owner, dt of the
wrong length, flags of the wrong type, NumPy integers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lrnn_lightning.models import MIXERS, build_model, get_mixer_class
from lrnn_lightning.rollout import RolloutEngine, run_steps
from tests.conftest import relative_error


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_a_float64_model_steps_a_float64_state_by_default(name):
    torch.manual_seed(0)
    model = build_model(name, d_input=3, d_model=16, d_state=8, n_layers=2).double().eval()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    state = model.allocate_state(2)  # no dtype given: the model's
    assert {t.dtype for t in state.values()} == {torch.float64}
    assert {t.device for t in state.values()} == {torch.device("cpu")}
    with torch.no_grad():
        stepped = torch.stack([model.step(x[:, t], state) for t in range(x.shape[1])], dim=1)
        parallel = model(x)
    assert relative_error(stepped, parallel) < 1e-12  # float32 state rounding would give ~1e-7
    explicit = model.allocate_state(2, "cpu", torch.float32)
    assert {t.dtype for t in explicit.values()} == {torch.float32}  # an explicit dtype still wins


def test_a_mixer_option_given_to_build_model_points_to_mixer_kwargs():
    with pytest.raises(ValueError, match=r"build_model: unknown option r_min for a lru model\. HINT: LRU's own "
                                         r"options go in mixer_kwargs, e\.g\. mixer_kwargs=\{'r_min': 0\.5\}"):
        build_model("lru", d_input=3, r_min=0.5)
    with pytest.raises(ValueError, match=r"unknown option r_minn .*LRU takes r_min, r_max, max_phase"):
        build_model("lru", d_input=3, r_minn=0.5)
    model = build_model("lru", d_input=3, mixer_kwargs={"r_min": 0.5})
    assert model.layers[0].mixer is not None


@pytest.mark.parametrize("options, message", [
    ({"r_minn": 0.5}, r"LRU takes no option r_minn \(mixer_kwargs\)\. Its options: r_min, r_max, max_phase"),
    ({"d_state": 5}, r"LRU takes no option d_state .*HINT: d_state is SequenceModel's own argument"),
])
def test_a_misspelt_mixer_kwarg_lists_the_mixers_options(options, message):
    with pytest.raises(ValueError, match=message):
        build_model("lru", d_input=3, mixer_kwargs=options)


def test_run_steps_names_dt_steps_too_short_before_stepping():
    model = build_model("s5", d_input=3, d_model=16, d_state=8).eval()
    state = model.allocate_state(2)
    state["0.h_re"].normal_()
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match=r"run_steps: dt_steps must be \(2, >= 5\): one timestep per row and step, "
                                         r"got \(2, 3\)"):
        run_steps(model, torch.randn(2, 3), state, 5, torch.rand(2, 3) + 0.5)
    assert all(torch.equal(state[k], before[k]) for k in state)  # nothing stepped


@pytest.mark.parametrize("option, value, message", [
    ("event_mode", "no", r"event_mode must be True or False, got 'no'"),
    ("compile", 1, r"compile must be True or False, got 1"),
    ("tf32", "no", r"tf32 must be True, False or None \(keep the global setting\), got 'no'"),
])
def test_engine_flags_of_the_wrong_type_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        RolloutEngine(build_model("lru", d_input=3, d_model=16, d_state=8), **{option: value})


def test_a_numpy_integer_horizon_is_a_horizon():
    model = build_model("lru", d_input=3, d_model=16, d_state=8).eval()
    context = torch.randn(2, 5, 3)
    engine = RolloutEngine(model, cuda_graph=False)
    out = engine.rollout(context, np.int64(4))
    assert out.shape == (2, 4, 3)
    assert torch.equal(out, engine.rollout(context, 4))


def test_a_state_that_is_not_the_models_is_named():
    model = build_model("lru", d_input=3, d_model=16, d_state=8, n_layers=2).eval()
    mixer_state = model.layers[0].mixer.allocate_state(2)  # a bare mixer's keys: h_re, h_im
    with pytest.raises(ValueError, match=r"SequenceModel.step: the state has no entries of layer 0 \(keys "
                                         r"'0.<name>'\); its keys are \['h_im', 'h_re'\]\. HINT: make it with this "
                                         r"model's allocate_state or prefill"):
        model.step(torch.randn(2, 3), mixer_state)
    one_layer = build_model("lru", d_input=3, d_model=16, d_state=8, n_layers=1).allocate_state(2)
    with pytest.raises(ValueError, match=r"no entries of layer 1"):
        model.step(torch.randn(2, 3), one_layer)


@pytest.mark.parametrize("name", ["lru", "s4d", "s5", "mamba", "rglru"])
def test_a_bare_mixer_names_a_state_of_another_batch_size(name):
    """A bare mixer's step used to broadcast a 3-row state against 1 row silently (LRU, S4D, S5: a (3, D) output) or
    fail with a broadcasting error."""
    mixer = get_mixer_class(name)(16, 8).eval()
    with torch.no_grad():
        _, state = mixer.prefill(torch.randn(3, 5, 16))
        for rows in (1, 5):
            with pytest.raises(ValueError, match=rf"\.step: state '\w+' has shape \(3, .*but x_t has {rows} rows.*"
                                                 r"HINT: allocate_state"):
                mixer.step(torch.randn(rows, 16), state)
        assert mixer.step(torch.randn(3, 16), state).shape == (3, 16)


@pytest.mark.parametrize("name", ["lru", "mamba"])
def test_a_state_of_another_batch_size_is_named(name):
    model = build_model(name, d_input=3, d_model=16, d_state=8, n_layers=2).eval()
    x = torch.randn(3, 3)
    with torch.no_grad():
        for rows in (1, 2, 4):  # each used to fail deep inside the mixer, with a broadcasting error
            state = model.allocate_state(rows)
            first = next(iter(state))  # the first layer's first entry is checked first
            with pytest.raises(ValueError, match=rf"SequenceModel.step: state '{re.escape(first)}' has shape "
                                                 rf"\({rows}, .*but x_t has 3 rows.*HINT: allocate_state\(3\)"):
                model.step(x, state)
        state = model.allocate_state(3)
        assert model.step(x, state).shape == (3, 3)
