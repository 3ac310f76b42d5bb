"""The plain-loop reference path: prefill the context, then one Python-level `step` per output.

Everything else in this package must reproduce these numbers: a CUDA graph replays the
very same `run_steps` body, so graph and loop differ only in how the kernels are launched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lrnn_lightning.models.derived import shared_derivations
from lrnn_lightning.rollout.checks import check_model_output
from lrnn_lightning.rollout.state import State, load_state

StepFunction = Callable[[Tensor, State, Tensor | None], Tensor]


def run_steps(model: nn.Module, x0: Tensor, state: State, num_steps: int, dt_steps: Tensor | None = None,
              step: StepFunction | None = None, out: Tensor | None = None, share_derived: bool = True) -> Tensor:
    """Feed each output back as the next input: y_1 = step(x0), y_{k+1} = step(y_k).

    Args:
        model: implements `step(x_t, state, dt_t)`.
        x0: input of the first step, shape (B, H).
        state: the model's state, updated in place.
        num_steps: number of steps (0 gives an empty result).
        dt_steps: timesteps (B, num_steps), column k for step k; None without event timesteps.
        step: the function to call instead of `model.step` (e.g. a compiled one), same signature.
        out: optional (B, num_steps, H) tensor to write the outputs into (no extra copy).
        share_derived: derive weight-dependent tensors once for all these steps rather than
            once per step (`lrnn_lightning.models.derived`); the weights cannot change meanwhile.

    Returns:
        The outputs y_1..y_num_steps, shape (B, num_steps, H), in x0's dtype.
    """
    # shapes only (no host sync): this body is also what a CUDA graph captures
    if dt_steps is not None and (dt_steps.dim() != 2 or dt_steps.shape[0] != x0.shape[0]
                                 or dt_steps.shape[1] < num_steps):
        raise ValueError(f"run_steps: dt_steps must be ({x0.shape[0]}, >= {num_steps}): one timestep per row and "
                         f"step, got {tuple(dt_steps.shape)}. HINT: column k is the dt of step k.")
    outputs = []
    x = x0
    step = model.step if step is None else step
    with shared_derivations(enabled=share_derived):
        for k in range(num_steps):
            # the cast is a no-op in full precision; under autocast it keeps the fed-back input
            # in x0's dtype, exactly as the graph path's static input buffer does
            x = step(x, state, None if dt_steps is None else dt_steps[:, k]).to(x0.dtype)
            outputs.append(x)
    if not outputs:
        return x0.new_empty(x0.shape[0], 0, x0.shape[1]) if out is None else out
    return torch.stack(outputs, dim=1, out=out)


def prefill_context(model: nn.Module, context: Tensor, horizon: int,
                    dt: Tensor | None = None) -> tuple[Tensor, State, Tensor | None]:
    """Prefill `context` and return what the autoregressive steps start from.

    Args:
        model: implements the step protocol.
        context: (B, C, H).
        horizon: number of outputs of the rollout, >= 1.
        dt: event timesteps (B, C + horizon), or None.

    Returns:
        first: (B, H), the prefill's last output (the prediction of the step after the context).
        state: the state after the context, as `prefill` returned it.
        dt_steps: (B, horizon - 1) timesteps of the steps that follow (dt's last column is
            not consumed), or None.
    """
    batch, context_len, width = context.shape
    y_context, state = model.prefill(context, None if dt is None else dt[:, :context_len])
    check_model_output(y_context, batch, context_len, width, type(model).__name__)
    dt_steps = None if dt is None else dt[:, context_len:context_len + horizon - 1]
    return y_context[:, -1].to(context.dtype), state, dt_steps


def rollout_loop(model: nn.Module, context: Tensor, horizon: int, dt: Tensor | None = None) -> Tensor:
    """Roll `model` out from `context` with a plain Python loop (no CUDA graph).

    out[:, 0] is the prefill's last output (the prediction of the step after the context);
    out[:, k] = step(out[:, k - 1], dt[:, C + k - 1]) for k = 1..horizon - 1.
    Call it inside `rollout_mode` (eval, no_grad); inputs are assumed validated.

    Args:
        model: implements the step protocol.
        context: (B, C, H).
        horizon: number of outputs, >= 1.
        dt: event timesteps (B, C + horizon), or None; the last column is not consumed.

    Returns:
        (B, horizon, H) in the context's dtype.
    """
    first, prefilled, dt_steps = prefill_context(model, context, horizon, dt)
    state = model.allocate_state(context.shape[0], context.device, context.dtype)
    load_state(state, prefilled, type(model).__name__)
    rest = run_steps(model, first, state, horizon - 1, dt_steps)
    return torch.cat([first.unsqueeze(1), rest], dim=1)
