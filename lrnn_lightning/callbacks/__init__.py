"""Lightning callbacks: `RolloutCallback` rolls the model out from validation contexts and logs the errors."""

from lrnn_lightning.callbacks.result import RankReport, RolloutResult, SequenceScores
from lrnn_lightning.callbacks.rollout import RolloutCallback

__all__ = ["RankReport", "RolloutCallback", "RolloutResult", "SequenceScores"]
