"""Rollout error as a function of the horizon, for a model and for the persistence baseline.

All curves are indexed by the horizon step k = 1..T (index k - 1): how far past the end
of the context the prediction is. The normalised RMSE divides each channel's error by
that channel's standard deviation over the truth, so 1.0 means "as bad as predicting the
mean" and channels of different scales count alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HorizonErrors:
    """Error curves of shape (T,), averaged over sequences and channels."""

    mse: Tensor
    mae: Tensor
    nrmse: Tensor

    def mean(self) -> dict[str, float]:
        """Each curve averaged over the horizon."""
        return {"mse": float(self.mse.mean()), "mae": float(self.mae.mean()), "nrmse": float(self.nrmse.mean())}


def persistence_forecast(context: Tensor, horizon: int) -> Tensor:
    """The do-nothing forecast: the last context value (B, C, H) repeated -> (B, horizon, H)."""
    return context[:, -1:].expand(-1, horizon, -1)


def channel_scale(truth: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-channel standard deviation of (B, L, H) over batch and time -> (H,); 1 for a channel whose
    deviation is at most `eps` (`constant_channels`).

    A floor like eps itself would make any error on a channel that does not move in these windows (a flag
    that stays 0 after the split) count as millions of scales: every rollout would look diverged. The
    datamodules normalise each channel to unit deviation over training, so 1 is the data's own unit.
    """
    std = _channel_std(truth)
    return torch.where(std > eps, std, torch.ones_like(std))


def constant_channels(truth: Tensor, eps: float = 1e-8) -> list[int]:
    """The channels of (B, L, H) whose deviation over batch and time is at most `eps` (`channel_scale` gives
    them scale 1)."""
    return torch.nonzero(_channel_std(truth) <= eps).flatten().tolist()


def _channel_std(truth: Tensor) -> Tensor:
    return truth.detach().double().reshape(-1, truth.shape[-1]).std(dim=0, unbiased=False)


def horizon_errors(prediction: Tensor, truth: Tensor, scale: Tensor | None = None) -> HorizonErrors:
    """MSE, MAE and normalised RMSE per horizon step.

    Args:
        prediction: (B, T, H) forecast.
        truth: (B, T, H) what happened.
        scale: (H,) per-channel scale for the normalised RMSE; the truth's own by default.

    Returns:
        `HorizonErrors` of curves (T,), in float64 on the inputs' device.

    Example:
        >>> errors = horizon_errors(model_out, future, channel_scale(torch.cat([context, future], 1)))
        >>> errors.nrmse[0]   # the error one step past the context
    """
    if prediction.shape != truth.shape or prediction.dim() != 3:
        raise ValueError(f"horizon_errors: prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} "
                         "must have the same shape (B, T, H).")
    error = prediction.detach().double() - truth.detach().double()
    scale = channel_scale(truth) if scale is None else scale.detach().double().to(error.device)
    return HorizonErrors(
        mse=error.pow(2).mean(dim=(0, 2)),
        mae=error.abs().mean(dim=(0, 2)),
        nrmse=(error / scale).pow(2).mean(dim=(0, 2)).sqrt(),
    )


def per_sequence_nrmse(prediction: Tensor, truth: Tensor, scale: Tensor) -> Tensor:
    """Normalised RMSE curve of each sequence: (B, T, H) -> (B, T)."""
    error = (prediction.detach().double() - truth.detach().double()) / scale.detach().double().to(truth.device)
    return error.pow(2).mean(dim=2).sqrt()


def valid_prediction_steps(nrmse: Tensor, threshold: float) -> Tensor:
    """Steps before the normalised error first exceeds `threshold` ("valid prediction time").

    `nrmse` is one curve (T,) or a batch of curves (..., T); the result has the leading
    shape and counts whole steps: 0 if the first step already fails, T if none does. A NaN
    step fails.
    """
    exceeded = ~(nrmse <= threshold)  # NaN compares false either way: it counts as exceeded
    first = torch.where(exceeded.any(dim=-1), exceeded.float().argmax(dim=-1),
                        torch.full(exceeded.shape[:-1], nrmse.shape[-1], device=nrmse.device))
    return first.long()


# -- sums that processes add up, and rollouts that blow up ----------------------------------------

def divergence_steps(prediction: Tensor, truth: Tensor, scale: Tensor, limit: float) -> Tensor:
    """The horizon step (0-based) at which each sequence diverged; T where it never did.

    A sequence diverges at the first step where any channel is NaN or infinite, or is
    more than `limit` channel scales away from the truth.

    Args:
        prediction: (B, T, H) forecast.
        truth: (B, T, H) what happened (finite).
        scale: (H,) per-channel scale, e.g. `channel_scale`.
        limit: normalised error beyond which a value counts as exploded.

    Returns:
        (B,) long tensor; T means "did not diverge within the horizon".
    """
    error = (prediction.detach().double() - truth.detach().double()) / scale.detach().double().to(truth.device)
    bad = (~torch.isfinite(error) | (error.abs() > limit)).any(dim=2)  # (B, T)
    steps = torch.full(bad.shape[:1], bad.shape[1], dtype=torch.long, device=bad.device)
    return torch.where(bad.any(dim=1), bad.long().argmax(dim=1), steps)


