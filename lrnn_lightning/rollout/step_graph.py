"""`StepGraph`: K recurrent steps of a model captured as one CUDA graph over static buffers.

One replay advances every row by K steps. Inside the graph, step k reads its own timestep
column, each output is fed back as the next step's input, the K outputs are written to a
static output buffer and the last one to the static input buffer, so consecutive replays
continue the rollout. From Python, per K steps: one dt copy (event mode), one replay, one
output copy. The graph reads the model's live parameters, because `step` derives every
weight-dependent tensor on each call; see `fingerprint.py` for when it must be re-captured.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lrnn_lightning.models import step_ops
from lrnn_lightning.rollout.checks import check_positive_int
from lrnn_lightning.rollout.fingerprint import describe_change, model_fingerprint
from lrnn_lightning.rollout.inference import autocast_context, matmul_tf32_enabled, rollout_mode
from lrnn_lightning.rollout.loop import StepFunction, run_steps
from lrnn_lightning.rollout.state import State, load_state

PAD_DT = 1.0  # timestep of padding rows: benign for every model (a partial last chunk's unused steps
# keep the previous chunk's timesteps; their outputs are discarded)

# One warm-up/capture stream per device, shared by every capture: PyTorch gives each new
# stream its own cuBLAS workspace and never frees it, so a fresh stream per capture would
# grow reserved memory with every re-capture.
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def capture_graph(device: torch.device, body: Callable[[], Any], warm_up: Callable[[], Any] | None = None,
                  pool: tuple[int, int] | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """`body()` captured as a CUDA graph on the device's capture stream; returns the graph and what body returned
    during the capture. `warm_up()` (default: `body()` once) runs on that stream first, so that lazy
    initialisation (cuBLAS handles, autotuning, compilation) stays out of the capture. A capture that fails
    raises the body's own error (ending an invalidated capture raises a vaguer one), after
    `recover_from_failed_capture`."""
    current = torch.cuda.current_stream(device)
    side = capture_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        (warm_up or body)()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    body_error: BaseException | None = None
    try:
        # thread_local: a DDP process's NCCL watchdog thread must not invalidate the capture
        with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
            try:
                result = body()
            except BaseException as error:
                body_error = error
                raise
    except BaseException as error:
        recover_from_failed_capture(device, current)
        raise (body_error or error) from None
    return graph, result


def recover_from_failed_capture(device: torch.device, stream: torch.cuda.Stream) -> None:
    """Undo what a capture that raised leaves behind, which torch does not when `capture_end` raises: make
    `stream` (the one current before the capture) current again, and take the device's default CUDA
    generator out of capture mode with one tiny capture that ends cleanly. Otherwise every later random op
    on the device raises "Offset increment outside graph capture encountered unexpectedly"."""
    torch.cuda.set_stream(stream)
    try:
        side = capture_stream(device)
        side.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            torch.zeros(1, device=device)
        stream.wait_stream(side)
        del graph
    except Exception as error:  # keep the capture's own error the one that propagates
        warnings.warn(f"after a failed CUDA graph capture, resetting the CUDA random generator of {device} failed "
                      f"({type(error).__name__}: {error}); random ops on it may raise.", RuntimeWarning, stacklevel=3)


class StepGraph:
    """`chunk` steps of `model` as one CUDA graph, with fixed-address static buffers and a private memory pool.

    Static buffers (read and written by the graph at fixed addresses):
        static_input:  (batch_size, width), the input of the chunk's first step.
        static_state:  the dict `model.allocate_state(batch_size, device, dtype)` returned.
        static_dt:     (batch_size, chunk), event timesteps, column k for step k; None unless event_mode.
        static_output: (batch_size, chunk, width), the chunk's outputs.

    Args:
        model: implements the step protocol; switched to eval mode while capturing.
        batch_size: rows of the static buffers; `run` pads fewer rows.
        width: features per step H (inputs and outputs).
        chunk: steps per replay, K.
        event_mode: whether each step reads a timestep from `static_dt`.
        dtype: dtype of the buffers and state (the model's weights' dtype).
        device: a CUDA device (any device with capture=False).
        compile: run the step through `torch.compile` (inductor's default mode, without its
            own CUDA graphs) before capture, to fuse each step's kernels.
        autocast_dtype: bfloat16 / float16 to run the body under autocast, or None.
        n_warmups: eager runs of the body on a side stream before capture (also triggers compilation).
        capture: False replays the body eagerly instead: the same static-buffer program
            without a CUDA graph, for debugging and CPU tests.

    Example:
        >>> graph = StepGraph(model, batch_size=32, width=3, chunk=16, device="cuda")
        >>> out = torch.empty(32, 100, 3, device="cuda")
        >>> graph.run(x0, 100, out)          # out[:, k] = y_{k+1} from a zeroed state
        >>> graph.release()
    """

    def __init__(self, model: nn.Module, batch_size: int, width: int, *, chunk: int = 16, event_mode: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cuda", compile: bool = False,
                 autocast_dtype: torch.dtype | None = None, n_warmups: int = 3, capture: bool = True):
        self.model = model
        self.batch_size = check_positive_int(batch_size, "batch_size", "StepGraph")
        self.width = check_positive_int(width, "width", "StepGraph")
        self.chunk = check_positive_int(chunk, "chunk", "StepGraph")
        self.event_mode, self.dtype, self.device = bool(event_mode), dtype, torch.device(device)
        self.compiled, self.autocast_dtype, self.captured = bool(compile), autocast_dtype, bool(capture)
        if self.captured and self.device.type != "cuda":
            raise ValueError(f"StepGraph: capturing a CUDA graph needs a CUDA device, got {self.device}. "
                             "HINT: move the model to a GPU, or use the plain loop on the CPU.")
        self.fingerprint = model_fingerprint(model)
        self.tf32 = matmul_tf32_enabled()  # baked into the captured matmul kernels
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool: tuple[int, int] | None = None

        start = time.perf_counter()
        with torch.cuda.device(self.device) if self.captured else contextlib.nullcontext():
            self.static_input = torch.zeros(batch_size, width, device=self.device, dtype=dtype)
            self.static_output = torch.zeros(batch_size, chunk, width, device=self.device, dtype=dtype)
            self.static_dt = torch.full((batch_size, chunk), PAD_DT, device=self.device, dtype=dtype) \
                if event_mode else None
            self.static_state: State = model.allocate_state(batch_size, self.device, dtype)
            self._step = _step_function(model, self.device.type, autocast_dtype, self.compiled)
            with rollout_mode(model, self.device.type):
                if self.captured:
                    self._capture(n_warmups)
        if self.captured:
            torch.cuda.synchronize(self.device)
        self.capture_ms = 1000.0 * (time.perf_counter() - start)

    def _body(self) -> None:
        # weight-derived tensors: once per replay, still from the live weights (a compiled
        # step fuses its own derivation, and inductor would not trace the shared cache)
        run_steps(self.model, self.static_input, self.static_state, self.chunk, self.static_dt, self._step,
                  out=self.static_output, share_derived=not self.compiled)
        self.static_input.copy_(self.static_output[:, -1])

    def _capture(self, n_warmups: int) -> None:
        def warm_up() -> None:  # the steady-state kernels only in the capture
            for _ in range(max(1, n_warmups)):
                self._body()

        self.pool = torch.cuda.graph_pool_handle()
        try:
            self.graph, _ = capture_graph(self.device, self._body, warm_up, self.pool)
        except BaseException:
            self.release()
            raise

    def stale_reason(self) -> str | None:
        """Why replaying would read memory the model no longer uses (a replaced parameter), or None."""
        return describe_change(self.fingerprint, model_fingerprint(self.model))

    def replay(self) -> None:
        """Advance the static buffers by `chunk` steps."""
        if self.graph is not None:
            self.graph.replay()
        else:
            with rollout_mode(self.model, self.device.type):
                self._body()

    def run(self, x0: Tensor, num_steps: int, out: Tensor, state: State | None = None,
            dt_steps: Tensor | None = None) -> None:
        """Roll `num_steps` steps from `x0` and `state`, writing the outputs into `out`.

        Rows beyond x0's are padding: they start from a zero input and state with dt 1.0
        and are never copied out. The last replay may run past `num_steps`; those outputs
        are discarded too.

        Args:
            x0: input of the first step, shape (b, width), b <= batch_size.
            num_steps: number of steps; 0 does nothing.
            out: receives y_1..y_num_steps, shape (b, num_steps, width).
            state: start state with `allocate_state`'s keys, each (b, ...); None for a zeroed state.
            dt_steps: (b, num_steps) timesteps, column k for step k; required exactly in event mode.
        """
        if self.static_input is None:
            raise RuntimeError("StepGraph: this graph was released. HINT: capture a new one.")
        rows = x0.shape[0]
        if rows > self.batch_size or tuple(x0.shape) != (rows, self.width):
            raise ValueError(f"StepGraph: expected x0 of shape (b, {self.width}) with b <= {self.batch_size}, got "
                             f"{tuple(x0.shape)}. HINT: capture with a larger batch_size, or split the batch.")
        if tuple(out.shape) != (rows, num_steps, self.width):
            raise ValueError(f"StepGraph: expected out of shape ({rows}, {num_steps}, {self.width}), "
                             f"got {tuple(out.shape)}.")
        if (dt_steps is not None) != self.event_mode:
            raise ValueError("StepGraph: " + ("captured in event mode, so every step needs a timestep: got dt=None."
                                              if self.event_mode else
                                              "got timesteps, but the graph was captured without event mode. "
                                              "HINT: capture with event_mode=True."))
        if state is not None:
            rows_of = {key: value.shape[0] for key, value in state.items() if value.shape[0] != rows}
            if rows_of:
                raise ValueError(f"StepGraph: x0 has {rows} rows but the start state has {rows_of}. "
                                 "HINT: pass the state prefilled for exactly these rows.")
        load_state(self.static_state, state, type(self.model).__name__)
        self.static_input[:rows].copy_(x0)
        self.static_input[rows:].zero_()
        if self.static_dt is not None:
            self.static_dt.fill_(PAD_DT)
        for start in range(0, num_steps, self.chunk):
            steps = min(self.chunk, num_steps - start)
            if dt_steps is not None:
                self.static_dt[:rows, :steps].copy_(dt_steps[:, start:start + steps])
            self.replay()
            out[:, start:start + steps].copy_(self.static_output[:rows, :steps])

    def release(self) -> None:
        """Free the graph, its memory pool and the static buffers; the graph cannot run afterwards."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self.pool = None
        self.static_input = self.static_output = self.static_dt = None
        self.static_state = {}
        self._step = None
        if self.captured and torch.cuda.is_available():
            # a freed graph pool's blocks go back to the driver only through empty_cache;
            # without it every re-capture would add a new pool to memory_reserved
            torch.cuda.empty_cache()


def _step_function(model: nn.Module, device_type: str, autocast_dtype: torch.dtype | None,
                   compile: bool) -> StepFunction:
    """`model.step` under the graph's autocast, optionally compiled.

    One step is compiled, not the unrolled K-step body: compile time of the unrolled body
    grows with K x layers (75 s for a 4-layer Mamba at K=16 on an H100), while inductor's
    fusion happens within a step anyway. A closure, not a method, so nothing holds the StepGraph.
    """

    def step(x: Tensor, state: State, dt_t: Tensor | None) -> Tensor:
        with autocast_context(device_type, autocast_dtype):
            return model.step(x, state, dt_t)

    if not compile:
        return step
    step_ops.preload()  # import the step kernel before tracing: an import inside the trace would break the graph
    return torch.compile(step, dynamic=False)
