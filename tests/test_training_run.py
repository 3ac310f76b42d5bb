"""The run around `trainer.fit` in `utils.training.train`: the checks before it, the summary after it."""

from __future__ import annotations

import warnings

import pytest

from lrnn_lightning.callbacks import RolloutCallback
from lrnn_lightning.utils.training import _last_rollout, metric_value, stale_rollout_warning, summary_line, train
from tests import test_configs
from tests.test_callback import tiny_data, tiny_module, tiny_trainer

make_cfg = test_configs.make_cfg  # Hydra's compose, with the run directories in tmp_path


@pytest.mark.parametrize("override, message", [
    ("generation.horizon=999", r"horizon=999 is longer than the validation windows' horizon"),
    ("generation.every_n_epochs=2", r"every_n_epochs=2 rolls out.*ModelCheckpoint"),
])
def test_a_rollout_setting_that_cannot_run_fails_before_a_wandb_run_starts(make_cfg, tmp_path, override, message):
    overrides = ("logger=wandb", "experiment=smoke", override)
    if "every_n_epochs" in override:
        overrides += ("callbacks.model_checkpoint.monitor=rollout/nrmse",)
    with pytest.raises(ValueError, match=message):
        train(make_cfg(*overrides))
    assert not list(tmp_path.rglob("offline-run-*")), "a W&B run was started for a run that could not train"


@pytest.mark.parametrize("overrides, message", [
    (("optimized_metric=rollout/nrmsee",),
     r"optimized_metric='rollout/nrmsee': the rollout callback logs no 'nrmsee'.*HINT: did you mean rollout/nrmse\?"),
    (("optimized_metric=rollout/nrmse", "generation.every_n_epochs=3"),  # smoke trains 2 epochs
     r"'rollout/nrmse', but with every_n_epochs=3 and validation every 1 epoch\(s\) the first rollout would come "
     r"after epoch 2, and the trainer stops after 2 epochs, so it is never logged"),
    (("optimized_metric=rollout/nrmse", "callbacks=none"), r"rollout metric, but this run has no RolloutCallback"),
])
def test_an_objective_the_run_cannot_log_fails_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg("logger=wandb", "experiment=smoke", *overrides))
    assert not list(tmp_path.rglob("offline-run-*")), "a W&B run was started for a run that could not train"
    assert not list(tmp_path.rglob("*.ckpt")), "it trained"


@pytest.mark.parametrize("every, validate_every, max_epochs, warns", [(3, 1, 2, True), (3, 1, 3, False),
                                                                      (3, 2, 5, True), (3, 2, 6, False),
                                                                      (2, 4, 3, True), (2, 4, 4, False)])
def test_a_rollout_that_never_comes_within_max_epochs_is_announced(tmp_path, every, validate_every, max_epochs,
                                                                   warns):
    callback = RolloutCallback(num_sequences=2, every_n_epochs=every)
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=max_epochs, check_val_every_n_epoch=validate_every)
    assert callback.first_rollout_epoch(trainer) == {(3, 1): 2, (3, 2): 5, (2, 4): 3}[every, validate_every]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.check_run(trainer, tiny_module(), tiny_data())
    said = [str(w.message) for w in caught if "logs no rollout/* metrics" in str(w.message)]
    assert len(said) == int(warns)
    if warns:
        assert (f"the first rollout would come after epoch {callback.first_rollout_epoch(trainer)}, and the trainer "
                f"stops after {max_epochs} epochs") in said[0] and "HINT" in said[0]


@pytest.mark.parametrize("max_epochs, stale", [(3, True), (4, False)])
def test_a_last_rollout_older_than_the_last_epoch_is_named(tmp_path, max_epochs, stale):
    callback = RolloutCallback(num_sequences=2, every_n_epochs=2, num_plots=0)
    trainer = tiny_trainer(tmp_path, [callback], max_epochs=max_epochs)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    last = _last_rollout(trainer, "rollout")
    assert last is not None and last.epoch == (1 if stale else 3)
    warning = stale_rollout_warning(last, trainer.current_epoch - 1, callback.every_n_epochs)
    if stale:
        assert warning is not None
        assert "last rollout ran at epoch 1, before the last trained epoch 2" in warning
        assert "generation.every_n_epochs=2" in warning and "HINT" in warning
    else:
        assert warning is None
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    line = summary_line(metrics, epoch=last.epoch)
    # the skill compares the MSEs, so it stands next to them
    assert line.startswith(f"Rollout at epoch {last.epoch}: MSE {metrics['rollout/mse']:.4g} vs persistence "
                           f"{metrics['rollout/persistence_mse']:.4g} (skill {metrics['rollout/skill']:+.3f}), "
                           f"normalised RMSE {metrics['rollout/nrmse']:.4f} vs "
                           f"{metrics['rollout/persistence_nrmse']:.4f}, valid for")


def test_train_warns_when_the_last_rollout_is_older_than_the_last_epoch(make_cfg):
    cfg = make_cfg("logger=none", "experiment=smoke", "trainer.max_epochs=3", "generation.every_n_epochs=2",
                   "callbacks.model_checkpoint.monitor=val/loss")
    with pytest.warns(UserWarning, match=r"The last rollout ran at epoch 1, before the last trained epoch 2 "
                                         r"\(generation.every_n_epochs=2\)"):
        metrics, _ = train(cfg)
    assert "rollout/nrmse" in metrics


def test_an_output_dir_away_from_hydras_run_directory_is_named(make_cfg, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from lrnn_lightning.utils.training import output_dir_warning

    cfg = make_cfg("logger=none", "experiment=smoke", hydra=True)  # paths.output_dir: tmp_path / "out"
    assert output_dir_warning(cfg) is None  # composed: Hydra set no run directory
    for run_dir, split in ((tmp_path / "out", False), (tmp_path / "hydra_run", True)):
        OmegaConf.set_readonly(cfg.hydra, False)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
        HydraConfig.instance().set_config(cfg)  # as hydra.main does before the task runs
        warning = output_dir_warning(cfg)
        if not split:
            assert warning is None
        else:
            assert f"paths.output_dir={tmp_path / 'out'} is not Hydra's run directory {run_dir}" in warning
            assert "HINT: override hydra.run.dir" in warning
    with open_dict(cfg):
        del cfg.hydra
    with pytest.warns(UserWarning, match=r"is not Hydra's run directory .*hydra_run"):
        train(cfg)
    make_cfg("logger=none")  # leaves Hydra's global config as composed, without a run directory


def test_an_objective_missing_after_training_is_named_with_the_closest_logged_metric():
    metrics = {"val/loss": 0.5, "train/loss": 0.6}
    assert metric_value(metrics, "val/loss") == 0.5 and metric_value(metrics, None) is None
    with pytest.raises(ValueError, match=r"optimized_metric='val/losss' was not logged\. Logged metrics: train/loss, "
                                         r"val/loss\. HINT: pick one of those, e.g\. optimized_metric=val/loss\.$"):
        metric_value(metrics, "val/losss")
