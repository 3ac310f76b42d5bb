"""Lightning callbacks: `RolloutCallback` rolls the model out from validation contexts and logs the errors."""

from lrnn_lightning.callbacks.rollout import RolloutCallback, RolloutResult

__all__ = ["RolloutCallback", "RolloutResult"]
