"""`RolloutEngine`: prefill a context, then roll a model out autoregressively, through a CUDA graph when it can
(or the fused Triton kernel, when asked for).

What one rollout computes (every path, the same numbers up to fp32 rounding):

    y_ctx, state = model.prefill(context, dt[:, :C])          # parallel over the context
    out[:, 0]    = y_ctx[:, -1]                                 # prediction of the step after the context
    out[:, k]    = model.step(out[:, k - 1], state, dt[:, C + k - 1])   for k = 1 .. horizon - 1

so `model.forward(cat([context, out[:, :-1]], 1), dt[:, :-1])[:, C - 1:]` reproduces `out`.
dt[:, t] is the timestep that goes with input position t; its last column is not consumed.

The graph path captures `chunk` steps per CUDA graph (`StepGraph`), once per (batch size,
dtype, device, width) for the engine's event mode, chunk, compile and autocast settings,
and re-uses it across rollouts: the graph reads live weights, so optimizer steps and
in-place checkpoint loads need no re-capture. A replaced parameter (`.to()`,
`load_state_dict(assign=True)`) is detected by fingerprint and triggers a re-capture.

The fused path (`fused=True` or "auto", `lrnn_lightning.rollout.fused`) prefills in PyTorch and
runs every step in one Triton launch that packs the live weights each time; from the second
rollout of a shape on, packing and launch replay as one CUDA graph (`fused.call_graph`). Nothing
to pad or split. `next_backend` picks the path of each rollout and says why (`stats.backend_reason`): the fused
half of `choose_backend` (`choose_fused`), then the graph or the loop as this engine's capture state allows.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lrnn_lightning.rollout.checks import (
    check_context,
    check_horizon,
    check_positive_int,
    check_rollout_dt,
    check_step_model,
    feature_size,
    model_device_dtype,
)
from lrnn_lightning.rollout.errors import CaptureError, StaleGraphError, describe_capture_failure
from lrnn_lightning.rollout.fingerprint import model_signature
from lrnn_lightning.rollout.fused import FusedKernelError, fused_steps
from lrnn_lightning.rollout.fused.call_graph import release_calls
from lrnn_lightning.rollout.fused.config import processor_count
from lrnn_lightning.rollout.fused.launch import PRECISIONS
from lrnn_lightning.rollout.fused.pack_graph import release_packing
from lrnn_lightning.rollout.fused.selection import BackendChoice, FusedChoice, choose_fused, graph_or_loop
from lrnn_lightning.rollout.inference import AUTOCAST_DTYPES, matmul_tf32_enabled, rollout_mode
from lrnn_lightning.rollout.loop import prefill_context, rollout_loop
from lrnn_lightning.rollout.step_graph import StepGraph

OWNER = "RolloutEngine"


@dataclass
class RolloutStats:
    """What the engine did, for logging.

    Attributes:
        path: "fused", "graph" or "loop", the path of the last rollout.
        compiled: whether the last rollout ran a torch.compile'd step body.
        capture_ms: wall time of the last capture (warm-up and compilation included); graph path only.
        num_captures: step graphs captured by this engine so far (the fused path's call graphs not counted).
        steps_per_second: last rollout, batch rows x horizon / seconds (prefill included; the graph path's
            capture excluded, while a fused rollout's Triton compile (first of a shape) and call capture
            (second, `fused.call_graph`) are included).
        fallback_reason: why capture failed (on_capture_error="fallback" made the engine use the loop), or
            why the fused kernel failed (fused="auto" made the engine use the graph or the loop).
        backend_reason: why the last rollout took `path` (`RolloutEngine.next_backend`'s reason, plus a capture
            failure during that rollout).
    """

    path: str = "loop"
    compiled: bool = False
    capture_ms: float = 0.0
    num_captures: int = 0
    steps_per_second: float = 0.0
    fallback_reason: str | None = None
    backend_reason: str | None = None


class RolloutEngine:
    """Autoregressive rollouts of a step-protocol model, by the fused Triton kernel, CUDA-graph replay or a plain loop.

    Args:
        model: implements the step protocol (`allocate_state`, `step`, `prefill`) with
            d_input == d_output; wrap lrnnx models in `LrnnxAdapter`.
        batch_size: rows of the captured graph; smaller batches are padded, larger ones
            split. None: sized by the first rollout, re-captured if a later one is larger.
        chunk: steps per graph replay (K).
        cuda_graph: "auto" (graph when the model is on a GPU), True (require it) or False (loop).
        compile: run each step of the K-step body through torch.compile before capture, to fuse
            its kernels (graph path only; one step is compiled, see step_graph._step_function).
        event_mode: every rollout takes per-step timesteps dt of shape (B, C + horizon).
        autocast_dtype: torch.bfloat16 / torch.float16 to run under autocast (weights stay in
            their dtype and are cast inside each step), or None for full precision.
        on_capture_error: "raise" (CaptureError) or "fallback" (warn once, then use the loop
            until `release()`).
        on_stale: when a parameter or buffer was replaced since capture: "recapture" or "raise"
            (StaleGraphError).
        n_warmups: eager runs before each capture.
        tf32: run float32 matmuls on TF32 tensor cores during rollouts (True), forbid it
            (False), or keep the global setting (None). Small-batch float32 matmuls are
            several times faster on TF32 (see experiments/RESULTS.md), at about 1e-3
            relative error per matmul; the graph and the loop path make the same choice,
            and so does the fused path unless `fused_precision` is given.
        fused: run the whole rollout as one Triton kernel (`lrnn_lightning.rollout.fused`):
            False (never), True (require it: a ValueError naming the reason when the kernel
            does not cover the model or cannot run where it lives; `FusedKernelError` when
            it fails), or "auto" (fused for a covered model on a CUDA GPU with Triton, else
            the graph or the loop as `cuda_graph` says; a kernel failure warns once and the
            engine keeps the graph path until `release()`). Not always faster than the graph
            (see experiments/RESULTS.md). batch_size, chunk, compile and on_capture_error
            concern the graph path only; autocast_dtype=torch.bfloat16 runs the kernel on
            bf16 weights (float16 is not covered: "auto" falls back, True raises).
        fused_precision: the kernel's dot precision for float32 weights: "ieee" (exact fp32),
            "tf32x3" (tensor cores, about fp32 accuracy) or "tf32" (~1e-3); None follows the
            TF32 choice of the rollout ("tf32" when float32 matmuls run on TF32, else "ieee").

    Example:
        >>> engine = RolloutEngine(model.cuda(), batch_size=64, chunk=16)
        >>> future = engine.rollout(context, horizon=200)      # (B, 200, H)
        >>> engine.stats.path, engine.stats.steps_per_second
        >>> engine.release()
        >>> fused = RolloutEngine(model.cuda(), fused="auto")
        >>> future = fused.rollout(context, horizon=200)
        >>> fused.stats.path, fused.stats.backend_reason      # ('fused', 'fused=auto: lru x 4 layers covered; ...')
    """

    def __init__(self, model: nn.Module, *, batch_size: int | None = None, chunk: int = 16,
                 cuda_graph: bool | str = "auto", compile: bool = False, event_mode: bool = False,
                 autocast_dtype: torch.dtype | None = None, on_capture_error: str = "raise",
                 on_stale: str = "recapture", n_warmups: int = 3, tf32: bool | None = None,
                 fused: bool | str = False, fused_precision: str | None = None):
        check_step_model(model, OWNER)
        feature_size(model, OWNER)
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size", OWNER, hint="or None to size the graph by the first rollout.")
        check_positive_int(chunk, "chunk", OWNER, hint="the number of steps per graph replay, e.g. 16.")
        if cuda_graph not in (True, False, "auto"):
            raise ValueError(f"{OWNER}: cuda_graph must be True, False or 'auto', got {cuda_graph!r}.")
        if autocast_dtype not in (None, *AUTOCAST_DTYPES):
            raise ValueError(f"{OWNER}: autocast_dtype must be None, torch.bfloat16 or torch.float16, got "
                             f"{autocast_dtype!r}. HINT: keep the weights in float32 and pick the compute dtype here.")
        for name, value, allowed in (("on_capture_error", on_capture_error, ("raise", "fallback")),
                                     ("on_stale", on_stale, ("recapture", "raise"))):
            if value not in allowed:
                raise ValueError(f"{OWNER}: {name} must be one of {allowed}, got {value!r}.")
        if not (fused is True or fused is False or (isinstance(fused, str) and fused == "auto")):
            raise ValueError(f"{OWNER}: fused must be True, False or 'auto', got {fused!r}. HINT: 'auto' runs the "
                             "fused kernel where it covers the model on a GPU, else the graph or the loop.")
        if fused_precision is not None and fused_precision not in PRECISIONS:
            raise ValueError(f"{OWNER}: fused_precision must be None or one of {PRECISIONS}, got "
                             f"{fused_precision!r}. HINT: None follows the tf32 choice; 'ieee' is exact fp32.")
        self.model, self.batch_size, self.chunk = model, batch_size, chunk
        for name, value in (("event_mode", event_mode), ("compile", compile)):
            if not isinstance(value, bool):
                raise ValueError(f"{OWNER}: {name} must be True or False, got {value!r}.")
        if tf32 is not None and not isinstance(tf32, bool):
            raise ValueError(f"{OWNER}: tf32 must be True, False or None (keep the global setting), got {tf32!r}.")
        self.cuda_graph, self.compile, self.event_mode = cuda_graph, compile, event_mode
        self.autocast_dtype, self.on_capture_error, self.on_stale = autocast_dtype, on_capture_error, on_stale
        self.n_warmups, self.tf32 = n_warmups, tf32
        self.fused, self.fused_precision = fused, fused_precision
        # the kernel's matmul weights follow the autocast dtype (float16 is not covered)
        self.fused_weight_dtype = autocast_dtype
        self.stats = RolloutStats()
        self._graph: StepGraph | None = None
        self._fell_back = False
        self._fused_failed = False
        device = model_device_dtype(model, torch.empty(0))[0]
        if cuda_graph is True:
            self._graph_wanted(device)
        if fused is True:
            self._choose_fused(device)

    def rollout(self, context: Tensor, horizon: int, dt: Tensor | None = None) -> Tensor:
        """Prefill `context`, then predict `horizon` steps autoregressively.

        Args:
            context: (B, C, H) on the model's device, in the model's dtype, C >= 1.
            horizon: number of predicted steps, >= 1.
            dt: event timesteps (B, C + horizon), positive and finite, required exactly in
                event mode; dt[:, t] goes with input position t, the last column is not consumed.

        Returns:
            (B, horizon, H): out[:, 0] is the prediction after the context, out[:, k] the
            model's step on out[:, k - 1].
        """
        owner = f"{OWNER}.rollout"
        width = feature_size(self.model, owner)
        batch, context_len, width = check_context(context, width, self.model, owner)
        horizon = check_horizon(horizon, owner)
        check_rollout_dt(dt, batch, context_len + horizon, self.event_mode, context.device, owner)
        dt = None if dt is None else dt.to(context.dtype)  # every path sees the same timesteps

        with rollout_mode(self.model, context.device.type, self.autocast_dtype, self.tf32):
            # one walk over the model serves the backend choice and the fused call (prefill changes no tensor)
            signature = None if self.fused is False else model_signature(self.model)
            backend, reason = self._next_backend(context.device, batch, signature)
            out, graph = None, None
            if backend == "fused":
                start = time.perf_counter()
                out = self._rollout_fused(context, horizon, dt, signature)
                if out is None:  # fused="auto" and the kernel failed: the graph or the loop from now on
                    backend, reason = self.next_backend(context.device, batch)
            if out is None:
                if backend == "graph":
                    graph = self._ready_graph(batch, width, context.dtype, context.device)
                    if graph is None:
                        backend, reason = "loop", f"{reason}; the capture failed, so the plain step loop"
                start = time.perf_counter()
                if graph is None:
                    out = rollout_loop(self.model, context, horizon, dt)
                else:
                    out = self._rollout_on_graph(graph, context, horizon, dt)
        if context.device.type == "cuda":
            torch.cuda.synchronize(context.device)
        seconds = time.perf_counter() - start

        self.stats.path, self.stats.backend_reason = backend, reason
        self.stats.compiled = graph is not None and graph.compiled
        if backend == "fused":
            # not measured: Triton compiles inside the first rollout of a shape and its call graph is captured
            # inside the second (fused.call_graph), so those two rollouts' steps_per_second include them
            self.stats.capture_ms = 0.0
        self.stats.steps_per_second = batch * horizon / max(seconds, 1e-9)
        return out

    def release(self) -> None:
        """Free the captured graph and its memory pool and the fused backend's captured weight packing and
        calls (`fused.pack_graph`, `fused.call_graph`); the next rollout captures again (and a fused="auto"
        engine whose kernel failed tries the kernel again)."""
        if self._graph is not None:
            self._graph.release()
            self._graph = None
        release_packing(self.model)
        release_calls(self.model)
        self._fell_back = False
        self._fused_failed = False

    # -- path choice -------------------------------------------------------------------------

    def next_backend(self, device: torch.device, batch: int | None = None) -> BackendChoice:
        """The backend ("fused", "graph" or "loop") and the reason of the next rollout of `batch` rows (None: not
        known) on `device`: what `stats.path` and `stats.backend_reason` will say unless that rollout falls
        back. Raises where a required backend (fused=True, cuda_graph=True) cannot run."""
        return self._next_backend(device, batch, None)

    def _next_backend(self, device: torch.device, batch: int | None, signature: tuple | None) -> BackendChoice:
        use_graph = self._graph_wanted(device)  # raises when cuda_graph=True cannot be honoured
        fused = self._choose_fused(device, batch, signature)
        if fused.fused:
            return BackendChoice("fused", fused.reason)
        return graph_or_loop(fused.reason, device, self.cuda_graph, use_graph=use_graph, graph_failed=self._fell_back)

    def _choose_fused(self, device: torch.device, batch: int | None = None,
                      signature: tuple | None = None) -> FusedChoice:
        """Whether this rollout (of `batch` rows, if known) takes the fused kernel (one `fused_support` call);
        raises, naming the reason, when fused=True cannot be honoured for the model where it lives now."""
        if self._fused_failed:  # only under fused="auto": fused=True re-raises the kernel's failure
            return FusedChoice(False, "fused=auto, not fused: the kernel failed earlier (see stats.fallback_reason)",
                               None)
        on_gpu = device.type == "cuda" and torch.cuda.is_available()
        choice = choose_fused(self.model, self.fused, self.fused_weight_dtype, on_gpu, batch,
                              processor_count(device) if on_gpu else None, signature=signature)
        if self.fused is True and choice.refusal is not None:
            raise ValueError(f"{OWNER}: fused=True, but the fused kernel cannot run this model: {choice.refusal}. "
                             "HINT: fused='auto' (generation.fused=auto) falls back to the CUDA graph or the step "
                             "loop; fused_support(model) says what the kernel covers.")
        return choice

    # -- fused path ------------------------------------------------------------------------

    def _rollout_fused(self, context: Tensor, horizon: int, dt: Tensor | None,
                       signature: tuple | None = None) -> Tensor | None:
        """Prefill in PyTorch, then every step in one kernel launch; None when fused="auto" and the kernel failed."""
        first, state, dt_steps = prefill_context(self.model, context, horizon, dt)
        precision = self.fused_precision or ("tf32" if matmul_tf32_enabled() else "ieee")
        try:
            # the kernel packs the live weights itself: no autocast around that (its dtype is fused_weight_dtype)
            with torch.autocast(context.device.type, enabled=False):
                rest = fused_steps(self.model, first, state, horizon - 1, dt_steps,
                                   weight_dtype=self.fused_weight_dtype, precision=precision, signature=signature)
        except FusedKernelError as error:
            if self.fused is True:
                raise
            message = f"{OWNER}: fused='auto', but the fused kernel failed: {error}"
            warnings.warn(f"{message} Falling back to the CUDA graph (or the step loop) for this engine until "
                          "release().", RuntimeWarning, stacklevel=3)
            self._fused_failed = True
            self.stats.fallback_reason = message
            return None
        return torch.cat([first.unsqueeze(1), rest], dim=1)

    # -- graph path ------------------------------------------------------------------------

    def _rollout_on_graph(self, graph: StepGraph, context: Tensor, horizon: int, dt: Tensor | None) -> Tensor:
        batch, context_len, width = context.shape
        out = torch.empty(batch, horizon, width, device=context.device, dtype=context.dtype)
        for start in range(0, batch, graph.batch_size):
            rows = slice(start, start + graph.batch_size)
            dt_rows = None if dt is None else dt[rows]
            first, state, dt_steps = prefill_context(self.model, context[rows], horizon, dt_rows)
            out[rows, 0] = first
            graph.run(first, horizon - 1, out[rows, 1:], state=state, dt_steps=dt_steps)
        return out

    def _graph_wanted(self, device: torch.device) -> bool:
        """Whether this rollout takes the graph path (raises if cuda_graph=True cannot be honoured)."""
        on_gpu = device.type == "cuda" and torch.cuda.is_available()
        if self.cuda_graph is True and not on_gpu:
            raise ValueError(f"{OWNER}: cuda_graph=True needs the model on a CUDA GPU, but it is on {device}"
                             f"{'' if torch.cuda.is_available() else ' and CUDA is not available'}. "
                             "HINT: set cuda_graph='auto' or False, or move the model to a GPU.")
        return on_gpu and self.cuda_graph is not False and not self._fell_back

    def _ready_graph(self, batch: int, width: int, dtype: torch.dtype, device: torch.device) -> StepGraph | None:
        """The graph for this rollout: the current one if still valid, else a fresh capture (None: fell back)."""
        current = self._graph
        capacity = self.batch_size or max(batch, current.batch_size if current is not None else 0)
        if current is not None:
            change = current.stale_reason()
            if change is not None and self.on_stale == "raise":
                raise StaleGraphError(
                    f"{OWNER}: the captured graph would read memory the model no longer uses: {change}. "
                    "HINT: create the engine with on_stale='recapture', or call engine.release() after replacing "
                    "parameters; in-place updates (optimizer steps, load_state_dict without assign) need neither."
                )
            wanted = (capacity, width, dtype, device, matmul_tf32_enabled())
            if change is None and (current.batch_size, current.width, current.dtype, current.device,
                                   current.tf32) == wanted:
                return current
            self.release()
        return self._capture(capacity, width, dtype, device)

    def _capture(self, capacity: int, width: int, dtype: torch.dtype, device: torch.device) -> StepGraph | None:
        try:
            graph = self._make_graph(self.model, capacity, width, chunk=self.chunk, event_mode=self.event_mode,
                                     dtype=dtype, device=device, compile=self.compile,
                                     autocast_dtype=self.autocast_dtype, n_warmups=self.n_warmups)
        except Exception as error:
            message = describe_capture_failure(error, OWNER, capacity, self.chunk, width)
            if self.on_capture_error == "raise":
                raise CaptureError(message) from error
            warnings.warn(f"{message} Falling back to the plain step loop for this engine.", RuntimeWarning,
                          stacklevel=3)
            self._fell_back = True
            self.stats.fallback_reason = message
            return None
        self._graph = graph
        self.stats.num_captures += 1
        self.stats.capture_ms = graph.capture_ms
        return graph

    def _make_graph(self, model: nn.Module, batch_size: int, width: int, **options: Any) -> StepGraph:
        """Build a captured StepGraph (a hook: tests substitute an eager StepGraph to run this path on the CPU)."""
        return StepGraph(model, batch_size, width, **options)


def rollout(model: nn.Module, context: Tensor, horizon: int, dt: Tensor | None = None, *,
            engine: RolloutEngine | None = None, **engine_kwargs: Any) -> Tensor:
    """Functional form of `RolloutEngine.rollout`: (B, C, H) context -> (B, horizon, H).

    Without `engine`, a temporary engine is built from `engine_kwargs` (event_mode defaults
    to whether dt is given) and released afterwards; pass a long-lived engine to reuse its
    captured graph across calls.

    Example:
        >>> future = rollout(model, context, horizon=50)
        >>> future = rollout(model, context, 50, dt, engine=engine)
    """
    if engine is not None:
        if engine_kwargs:
            raise ValueError(f"rollout: got an engine and engine options {sorted(engine_kwargs)}. "
                             "HINT: set the options when creating the engine.")
        if engine.model is not model:
            raise ValueError("rollout: the engine was created for a different model. "
                             "HINT: RolloutEngine(model) for this model, or call engine.rollout directly.")
        return engine.rollout(context, horizon, dt)
    engine_kwargs.setdefault("event_mode", dt is not None)
    temporary = RolloutEngine(model, **engine_kwargs)
    try:
        return temporary.rollout(context, horizon, dt)
    finally:
        temporary.release()
