"""What one validation's rollout measured, and how a process's share of it is scored.

A process scores the rows it rolled out into sums (`HorizonSums`, model and persistence
baseline) and a few numbers per sequence; the callback adds the sums over processes and
gathers the per-sequence numbers, and `RolloutResult` divides once. With one process the
collectives are the identity, so one process and many give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lrnn_lightning.rollout import RolloutStats
from lrnn_lightning.rollout.metrics import (
    HorizonErrors,
    HorizonSums,
    capped_error,
    divergence_steps,
    horizon_sums,
    persistence_forecast,
    valid_prediction_steps,
)

PATHS = ("loop", "graph", "fused")  # RolloutStats.path, coded by position in a gathered report
MIXED = "mixed"  # the run's path when processes took different ones
# what `RolloutResult.scalars` logs, after "<prefix>/": known before any rollout, so a run can check what it monitors
SCALAR_NAMES = ("mse", "mae", "nrmse", "persistence_mse", "persistence_mae", "persistence_nrmse", "nrmse_final",
                "skill", "valid_steps", "persistence_valid_steps", "diverged_fraction", "first_diverged_step",
                "steps_per_second", "capture_ms", *(f"uses_{path}" for path in PATHS))


@dataclass(frozen=True)
class RankReport:
    """What one process rolled out, where and how (the evidence that every process took part)."""

    rank: int
    device: str
    sequences: int
    path: str
    capture_ms: float
    steps_per_second: float

    @staticmethod
    def vector(device: torch.device, sequences: int, stats: RolloutStats, steps_per_second: float) -> Tensor:
        """This process's report as a float64 vector (for gathering): device index (-1: CPU), sequences,
        path (0 loop, 1 graph, 2 fused), capture ms, steps per second."""
        index = -1 if device.type == "cpu" else (device.index or 0)
        return torch.tensor([index, sequences, PATHS.index(stats.path), stats.capture_ms, steps_per_second],
                            dtype=torch.float64)

    @classmethod
    def from_vector(cls, rank: int, vector: Tensor, device_type: str) -> RankReport:
        index, sequences, path, capture_ms, speed = vector.tolist()
        device = "cpu" if index < 0 else f"{device_type}:{int(index)}"
        return cls(rank, device, int(sequences), PATHS[int(path)], capture_ms, speed)

    def describe(self) -> str:
        capture = f", capture {self.capture_ms:.0f} ms" if self.path == "graph" else ""
        return f"rank {self.rank} on {self.device}: {self.sequences} sequences, {self.path} path{capture}"


@dataclass(frozen=True)
class SequenceScores:
    """Per-sequence numbers over the whole subset, in the subset's order (N,) each."""

    nrmse: Tensor             # normalised RMSE averaged over the horizon
    persistence_nrmse: Tensor
    valid_steps: Tensor       # steps before the sequence's normalised RMSE first exceeds the threshold
    diverged_at: Tensor       # horizon step at which it diverged; T if it did not

    @classmethod
    def from_rows(cls, rows: Tensor) -> SequenceScores:
        """From (N, 4) float64 rows, the columns in the order of the fields."""
        return cls(rows[:, 0], rows[:, 1], rows[:, 2].long(), rows[:, 3].long())


