"""lrnn_lightning: CUDA-graph autoregressive rollouts for linear RNNs, as a Lightning + Hydra plugin."""

__version__ = "0.1.0"
