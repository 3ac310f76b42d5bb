"""The seed's generation API, kept working: `capture_graph` once, then `generate` by replay or plain loop.

    handle = capture_graph(model, batch_size=4, H=64)
    y = generate(model, x0, num_steps=512, graph_cache=handle)   # CUDA-graph replay
    y = generate(model, x0, num_steps=512)                       # plain loop

`generate` starts from a zeroed state and feeds each output back: y_1 = step(x0),
y_2 = step(y_1), ...; in event mode one (B, 1) timestep is reused at every step, as in
the seed. Unlike the seed, the handle replays `chunk` steps per graph launch, reads live
weights (no stale discretisation), zeroes exactly the tensors `allocate_state` returned,
pads smaller batches, and refuses to replay after a parameter was replaced.
"""

from __future__ import annotations

import gc

import torch
from torch import Tensor, nn

from lrnn_lightning.models.validation import check_dt_values
from lrnn_lightning.rollout.checks import check_positive_int, check_step_model, feature_size, model_device_dtype
from lrnn_lightning.rollout.errors import CaptureError, StaleGraphError, describe_capture_failure
from lrnn_lightning.rollout.inference import rollout_mode
from lrnn_lightning.rollout.loop import run_steps
from lrnn_lightning.rollout.lrnnx_adapter import LrnnxAdapter
from lrnn_lightning.rollout.step_graph import StepGraph


def as_step_model(model: nn.Module, max_seqlen: int = 1, owner: str = "generate") -> nn.Module:
    """`model` itself if it implements the step protocol, else an `LrnnxAdapter` around an lrnnx model."""
    lrnnx_style = callable(getattr(model, "allocate_inference_cache", None))
    if lrnnx_style and not callable(getattr(model, "allocate_state", None)):
        return LrnnxAdapter(model, max_seqlen=max_seqlen)
    check_step_model(model, owner)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, LrnnxAdapter) else model


@torch.no_grad()
def capture_graph(model: nn.Module, batch_size: int, H: int, max_seqlen: int = 1, event_mode: bool = False,
                  device: torch.device | str | None = None, n_warmups: int = 3, *, chunk: int = 16,
                  compile: bool = False, autocast_dtype: torch.dtype | None = None) -> StepGraph:
    """Capture the model's recurrence as a CUDA graph, `chunk` steps per replay.

    Args:
        model: a step-protocol model, or an lrnnx-protocol one (wrapped in `LrnnxAdapter`), on a GPU.
        batch_size: rows of the graph; `generate` pads smaller batches.
        H: features per step (input and output).
        max_seqlen: passed to lrnnx's `allocate_inference_cache`.
        event_mode: capture a timestep buffer, so `generate` takes `integration_timesteps`.
        device: CUDA device; the model's device when None.
        n_warmups: eager runs before capture.
        chunk: steps per replay (the seed replayed one step at a time).
        compile: fuse the step body with torch.compile before capture.
        autocast_dtype: torch.bfloat16 / torch.float16 autocast, or None.

    Returns:
        A `StepGraph` handle: `graph`, the static buffers `static_input` (B, H),
        `static_output` (B, chunk, H), `static_state`, `static_dt` (B, chunk) in event mode,
        the memory `pool` and `batch_size`. Free it with `handle.release()`.
    """
    step_model = as_step_model(model, max_seqlen, "capture_graph")
    check_positive_int(batch_size, "batch_size", "capture_graph")
    check_positive_int(H, "H", "capture_graph")
    width = feature_size(step_model, "capture_graph")
    if width is not None and H != width:
        raise ValueError(f"capture_graph: H={H}, but the model takes {width} features per step. "
                         f"HINT: capture_graph(model, batch_size, H={width}).")
    model_device, dtype = model_device_dtype(step_model, torch.empty(0))
    device = model_device if device is None else torch.device(device)
    if device != model_device and not (device.type == model_device.type == "cuda"
                                       and (device.index or 0) == (model_device.index or 0)):
        raise ValueError(f"capture_graph: device={device}, but the model's weights are on {model_device}. "
                         "HINT: leave device=None, or move the model there first.")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(f"capture_graph: a CUDA graph needs the model on a CUDA GPU, got device {device}. "
                         "HINT: move the model to a GPU, or call generate(model, x, num_steps) without "
                         "graph_cache for the plain loop.")
    # the seed's habit, kept: return the memory of dropped handles before allocating a new pool
    gc.collect()
    torch.cuda.empty_cache()
    try:
        return StepGraph(step_model, batch_size, H, chunk=chunk, event_mode=event_mode, dtype=dtype, device=device,
                         compile=compile, autocast_dtype=autocast_dtype, n_warmups=n_warmups)
    except Exception as error:
        raise CaptureError(describe_capture_failure(error, "capture_graph", batch_size, chunk, H)) from error