def capped_error(prediction: Tensor, truth: Tensor, scale: Tensor, diverged_at: Tensor, limit: float) -> Tensor:
    """prediction - truth in float64, with every step from a sequence's divergence on set to `limit` scales.

    This keeps the errors of a rollout that blew up finite and comparable: a diverged step
    counts as `limit` standard deviations off on every channel, however far it flew.

    Returns:
        (B, T, H) float64.
    """
    error = prediction.detach().double() - truth.detach().double()
    steps = torch.arange(error.shape[1], device=error.device)
    after = (steps[None, :] >= diverged_at.to(error.device)[:, None])[..., None]  # (B, T, 1)
    cap = (limit * scale.detach().double().to(error.device)).expand_as(error)
    return torch.where(after, cap, error)


@dataclass(frozen=True)
class HorizonSums:
    """Error sums per horizon step over sequences and channels, which processes can add up.

    Averaging per-process averages is wrong when processes hold different numbers of
    sequences; adding these sums and dividing once is exact.

    Attributes:
        squared: (T,) sum of e^2.
        absolute: (T,) sum of |e|.
        normalised: (T,) sum of (e / scale)^2.
        diverged_at: (T,) sequences whose divergence began at each step.
        count: sequences summed.
        channels: H.
    """

    squared: Tensor
    absolute: Tensor
    normalised: Tensor
    diverged_at: Tensor
    count: float
    channels: int

    def to_vector(self) -> Tensor:
        """The sums as one float64 vector of length 4 T + 1 (for a single all-reduce)."""
        count = self.squared.new_tensor([self.count])
        return torch.cat([self.squared, self.absolute, self.normalised, self.diverged_at.double(), count])

    @classmethod
    def from_vector(cls, vector: Tensor, channels: int) -> HorizonSums:
        """Inverse of `to_vector`."""
        horizon = (vector.numel() - 1) // 4
        squared, absolute, normalised, diverged_at = vector[:4 * horizon].reshape(4, horizon)
        return cls(squared, absolute, normalised, diverged_at, float(vector[-1]), channels)

    def errors(self) -> HorizonErrors:
        """Mean curves over the summed sequences and channels (zeros when nothing was summed)."""
        values = max(self.count, 1.0) * self.channels
        return HorizonErrors(mse=self.squared / values, mae=self.absolute / values,
                             nrmse=(self.normalised / values).sqrt())

    @property
    def diverged(self) -> int:
        """Sequences that diverged within the horizon."""
        return int(round(float(self.diverged_at.sum())))

    @property
    def first_diverged_step(self) -> int:
        """The earliest step (0-based) at which any sequence diverged; T when none did."""
        hits = torch.nonzero(self.diverged_at > 0)
        return int(hits[0, 0]) if hits.numel() else int(self.diverged_at.numel())


def horizon_sums(error: Tensor, scale: Tensor, diverged_at: Tensor, weight: Tensor | None = None) -> HorizonSums:
    """Sum errors (B, T, H) per horizon step, each sequence counted with its weight (0 or 1).

    Args:
        error: (B, T, H) forecast minus truth, e.g. from `capped_error`.
        scale: (H,) per-channel scale of the normalised error.
        diverged_at: (B,) from `divergence_steps`.
        weight: (B,) 1 for sequences to count, 0 for padding; all ones by default.

    Example:
        >>> sums = horizon_sums(capped_error(pred, truth, scale, at, 100.0), scale, at)
        >>> sums.errors().nrmse   # == horizon_errors(pred, truth, scale).nrmse when nothing diverged
    """
    error = error.detach().double()
    batch, horizon, channels = error.shape
    weight = error.new_ones(batch) if weight is None else weight.detach().double().to(error.device)
    w = weight[:, None, None]
    normalised = error / scale.detach().double().to(error.device)
    steps = diverged_at.to(error.device)
    diverged = torch.zeros(horizon + 1, dtype=torch.float64, device=error.device).index_add_(0, steps, weight)
    return HorizonSums(
        squared=(w * error.pow(2)).sum(dim=(0, 2)),
        absolute=(w * error.abs()).sum(dim=(0, 2)),
        normalised=(w * normalised.pow(2)).sum(dim=(0, 2)),
        diverged_at=diverged[:horizon],
        count=float(weight.sum()),
        channels=channels,
    )
