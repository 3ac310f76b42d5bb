"""The linear-RNN zoo: mixers with a parallel `forward` and a capture-safe `step`."""

from lrnn_lightning.models.backbone import GatedMLP, ResidualBlock, SequenceModel
from lrnn_lightning.models.mixer import Mixer, State
from lrnn_lightning.models.registry import MIXERS, build_model, get_mixer_class
from lrnn_lightning.models.scan import linear_scan

__all__ = ["MIXERS", "GatedMLP", "Mixer", "ResidualBlock", "SequenceModel", "State", "build_model",
           "get_mixer_class", "linear_scan"]
