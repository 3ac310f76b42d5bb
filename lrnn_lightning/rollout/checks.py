"""Validation of a rollout's model and inputs, done once per rollout on the host."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lrnn_lightning.models.validation import check_dt_values, check_positive_int

STEP_PROTOCOL = ("allocate_state", "step", "prefill")


def check_step_model(model: object, owner: str) -> None:
    """Raise unless `model` is an nn.Module implementing the step protocol."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"{owner}: expected a torch.nn.Module implementing the step protocol, "
                         f"got {type(model).__name__}.")
    missing = [name for name in STEP_PROTOCOL if not callable(getattr(model, name, None))]
    if missing:
        if callable(getattr(model, "allocate_inference_cache", None)):
            hint = "HINT: it looks like an lrnnx model; wrap it first: LrnnxAdapter(model)."
        else:
            hint = "HINT: implement allocate_state, step and prefill (see lrnn_lightning.models.mixer)."
        raise ValueError(f"{owner}: {type(model).__name__} does not implement the step protocol: "
                         f"missing {', '.join(missing)}. {hint}")


def feature_size(model: nn.Module, owner: str) -> int | None:
    """The width H that a rollout feeds back, or None when the model does not declare it.

    A rollout feeds outputs back as inputs, so `d_input` and `d_output` must agree.
    """
    d_input, d_output = getattr(model, "d_input", None), getattr(model, "d_output", None)
    if d_input is None and d_output is None:
        d_input = d_output = getattr(model, "d_model", None)
    if d_input is not None and d_output is not None and d_input != d_output:
        raise ValueError(
            f"{owner}: an autoregressive rollout feeds each output back as the next input, so it needs "
            f"d_input == d_output, got d_input={d_input}, d_output={d_output}. "
            "HINT: build the model with d_output equal to d_input."
        )
    return d_input if d_input is not None else d_output


def model_device_dtype(model: nn.Module, default: Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating parameter or buffer (else `default`'s)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return default.device, default.dtype


def check_context(context: object, width: int | None, model: nn.Module, owner: str) -> tuple[int, int, int]:
    """Validate a context (B, C, H) against the model; return (B, C, H)."""
    expected = f"(B, C, {width if width is not None else 'H'})"
    if not isinstance(context, Tensor):
        raise ValueError(f"{owner}: expected context to be a torch.Tensor of shape {expected}, "
                         f"got {type(context).__name__}.")
    if context.dim() != 3:
        raise ValueError(
            f"{owner}: expected context of shape {expected}, got shape {tuple(context.shape)}. "
            "HINT: for a single starting step use a context of length 1: context[:, None]."
        )
    batch, context_len, features = context.shape
    if batch < 1:
        raise ValueError(f"{owner}: got an empty batch, context shape {tuple(context.shape)}.")
    if context_len < 1:
        raise ValueError(f"{owner}: the context needs at least one step (C >= 1), got shape {tuple(context.shape)}. "
                         "HINT: a rollout starts from the model's prediction after the context.")
    if width is not None and features != width:
        raise ValueError(f"{owner}: expected context of shape {expected}, got shape {tuple(context.shape)}: "
                         f"the model takes {width} features per step.")
    if not context.is_floating_point():
        raise ValueError(f"{owner}: expected a floating-point context, got dtype {context.dtype}.")
    device, dtype = model_device_dtype(model, context)
    if context.device != device:
        raise ValueError(f"{owner}: context is on {context.device} but the model is on {device}. "
                         f"HINT: context.to({str(device)!r}).")
    if context.dtype != dtype:
        raise ValueError(f"{owner}: context has dtype {context.dtype} but the model's weights are {dtype}. "
                         f"HINT: context.to({dtype}); for reduced precision keep float32 weights and use "
                         "autocast_dtype.")
    return batch, context_len, features


def check_horizon(horizon: object, owner: str) -> int:
    """Return `horizon` if it is an int >= 1."""
    return check_positive_int(horizon, "horizon", owner, hint="the horizon counts the predicted steps, the first one "
                                                          "coming from the prefill.")


def check_rollout_dt(dt: object, batch: int, total: int, event_mode: bool, device: torch.device, owner: str) -> None:
    """Validate event timesteps (B, C + horizon): present exactly in event mode, positive and finite."""
    if not event_mode:
        if dt is not None:
            raise ValueError(f"{owner}: got dt, but event_mode is False, so the timesteps would be ignored. "
                             "HINT: create the engine with event_mode=True for per-step timesteps.")
        return
    if dt is None:
        raise ValueError(f"{owner}: event_mode=True needs dt of shape (B, C + horizon) = ({batch}, {total}), got None. "
                         "HINT: pass dt, or create the engine with event_mode=False.")
    if not isinstance(dt, Tensor) or tuple(dt.shape) != (batch, total):
        shape = tuple(dt.shape) if isinstance(dt, Tensor) else type(dt).__name__
        raise ValueError(
            f"{owner}: expected dt of shape (B, C + horizon) = ({batch}, {total}), got {shape}. "
            "HINT: dt[:, t] is the timestep of input position t; the context uses the first C columns, "
            "step k of the rollout column C + k - 1, and the last column is not consumed."
        )
    if not dt.is_floating_point():
        raise ValueError(f"{owner}: expected a floating-point dt, got dtype {dt.dtype}.")
    if dt.device != device:
        raise ValueError(f"{owner}: dt is on {dt.device} but the context is on {device}. HINT: dt.to({str(device)!r}).")
    check_dt_values(dt, owner)


def check_model_output(y: Tensor, batch: int, length: int, width: int, owner: str) -> None:
    """The model's output must have the input's shape, so it can be fed back."""
    if tuple(y.shape) != (batch, length, width):
        raise ValueError(
            f"{owner}: the model's prefill returned shape {tuple(y.shape)} for a context of shape "
            f"({batch}, {length}, {width}); a rollout feeds outputs back as inputs, so they must have the "
            "same width. HINT: build the model with d_output equal to d_input."
        )