@dataclass
class RolloutResult:
    """One validation's rollout (tensors on the CPU).

    `context`, `future`, `prediction` and `dt` hold the windows THIS process rolled out
    (positions `rows` of the subset: all of them with one process); the error curves, the
    per-sequence scores and the divergence counts cover the whole subset.
    """

    epoch: int
    indices: list[int]              # validation windows of the whole subset (N)
    rows: list[int]                 # positions in `indices` of this process's windows (n)
    context: Tensor                 # (n, C, H)
    future: Tensor                  # (n, T, H), the truth
    prediction: Tensor              # (n, T, H), the rollout
    dt: Tensor | None               # (n, C + T) in event mode
    model: HorizonErrors            # curves (T,) over the subset
    persistence: HorizonErrors      # curves (T,) of the last-context-value baseline
    sequences: SequenceScores       # (N,) each
    valid_steps: int                # of the mean curve
    persistence_valid_steps: int
    diverged: int                   # sequences that diverged (NaN/Inf or exploding)
    first_diverged_step: int        # earliest diverged horizon step (0-based); T if none diverged
    ranks: list[RankReport]         # one per process
    stats: RolloutStats             # this process's engine
    seconds: float                  # this process's rollout wall time

    @property
    def diverged_fraction(self) -> float:
        return self.diverged / max(len(self.indices), 1)

    @property
    def path(self) -> str:
        """The path every process took ("fused", "graph" or "loop"), or "mixed" when they differ (`rank_paths`)."""
        paths = {report.path for report in self.ranks}
        return paths.pop() if len(paths) == 1 else MIXED

    @property
    def rank_paths(self) -> str:
        """Each process's path, e.g. "rank 0 fused, rank 1 graph"."""
        return ", ".join(f"rank {report.rank} {report.path}" for report in self.ranks)

    def describe(self, rank: int) -> str:
        """The text line of process `rank` (whose `stats` these are): what each process rolled out where, "mixed"
        with every process's path when they differ, and this process's path and why."""
        line = (f"epoch {self.epoch}, {len(self.indices)} sequences: "
                + "; ".join(report.describe() for report in self.ranks))
        if self.path == MIXED:
            line += f". Paths: {MIXED} ({self.rank_paths})"
        return line + f". Path on rank {rank}: {self.stats.path} ({self.stats.backend_reason})."

    def scalars(self, prefix: str) -> dict[str, float]:
        """The monitorable numbers, keyed `<prefix>/<name>` (the same on every process)."""
        out = {f"{prefix}/{name}": value for name, value in self.model.mean().items()}
        out.update({f"{prefix}/persistence_{name}": value for name, value in self.persistence.mean().items()})
        out[f"{prefix}/nrmse_final"] = float(self.model.nrmse[-1])
        out[f"{prefix}/skill"] = 1.0 - out[f"{prefix}/mse"] / max(out[f"{prefix}/persistence_mse"], 1e-12)
        out[f"{prefix}/valid_steps"] = float(self.valid_steps)
        out[f"{prefix}/persistence_valid_steps"] = float(self.persistence_valid_steps)
        out[f"{prefix}/diverged_fraction"] = self.diverged_fraction
        out[f"{prefix}/first_diverged_step"] = float(self.first_diverged_step)
        # processes run side by side: their speeds add up, the slowest capture is the one waited for
        out[f"{prefix}/steps_per_second"] = float(sum(r.steps_per_second for r in self.ranks))
        out[f"{prefix}/capture_ms"] = float(max(r.capture_ms for r in self.ranks))
        # 1 only when every process took that path: with "mixed" paths all three are 0
        for path in PATHS:
            out[f"{prefix}/uses_{path}"] = float(all(r.path == path for r in self.ranks))
        return out


def score_rows(context: Tensor, future: Tensor, prediction: Tensor, scale: Tensor, weight: Tensor, *,
               threshold: float, divergence_limit: float) -> tuple[Tensor, Tensor]:
    """Score one process's rows: error sums to add over processes, and per-sequence numbers to gather.

    Args:
        context: (S, C, H) the rows' contexts.
        future: (S, T, H) their truth.
        prediction: (S, T, H) their rollouts (may hold NaN/Inf).
        scale: (H,) per-channel scale of the whole subset.
        weight: (S,) 1 for rows that count, 0 for padding.
        threshold: normalised RMSE that ends the valid prediction time.
        divergence_limit: normalised error beyond which a rollout counts as diverged.

    Returns:
        (sums (8 T + 2,), per-sequence rows (S, 4) as in `SequenceScores`), float64: model and
        persistence `HorizonSums.to_vector()` one after the other.
    """
    vectors, per_sequence = [], []
    for forecast in (prediction, persistence_forecast(context, future.shape[1])):
        diverged_at = divergence_steps(forecast, future, scale, divergence_limit)
        error = capped_error(forecast, future, scale, diverged_at, divergence_limit)
        vectors.append(horizon_sums(error, scale, diverged_at, weight).to_vector())
        curves = (error / scale.double()).pow(2).mean(dim=2).sqrt()  # (S, T)
        per_sequence.append((curves, diverged_at))
    (curves, diverged_at), (persistence_curves, _) = per_sequence
    rows = torch.stack([curves.mean(dim=1), persistence_curves.mean(dim=1),
                        valid_prediction_steps(curves, threshold).double(), diverged_at.double()], dim=1)
    return torch.cat(vectors), rows


def split_sums(vector: Tensor, channels: int) -> tuple[HorizonSums, HorizonSums]:
    """Inverse of the concatenation in `score_rows`: (model, persistence)."""
    half = vector.numel() // 2
    return HorizonSums.from_vector(vector[:half], channels), HorizonSums.from_vector(vector[half:], channels)
