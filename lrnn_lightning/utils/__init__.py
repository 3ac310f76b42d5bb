"""Run plumbing: building a run from Hydra configs, and offline-first W&B."""

from lrnn_lightning.utils.instantiate import instantiate_callbacks, instantiate_loggers
from lrnn_lightning.utils.wandb_setup import finish_wandb, resolve_mode, wandb_logger

__all__ = ["finish_wandb", "instantiate_callbacks", "instantiate_loggers", "resolve_mode", "wandb_logger"]