def generate(model: nn.Module, x: Tensor, num_steps: int, graph_cache: StepGraph | None = None,
             integration_timesteps: Tensor | None = None) -> Tensor:
    """Autoregressive generation from a zeroed state: x (B, H) -> (B, num_steps, H).

    out[:, 0] = step(x), out[:, k] = step(out[:, k - 1]). With `graph_cache` (from
    `capture_graph`) the captured graph is replayed; without it a plain loop runs.

    Args:
        model: the model the handle was captured for (step-protocol or lrnnx-protocol).
        x: seed input (B, H); B may be smaller than the captured batch size (padded).
        num_steps: number of generated steps, >= 1.
        graph_cache: handle from `capture_graph`, or None for the plain loop.
        integration_timesteps: (B, 1) or (B,) timestep reused at every step; required
            exactly when the handle was captured in event mode.

    Returns:
        (B, num_steps, H).
    """
    owner = "generate"
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{owner}: expected x of shape (B, H), got {shape}. "
                         "HINT: x is one step per row; use rollout() to start from a (B, C, H) context.")
    check_positive_int(num_steps, "num_steps", owner)
    batch, width = x.shape
    dt_steps = None
    if integration_timesteps is not None:
        dt = integration_timesteps
        if not isinstance(dt, Tensor) or dt.numel() != batch or dt.dim() not in (1, 2) or dt.shape[0] != batch:
            shape = tuple(dt.shape) if isinstance(dt, Tensor) else type(dt).__name__
            raise ValueError(f"{owner}: expected integration_timesteps of shape ({batch}, 1), got {shape}. "
                             "HINT: one timestep per row, reused at every step; rollout() takes one per step.")
        check_dt_values(dt, owner)
        dt_steps = dt.reshape(batch, 1).to(x.dtype).expand(batch, num_steps)

    if graph_cache is None:
        step_model = as_step_model(model, max_seqlen=num_steps)
        with rollout_mode(step_model, x.device.type):
            state = step_model.allocate_state(batch, x.device, x.dtype)
            return run_steps(step_model, x, state, num_steps, dt_steps)

    handle = graph_cache
    if _unwrap(handle.model) is not _unwrap(model):
        raise ValueError(f"{owner}: graph_cache was captured for another model. "
                         "HINT: capture_graph(model, ...) for this model.")
    if handle.static_input is None:
        raise ValueError(f"{owner}: graph_cache was released. HINT: capture_graph(model, ...) again.")
    change = handle.stale_reason()
    if change is not None:
        raise StaleGraphError(f"{owner}: graph_cache is stale: {change}. HINT: handle.release(), then "
                              f"capture_graph(model, batch_size={handle.batch_size}, H={handle.width}) again.")
    if batch > handle.batch_size:
        raise ValueError(f"{owner}: batch size {batch} is larger than the captured batch size {handle.batch_size}. "
                         f"HINT: re-capture with capture_graph(model, batch_size={batch}, H={width}); smaller "
                         "batches are padded.")
    if width != handle.width:
        raise ValueError(f"{owner}: x has {width} features but the graph was captured with H={handle.width}.")
    if handle.event_mode and dt_steps is None:
        raise ValueError(f"{owner}: graph_cache was captured with event_mode=True, so integration_timesteps "
                         f"of shape ({batch}, 1) is required.")
    if not handle.event_mode and dt_steps is not None:
        raise ValueError(f"{owner}: got integration_timesteps, but graph_cache was captured without event mode. "
                         "HINT: capture_graph(..., event_mode=True).")
    if x.device != handle.device or x.dtype != handle.dtype:
        raise ValueError(f"{owner}: x is {x.dtype} on {x.device}, the graph was captured for {handle.dtype} on "
                         f"{handle.device}. HINT: x.to(device, dtype).")
    out = torch.empty(batch, num_steps, width, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        handle.run(x, num_steps, out, state=None, dt_steps=dt_steps)
    return out
