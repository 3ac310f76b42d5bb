"""Errors of the rollout engine that are not bad arguments (those raise ValueError)."""

from __future__ import annotations

import torch


class CaptureError(RuntimeError):
    """Capturing a model's steps as a CUDA graph failed (uncapturable op, out of memory)."""


class StaleGraphError(RuntimeError):
    """A captured graph would read memory the model no longer uses (a parameter was replaced)."""


def describe_capture_failure(error: Exception, owner: str, batch_size: int, chunk: int, width: int) -> str:
    """One message for a failed capture: what was captured, why it failed, and what to do."""
    text = str(error).strip()
    reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (f"{owner}: out of GPU memory while capturing the rollout graph for batch_size={batch_size} "
                f"(chunk={chunk}, width={width}) ({reason}). HINT: pass a smaller batch_size; larger batches "
                "are then split into slices of that size.")
    return (f"{owner}: capturing the rollout graph for batch_size={batch_size} failed ({reason}). HINT: `step` "
            "must be capturable: no .item(), no host synchronisation, no data-dependent shapes; or use the "
            "plain loop (RolloutEngine(on_capture_error='fallback') or cuda_graph=False).")
