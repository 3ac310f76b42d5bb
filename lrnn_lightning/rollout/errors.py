"""Errors of the rollout engine that are not bad arguments (those raise ValueError)."""

from __future__ import annotations


class CaptureError(RuntimeError):
    """Capturing a model's steps as a CUDA graph failed (uncapturable op, out of memory)."""


class StaleGraphError(RuntimeError):
    """A captured graph would read memory the model no longer uses (a parameter was replaced)."""
