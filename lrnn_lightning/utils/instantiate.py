"""Build callbacks and loggers from their Hydra config groups (a dict of `_target_` configs each)."""

from __future__ import annotations

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig


def _instantiate_group(cfg: DictConfig | None, group: str, kind: type) -> list:
    if not cfg:
        return []
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"The `{group}` config must be a mapping of name -> object config, got {type(cfg).__name__}.")
    objects = []
    for name, entry in cfg.items():
        if entry is None:  # switched off with e.g. `callbacks.model_checkpoint=null`
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{group}.{name} has no `_target_`. HINT: every entry of the `{group}` group must be an "
                             "instantiable config, e.g. `{_target_: ..., ...}`.")
        obj = hydra.utils.instantiate(entry)
        if not isinstance(obj, kind):
            raise ValueError(f"{group}.{name} built a {type(obj).__name__}, not a {kind.__name__}.")
        objects.append(obj)
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Every callback in the `callbacks` group."""
    return _instantiate_group(cfg, "callbacks", Callback)


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Every logger in the `logger` group (empty for `logger=none`)."""
    return _instantiate_group(cfg, "logger", Logger)
