"""Horizon metrics: known values on signals where the answer is known in closed form."""

from __future__ import annotations

import pytest
import torch

from lrnn_lightning.rollout.metrics import (
    channel_scale,
    horizon_errors,
    per_sequence_nrmse,
    persistence_forecast,
    valid_prediction_steps,
)


def test_persistence_on_a_ramp_errs_by_slope_times_horizon():
    slope = torch.tensor([0.3, -2.0])
    t = torch.arange(40, dtype=torch.float64)
    series = (t[:, None] * slope + torch.randn(2, dtype=torch.float64)).expand(3, -1, -1)  # (3, 40, 2)
    context, future = series[:, :30], series[:, 30:]
    guess = persistence_forecast(context, 10)
    assert guess.shape == (3, 10, 2)
    errors = horizon_errors(guess, future, scale=torch.ones(2))
    k = torch.arange(1, 11, dtype=torch.float64)
    torch.testing.assert_close(errors.mse, (k[:, None] * slope.double()).pow(2).mean(dim=1))
    torch.testing.assert_close(errors.mae, (k[:, None] * slope.double()).abs().mean(dim=1))


def test_nrmse_weighs_channels_by_their_scale():
    truth = torch.randn(4, 6, 2) * torch.tensor([1.0, 100.0])
    noise = torch.randn(4, 6, 2)
    prediction = truth + noise * torch.tensor([0.1, 10.0])  # the same relative error on both channels
    scale = torch.tensor([1.0, 100.0])
    errors = horizon_errors(prediction, truth, scale)
    expected = ((noise * 0.1).pow(2).mean(dim=(0, 2))).sqrt().double()
    torch.testing.assert_close(errors.nrmse, expected)
    per_seq = per_sequence_nrmse(prediction, truth, scale)
    assert per_seq.shape == (4, 6)
    torch.testing.assert_close(per_seq.pow(2).mean(0).sqrt(), errors.nrmse)
    torch.testing.assert_close(channel_scale(truth), truth.double().reshape(-1, 2).std(0, unbiased=False))


def test_valid_prediction_steps_counts_the_steps_before_the_threshold():
    curves = torch.tensor([[0.1, 0.2, 0.6, 0.3],    # fails at step 3 -> 2 valid
                           [0.7, 0.1, 0.1, 0.1],    # fails at once -> 0
                           [0.1, 0.1, 0.1, 0.5]])   # never exceeds (0.5 is not above 0.5) -> 4
    assert valid_prediction_steps(curves, 0.5).tolist() == [2, 0, 4]
    assert int(valid_prediction_steps(curves[0], 0.5)) == 2


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"prediction \(2, 5, 3\) and truth \(2, 4, 3\) must have the same shape"):
        horizon_errors(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3))
