"""Precision: the LTI mixers with half-precision weights, and event timesteps under autocast.

LRU, S4D and S5 compute in at least float32 whatever their parameters' dtype (complex
half types lack most kernels; bfloat16 has no complex kind), so a `.bfloat16()` or
`.half()` model must run and agree with float32. Mamba and RG-LRU must keep the float32
precision of event timesteps when autocast runs their activations in bfloat16.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lrnn_lightning.models.mamba import Mamba
from lrnn_lightning.models.rglru import RGLRU
from lrnn_lightning.models.s4d import S4D
from lrnn_lightning.models.s5 import S5
from tests.conftest import relative_error
from tests.helpers import perturb_parameters, random_dt
from tests.test_models_lti import LTI_CASES

BATCH, LENGTH, D_MODEL, D_STATE = 3, 37, 8, 8


# (vs the float32 model holding the same rounded weights, vs the original float32 model);
# the first is the rounding of x, y and the state (2^-8 for bf16, 2^-11 for fp16), the second
# adds the rounding of the weights, which moves the eigenvalues
TOLERANCES = {torch.bfloat16: (6e-3, 4e-2), torch.float16: (1e-3, 6e-3)}


def _step_loop(module, x, dt=None, state=None):
    if state is None:
        state = module.allocate_state(x.shape[0], x.device, x.dtype)
    ys = [module.step(x[:, t], state, None if dt is None else dt[:, t]) for t in range(x.shape[1])]
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("cls,kwargs", LTI_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("event", [False, True], ids=["no-dt", "event-dt"])
def test_lti_mixer_with_half_precision_weights_agrees_with_float32(cls, kwargs, dtype, event):
    torch.manual_seed(0)
    mixer = cls(D_MODEL, D_STATE, **kwargs)
    perturb_parameters(mixer)
    mixer.eval()
    low = copy.deepcopy(mixer).to(dtype)
    same_weights = copy.deepcopy(low).float()  # only the compute precision differs from `low`
    x = torch.randn(BATCH, LENGTH, D_MODEL).to(dtype)
    dt = random_dt(BATCH, LENGTH) if event else None
    tol_same, tol_original = TOLERANCES[dtype]
    split = 23
    with torch.no_grad():
        y = low(x, dt)
        y_loop, state = _step_loop(low, x, dt)
        y_ctx, prefilled = low.prefill(x[:, :split], None if dt is None else dt[:, :split])
        y_rest, _ = _step_loop(low, x[:, split:], None if dt is None else dt[:, split:], prefilled)
        y_same = same_weights(x.float(), dt)
        y_original = mixer(x.float(), dt)
    assert y.dtype == y_loop.dtype == y_ctx.dtype == y_rest.dtype == dtype
    assert all(t.dtype == dtype for t in (*state.values(), *prefilled.values()))
    assert y_same.abs().mean() > 1e-2, "output is (nearly) zero: the check would prove nothing"
    for name, result, reference in (("forward", y, y_same), ("step loop", y_loop, y_same),
                                    ("prefill + step", torch.cat([y_ctx, y_rest], 1), y_same)):
        assert relative_error(result, reference) < tol_same, name
        assert relative_error(result, y_original) < tol_original, name


@pytest.mark.parametrize("cls", [S4D, S5])
def test_lti_step_rounds_into_a_low_precision_state_in_place(cls):
    """A float32 model stepping a bfloat16 state: computed in float32, written back in place."""
    torch.manual_seed(0)
    mixer = cls(D_MODEL, D_STATE)
    perturb_parameters(mixer)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    with torch.no_grad():
        state = mixer.allocate_state(BATCH, "cpu", torch.bfloat16)
        pointers = {key: tensor.data_ptr() for key, tensor in state.items()}
        y_loop, _ = _step_loop(mixer.eval(), x, state=state)
        y = mixer(x)
    assert {key: tensor.data_ptr() for key, tensor in state.items()} == pointers
    assert all(tensor.dtype == torch.bfloat16 for tensor in state.values())
    assert y_loop.dtype == torch.float32
    assert relative_error(y_loop, y) < 6e-3


@pytest.mark.parametrize("cls", [Mamba, RGLRU])
def test_event_timesteps_keep_float32_precision_under_autocast(cls):
    """The state must see the bits of dt that bfloat16 would drop."""
    torch.manual_seed(0)
    mixer = cls(D_MODEL, 4)
    perturb_parameters(mixer, scale=0.1)
    mixer.eval()
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    dt = random_dt(BATCH, LENGTH)
    dt_bf16 = dt.bfloat16().float()
    assert not torch.equal(dt, dt_bf16)
    states, steps = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for timesteps in (dt, dt_bf16):
            states.append(mixer.prefill(x, timesteps)[1]["h"])
            state = mixer.allocate_state(BATCH, "cpu", torch.float32)
            for t in range(3):
                mixer.step(x[:, t], state, timesteps[:, t])
            steps.append(state["h"])
    assert states[0].dtype == steps[0].dtype == torch.float32
    assert relative_error(states[0], states[1]) > 1e-6, "prefill rounded dt to bfloat16"
    assert relative_error(steps[0], steps[1]) > 1e-6, "step rounded dt to bfloat16"


@pytest.mark.parametrize("cls", [Mamba, RGLRU])
def test_half_precision_ltv_mixers_still_run_with_float32_timesteps(cls):
    """The float32 event times must not leak float32 tensors into a bfloat16 model's matmuls."""
    torch.manual_seed(0)
    mixer = cls(D_MODEL, 4)
    perturb_parameters(mixer, scale=0.1)
    mixer.eval()
    low = copy.deepcopy(mixer).bfloat16()
    x, dt = torch.randn(BATCH, LENGTH, D_MODEL), random_dt(BATCH, LENGTH)
    with torch.no_grad():
        y_reference = mixer(x, dt)
        y = low(x.bfloat16(), dt)
        y_loop, state = _step_loop(low, x.bfloat16(), dt)
        _, prefilled = low.prefill(x.bfloat16(), dt)
    assert y.dtype == y_loop.dtype == state["h"].dtype == prefilled["h"].dtype == torch.bfloat16
    assert relative_error(y, y_reference) < 2e-2
    assert relative_error(y_loop, y_reference) < 2e-2
