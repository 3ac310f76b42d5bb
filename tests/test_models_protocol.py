"""The step protocol, checked for every mixer of the zoo and for SequenceModel over each.

Every check uses random, nonzero inputs and perturbed weights: `forward` and a loop of
`step` must compute the same function (fp32), with and without event timesteps, from a
zero state and after a prefill, and must follow the weights after an optimizer step.
"""

from __future__ import annotations

import pytest
import torch

from lrnn_lightning.models import MIXERS, SequenceModel, get_mixer_class
from tests.conftest import relative_error
from tests.helpers import forbid_host_sync, perturb_parameters, random_dt

TOL = 2e-5  # fp32: "well under 1e-4"
D_MODEL, D_STATE, BATCH, LENGTH = 16, 8, 3, 37

# every constructor option that changes the maths gets its own case
VARIANTS = {
    "lru": [{}],
    "s4d": [{}],
    "s5": [{}, {"discretization": "bilinear"}, {"discretization": "dirac"}, {"conj_sym": False}],
    "mamba": [{}],
    "rglru": [{}],
}
CASES = [pytest.param(name, kw, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}")
         for name in MIXERS for kw in VARIANTS[name]]


def make_mixer(name, kwargs):
    torch.manual_seed(0)
    mixer = get_mixer_class(name)(D_MODEL, D_STATE, **kwargs)
    perturb_parameters(mixer)
    return mixer.eval()


def make_model(name, kwargs, n_layers=2):
    torch.manual_seed(0)
    model = SequenceModel(name, d_input=5, d_output=5, d_model=D_MODEL, d_state=D_STATE, n_layers=n_layers,
                          mixer_kwargs=kwargs)
    perturb_parameters(model)
    return model.eval()


def step_loop(module, x, dt=None, state=None):
    if state is None:
        state = module.allocate_state(x.shape[0], x.device, x.dtype)
    ys = [module.step(x[:, t], state, None if dt is None else dt[:, t]) for t in range(x.shape[1])]
    return torch.stack(ys, dim=1), state


def modules(name, kwargs):
    return [make_mixer(name, kwargs), make_model(name, kwargs)]


def _input(module, length=LENGTH):
    width = module.d_input if isinstance(module, SequenceModel) else module.d_model
    return torch.randn(BATCH, length, width)


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_step_loop_equals_forward(name, kwargs, event):
    for module in modules(name, kwargs):
        x = _input(module)
        dt = random_dt(BATCH, LENGTH) if event else None
        with torch.no_grad():
            y_parallel = module(x, dt)
            y_loop, _ = step_loop(module, x, dt)
        assert y_parallel.shape == x.shape[:2] + (y_parallel.shape[-1],)
        assert y_parallel.abs().mean() > 1e-3, "output is (nearly) zero: the check would prove nothing"
        assert relative_error(y_loop, y_parallel) < TOL


@pytest.mark.parametrize("name,kwargs", CASES)
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_prefill_then_step_equals_forward(name, kwargs, event):
    for module in modules(name, kwargs):
        x = _input(module)
        dt = random_dt(BATCH, LENGTH) if event else None
        split = 23
        with torch.no_grad():
            y_full = module(x, dt)
            y_ctx, state = module.prefill(x[:, :split], None if dt is None else dt[:, :split])
            assert set(state) == set(module.allocate_state(BATCH, x.device, x.dtype))
            y_rest, _ = step_loop(module, x[:, split:], None if dt is None else dt[:, split:], state)
        assert relative_error(y_ctx, y_full[:, :split]) < TOL
        assert relative_error(y_rest, y_full[:, split:]) < TOL


@pytest.mark.parametrize("name,kwargs", CASES)
def test_prefill_state_is_the_step_loop_state(name, kwargs):
    mixer = make_mixer(name, kwargs)
    x = _input(mixer)
    with torch.no_grad():
        _, prefilled = mixer.prefill(x)
        _, looped = step_loop(mixer, x)
    for key in looped:
        assert prefilled[key].shape == looped[key].shape, key
        assert relative_error(prefilled[key], looped[key]) < TOL, key


