"""Offline-first W&B: which mode a run gets, and that nothing ever waits for a login."""

from __future__ import annotations

import pytest
from lightning.pytorch.loggers import WandbLogger

import lrnn_lightning.utils.wandb_setup as wandb_setup
from lrnn_lightning.utils.wandb_setup import resolve_mode, wandb_logger


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_mode_is_offline_unless_something_says_otherwise(clean_env):
    assert resolve_mode() == "offline"
    clean_env.setenv("WANDB_SWEEP_ID", "abc123")
    assert resolve_mode() == "online"  # inside a W&B sweep agent
    clean_env.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode() == "offline"  # the environment wins over the agent
    assert resolve_mode("online") == "online"  # and the config wins over everything
    with pytest.raises(ValueError, match=r"W&B mode must be one of online, offline, disabled, got 'cloud'"):
        resolve_mode("cloud")


def test_online_without_credentials_falls_back_to_offline_instead_of_prompting(clean_env, tmp_path):
    clean_env.setattr(wandb_setup, "_has_credentials", lambda: False)
    with pytest.warns(UserWarning, match=r"no W&B credentials are configured; logging offline.*wandb login"):
        logger = wandb_logger(mode="online", save_dir=tmp_path)
    assert isinstance(logger, WandbLogger) and logger._wandb_init["mode"] == "offline"


def test_online_with_credentials_stays_online(clean_env, tmp_path):
    clean_env.setattr(wandb_setup, "_has_credentials", lambda: True)
    logger = wandb_logger(mode="online", save_dir=tmp_path, log_model=True)
    assert logger._wandb_init["mode"] == "online" and logger._log_model is True


def test_offline_run_drops_checkpoint_upload_and_is_silent(clean_env, tmp_path):
    with pytest.warns(UserWarning, match=r"log_model=True uploads checkpoints and needs online mode; ignored"):
        logger = wandb_logger(save_dir=tmp_path / "new", log_model=True, group="g", name="n")
    init = logger._wandb_init
    assert init["mode"] == "offline" and logger._log_model is False
    assert (init["group"], init["name"]) == ("g", "n")
    assert init["settings"].silent is True and init["settings"].console == "wrap"
    assert "anonymous" not in init  # recent wandb only warns about it
    assert (tmp_path / "new").is_dir()


def test_a_misspelt_wandb_key_is_named_before_any_run_starts(clean_env, tmp_path):
    with pytest.raises(ValueError, match=r"logger.wandb: wandb.init takes no projet\. HINT: fix the spelling "
                                         r"\(projet -> project\)"):
        wandb_logger(save_dir=tmp_path, projet="x")
    logger = wandb_logger(save_dir=tmp_path, notes="a wandb.init argument", prefix="fit")  # and WandbLogger's own
    assert logger._wandb_init["notes"] == "a wandb.init argument" and logger._prefix == "fit"
