"""Whole fused calls replayed as CUDA graphs: the packing, the state layout and the kernel launch of one
call shape, captured once and replayed with the inputs copied in.

Before its kernel starts, an eager fused call spends about 0.3 ms of host time on an H100 host
(0.4-0.8 ms until it returns; experiments/RESULTS.md, sixth and seventh sessions): Triton's
launcher binding 60 arguments, the output, state and scratch buffers, the packing graph's replay
and the checks. A 256-step rollout of a small model spends less than that in its kernel. A
`CallGraph` replays all of it as one graph launch: its nodes pack the live weights (`pack_model`,
the ops `pack_live` replays), lay out the state, zero the exchange slots and counters, run the
kernel and leave the outputs in static buffers that the caller copies out. What stays on the host before the kernel
starts: `fused_steps`' checks, the model's signature, the cache lookup, one copy of x0, the state
and the timesteps into static inputs, and the graph launch (50-70 µs on an H100 host).

`replayed_call` captures a call shape the second time it sees it (a one-off call runs eagerly
and leaves no graph behind) and keeps at most MAX_CALL_GRAPHS per model, the least recently
used dropped first. Graphs read the parameters at their captured addresses, so a changed
`model_signature` (a parameter or buffer replaced, a module swapped) drops every graph of the
model; in-place updates (optimizer steps, `load_state_dict`) are read live. A shape whose
capture fails runs eagerly from then on, after one warning (whatever `on_capture_error` says: the
eager launch computes the same numbers). `release_calls(model)` frees a model's graphs (the
engine's `release` does, for every engine of that model); `LRNN_FUSED_CALL_GRAPHS=0` in the
environment (or `ENABLED = False` here) launches every call eagerly. Each graph holds its own
copy of the packed weights, beside the packing graph of the eager path (`pack_graph.py`).
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lrnn_lightning.rollout.fused.config import KernelConfig
from lrnn_lightning.rollout.fused.pack import pack_model
from lrnn_lightning.rollout.state import State
from lrnn_lightning.rollout.step_graph import capture_graph

ENABLED = os.environ.get("LRNN_FUSED_CALL_GRAPHS", "1") != "0"
MAX_CALL_GRAPHS = 4  # call shapes captured per model (a callback uses one; a sweep of horizons more)
MAX_SHAPES_SEEN = 64  # call shapes remembered as seen once, before the memory is cleared


class CallKey(NamedTuple):
    """What a captured call is fixed to: everything but the values of x0, the state and the timesteps."""

    stream: int
    batch: int
    width: int
    x_dtype: torch.dtype
    num_steps: int
    event: bool
    weight_dtype: torch.dtype
    precision: str
    config: KernelConfig | None  # as asked (None: the default launch, which depends on nothing else here)
    state: tuple | None  # ((key, shape, dtype), ...) of the given state, None for zeros

    @staticmethod
    def of(x0: Tensor, state: State | None, num_steps: int, dt_steps: Tensor | None, weight_dtype: torch.dtype,
           precision: str, config: KernelConfig | None) -> CallKey:
        """The key of a call with these arguments on the current stream."""
        layout = None if state is None else tuple((key, value.shape, value.dtype) for key, value in state.items())
        return CallKey(_raw_stream(x0.device), x0.shape[0], x0.shape[1], x0.dtype, num_steps, dt_steps is not None,
                       weight_dtype, precision, config, layout)


def _raw_stream(device: torch.device) -> int:
    """The current CUDA stream's handle on `device` (torch's private getter where it has one: 5 µs less a call)."""
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is not None:
        return getter(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


class CallGraph:
    """One fused call captured: `replay` copies the inputs into static buffers and launches the graph.

    Args:
        model: the SequenceModel, whose live parameters the captured packing reads.
        x0, state, dt_steps: a call's inputs, (B, W), the state dict or None, (B, T) or None: their shapes
            and dtypes make the static inputs (their values are not used).
        weight_dtype: the kernel's weight dtype (packing).
        fold: whether the packing folds the LayerNorm gains in (`pack.pack_model`: phased steps on bf16 weights).
        launch: `(packed, x0, state, dt_steps) -> KernelCall`, run inside the capture: chooses the launch
            shape and builds the call (`launch.build_call`) from the static inputs.
        kernels: the kernel module (`launch.kernel_module()`).
    """

    def __init__(self, model: nn.Module, x0: Tensor, state: State | None, dt_steps: Tensor | None,
                 weight_dtype: torch.dtype, fold: bool, launch: Callable, kernels):
        device, event = x0.device, dt_steps is not None
        # normal tensors even under inference_mode: a later call outside it copies into them
        with torch.inference_mode(False):
            self.x0 = x0.clone()
            self.state = None if state is None else {key: value.clone() for key, value in state.items()}
            self.dt = None if dt_steps is None else dt_steps.to(torch.float32).contiguous().clone()
        self.inputs = [self.x0, *(self.state or {}).values(), *([] if self.dt is None else [self.dt])]

        def body() -> tuple:  # (the packed weights, the KernelCall)
            packed = pack_model(model, weight_dtype, event, fold)
            call = launch(packed, self.x0, self.state, self.dt)
            call.launch(kernels)
            return packed, call

        with torch.no_grad():
            # warm-up: the packing's lazy initialisation must not happen in capture (the kernel has compiled)
            self.graph, (self.packed, self.call) = capture_graph(
                device, body, warm_up=lambda: pack_model(model, weight_dtype, event, fold))

    def replay(self, x0: Tensor, state: State | None, dt_steps: Tensor | None) -> tuple[Tensor, Tensor]:
        """Run the captured call on these inputs (shapes and dtypes as captured); returns the static
        (B, T + 1, W) output buffer and (L, rows, state_width) state rows, overwritten by the next replay."""
        # one launch for all the copies (state's keys come in the captured order: they are part of its CallKey)
        torch._foreach_copy_(self.inputs, [x0, *(state or {}).values(), *([] if dt_steps is None else [dt_steps])])
        self.graph.replay()
        return self.call.out, self.call.states


class _ModelCalls:
    """The captured calls of one model under one signature."""

    def __init__(self, signature: tuple):
        self.signature = signature
        self.graphs: OrderedDict[CallKey, CallGraph] = OrderedDict()
        self.seen: set[CallKey] = set()
        self.failed: set[CallKey] = set()


_CALLS: weakref.WeakKeyDictionary[nn.Module, _ModelCalls] = weakref.WeakKeyDictionary()


def replayed_call(model: nn.Module, signature: tuple, key: CallKey,
                  capture: Callable[[], CallGraph]) -> CallGraph | None:
    """The captured call of `model` for `key`, capturing it now (`capture()`) if this is the second time the
    key is asked for; None where the call should run eagerly (the first time, its capture failed, or
    replays are off: `ENABLED`).

    Args:
        model: the model (the cache's owner).
        signature: `fingerprint.model_signature(model)`, taken just now: a different one than the graphs were
            captured under drops them all.
        key: the call's `CallKey`.
        capture: builds the `CallGraph` (raises where the call cannot be captured).
    """
    if not ENABLED:
        return None
    calls = _CALLS.get(model)
    if calls is None or calls.signature != signature:
        _CALLS.pop(model, None)  # the old graphs and their pools are freed before any new capture
        calls = _CALLS[model] = _ModelCalls(signature)
    graph = calls.graphs.get(key)
    if graph is not None:
        calls.graphs.move_to_end(key)
        return graph
    if key in calls.failed:
        return None
    if key not in calls.seen:
        if len(calls.seen) >= MAX_SHAPES_SEEN:
            calls.seen.clear()
        calls.seen.add(key)
        return None
    try:
        graph = capture()
    except torch.OutOfMemoryError:
        raise
    except Exception as error:  # e.g. a launch that cannot be captured: correct eagerly, just slower
        calls.failed.add(key)
        warnings.warn(f"fused rollout: this call shape (batch {key.batch}, {key.num_steps} steps) could not be "
                      f"captured as a CUDA graph ({type(error).__name__}: {str(error).strip()[:500]}); launching "
                      "it eagerly from now on (about 0.5 ms more host time per call).", RuntimeWarning, stacklevel=3)
        return None
    calls.graphs[key] = graph
    while len(calls.graphs) > MAX_CALL_GRAPHS:
        calls.graphs.popitem(last=False)
    return graph


def captured_calls(model: nn.Module) -> list[CallKey]:
    """The keys of `model`'s captured calls, least recently used first."""
    calls = _CALLS.get(model)
    return [] if calls is None else list(calls.graphs)


def release_calls(model: nn.Module) -> None:
    """Free every captured call of `model` (graphs and their memory pools); later calls capture again."""
    _CALLS.pop(model, None)