@pytest.mark.parametrize("name,kwargs", CASES)
def test_step_follows_weights_after_optimizer_step(name, kwargs):
    model = make_model(name, kwargs)
    x = _input(model)
    dt = random_dt(BATCH, LENGTH)
    state = model.allocate_state(BATCH, x.device, x.dtype)
    with torch.no_grad():
        y_before = model.step(x[:, 0], state, dt[:, 0])  # any cache a step might keep is now warm
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    model(x, dt).square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        y_parallel = model(x, dt)
        y_loop, _ = step_loop(model, x, dt)
    assert relative_error(y_loop[:, 0], y_before) > 1e-3, "the optimizer step changed nothing"
    assert relative_error(y_loop, y_parallel) < TOL


@pytest.mark.parametrize("name,kwargs", CASES)
def test_step_does_not_synchronise_with_host(name, kwargs):
    for module in modules(name, kwargs):
        x = _input(module, length=3)
        dt = random_dt(BATCH, 3)
        state = module.allocate_state(BATCH, x.device, x.dtype)
        with torch.no_grad(), forbid_host_sync():
            for t in range(3):
                module.step(x[:, t], state, dt[:, t])
                module.step(x[:, t], state)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_state_is_real_and_updated_in_place(name, kwargs):
    mixer = make_mixer(name, kwargs)
    state = mixer.allocate_state(BATCH, "cpu", torch.float32)
    assert state, "a mixer must declare its recurrent state"
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.shape[0] == BATCH, key
        assert torch.count_nonzero(tensor) == 0, f"{key} is not zeroed"
    pointers = {key: tensor.data_ptr() for key, tensor in state.items()}
    with torch.no_grad():
        mixer.step(torch.randn(BATCH, D_MODEL), state)
    assert {key: tensor.data_ptr() for key, tensor in state.items()} == pointers
    assert any(torch.count_nonzero(tensor) > 0 for tensor in state.values())


@pytest.mark.parametrize("name,kwargs", CASES)
def test_gradients_reach_every_parameter(name, kwargs):
    model = make_model(name, kwargs)
    model.train()
    x = _input(model)
    (model(x).square().mean() + model(x, random_dt(BATCH, LENGTH)).square().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", list(MIXERS))
def test_bad_input_raises_clear_errors(name):
    for module in modules(name, VARIANTS[name][0]):
        width = module.d_input if isinstance(module, SequenceModel) else module.d_model
        x = torch.randn(BATCH, 10, width)
        with pytest.raises(ValueError, match=r"rank 3|\(B, L"):
            module(torch.randn(BATCH, width))
        with pytest.raises(ValueError, match=f"feature size {width}"):
            module(torch.randn(BATCH, 10, width + 1))
        with pytest.raises(ValueError, match=r"dt of shape"):
            module(x, torch.ones(BATCH, 9))
        with pytest.raises(ValueError, match=r"strictly positive, got -1"):
            module(x, torch.ones(BATCH, 10).index_fill_(1, torch.tensor([4]), -1.0))
        with pytest.raises(ValueError, match=r"finite, got nan"):
            module(x, torch.ones(BATCH, 10).index_fill_(1, torch.tensor([2]), float("nan")))
        with pytest.raises(ValueError, match=r"prefill|rank 3|\(B, L"):
            module.prefill(torch.randn(width))
        state = module.allocate_state(BATCH, "cpu", torch.float32)
        with pytest.raises(ValueError, match=r"x_t of shape"):
            module.step(torch.randn(BATCH, width + 2), state)
        with pytest.raises(ValueError, match=r"dt_t of shape"):
            module.step(torch.randn(BATCH, width), state, torch.ones(BATCH + 1))


def test_unknown_mixer_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown mixer 'lstm'.*lru, mamba, rglru, s4d, s5"):
        get_mixer_class("lstm")
