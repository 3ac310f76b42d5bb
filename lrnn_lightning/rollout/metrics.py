"""Rollout error as a function of the horizon, for a model and for the persistence baseline.

All curves are indexed by the horizon step k = 1..T (index k - 1): how far past the end
of the context the prediction is. The normalised RMSE divides each channel's error by
that channel's variance over the truth, so 1.0 means "as bad as predicting the mean" and
channels of different scales count alike.
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
    """Per-channel standard deviation of (B, L, H) over batch and time -> (H,), floored at `eps`."""
    flat = truth.detach().double().reshape(-1, truth.shape[-1])
    return flat.std(dim=0, unbiased=False).clamp_min(eps)


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
    shape and counts whole steps: 0 if the first step already fails, T if none does.
    """
    exceeded = nrmse > threshold
    first = torch.where(exceeded.any(dim=-1), exceeded.float().argmax(dim=-1),
                        torch.full(exceeded.shape[:-1], nrmse.shape[-1], device=nrmse.device))
    return first.long()
