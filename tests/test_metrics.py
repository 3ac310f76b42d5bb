"""Horizon metrics: known values on signals where the answer is known in closed form."""

from __future__ import annotations

import pytest
import torch

from lrnn_lightning.rollout.metrics import (
    HorizonSums,
    capped_error,
    channel_scale,
    constant_channels,
    divergence_steps,
    horizon_errors,
    horizon_sums,
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


def test_a_nan_step_ends_the_valid_prediction_time():
    curves = torch.tensor([[0.1, 0.2, float("nan"), float("nan")], [float("nan"), 0.1, 0.1, 0.1]])
    assert valid_prediction_steps(curves, 0.5).tolist() == [2, 0]


def test_a_channel_that_does_not_move_is_scaled_by_one_and_a_good_forecast_does_not_diverge():
    truth = torch.randn(4, 12, 3)
    truth[..., 1] = 0.25  # e.g. a flag that stays put after the split
    prediction = truth + 1e-3 * torch.randn(4, 12, 3)
    scale = channel_scale(truth)
    assert constant_channels(truth) == [1] and float(scale[1]) == 1.0
    torch.testing.assert_close(scale[[0, 2]], truth.double()[..., [0, 2]].reshape(-1, 2).std(0, unbiased=False))
    assert divergence_steps(prediction, truth, scale, 100.0).tolist() == [12] * 4  # a 1e-8 floor: all at step 0
    assert float(horizon_errors(prediction, truth, scale).nrmse.max()) < 1e-2
    assert constant_channels(torch.randn(2, 5, 3)) == []


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match=r"prediction \(2, 5, 3\) and truth \(2, 4, 3\) must have the same shape"):
        horizon_errors(torch.zeros(2, 5, 3), torch.zeros(2, 4, 3))


def test_sums_added_over_uneven_parts_give_the_whole_batch_errors_and_padding_counts_nothing():
    truth = torch.randn(7, 5, 3) * torch.tensor([1.0, 3.0, 0.2])
    prediction = truth + torch.randn(7, 5, 3) * torch.linspace(0.1, 2.0, 7)[:, None, None]  # rows err differently
    scale = channel_scale(truth)
    at = divergence_steps(prediction, truth, scale, 100.0)
    assert at.tolist() == [5] * 7  # nothing diverged
    error = capped_error(prediction, truth, scale, at, 100.0)
    whole = horizon_errors(prediction, truth, scale)

    # two "processes" of 4 and 3 rows, the second padded to 4 with a repeated row of weight 0
    rows = [[0, 1, 2, 3], [4, 5, 6, 6]]
    weights = [torch.ones(4), torch.tensor([1.0, 1.0, 1.0, 0.0])]
    total = sum(horizon_sums(error[r], scale, at[r], w).to_vector() for r, w in zip(rows, weights, strict=True))
    combined = HorizonSums.from_vector(total, channels=3)
    assert combined.count == 7 and combined.diverged == 0 and combined.first_diverged_step == 5
    for name in ("mse", "mae", "nrmse"):
        torch.testing.assert_close(getattr(combined.errors(), name), getattr(whole, name))
    # averaging the two processes' averages would weigh the 3 rows like the 4 others
    parts = [horizon_errors(prediction[r[:n]], truth[r[:n]], scale) for r, n in zip(rows, (4, 3), strict=True)]
    assert not torch.allclose((parts[0].nrmse + parts[1].nrmse) / 2, whole.nrmse, rtol=1e-3)


def test_divergence_is_found_at_its_first_step_and_its_errors_are_capped():
    truth = torch.randn(3, 6, 2)
    scale = torch.tensor([1.0, 2.0])
    prediction = truth + 0.1 * torch.randn(3, 6, 2)
    prediction[0, 2, 1] = float("nan")   # sequence 0: NaN at step 2
    prediction[1, 4, 0] = 1e3            # sequence 1: 1000 scales off at step 4 (and back to normal after)
    prediction[2, 3, 1] = truth[2, 3, 1] + 150.0  # sequence 2: 75 scales off on a channel of scale 2: not diverged
    at = divergence_steps(prediction, truth, scale, limit=100.0)
    assert at.tolist() == [2, 4, 6]

    error = capped_error(prediction, truth, scale, at, 100.0)
    assert torch.isfinite(error).all()
    torch.testing.assert_close(error[0, 2:], torch.tensor([100.0, 200.0], dtype=torch.float64).expand(4, 2))
    torch.testing.assert_close(error[0, :2], (prediction - truth)[0, :2].double())
    torch.testing.assert_close(error[2], (prediction - truth)[2].double())

    sums = horizon_sums(error, scale, at)
    assert sums.diverged == 2 and sums.first_diverged_step == 2
    errors = sums.errors()
    # at the last step two of three sequences sit at exactly 100 scales on both channels
    normalised_last = (error[2, -1] / scale).pow(2).sum()
    torch.testing.assert_close(errors.nrmse[-1], ((2 * 2 * 100.0**2 + normalised_last) / 6).sqrt())
    none = horizon_sums(error[2:], scale, at[2:])
    assert none.diverged == 0 and none.first_diverged_step == 6
