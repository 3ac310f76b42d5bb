"""RolloutCallback's checks of settings that would otherwise fail late or silently: callbacks monitoring the
rollout metrics with every_n_epochs > 1, a resume with other window settings, event data rolled out without dt,
compile=true where no graph is compiled."""

from __future__ import annotations

import warnings

import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lrnn_lightning.callbacks import RolloutCallback
from tests.test_callback import tiny_data, tiny_module, tiny_trainer


@pytest.mark.parametrize(("prefix", "monitor_callback", "message"), [
    ("rollout", lambda path: ModelCheckpoint(dirpath=path, monitor="rollout/nrmse"),
     r"RolloutCallback: every_n_epochs=2 rolls out, and logs 'rollout/...', only every 2 epochs, but "
     r"ModelCheckpoint\(monitor='rollout/nrmse', every_n_epochs=1\) reads 'rollout/nrmse'.*HINT: monitor val/loss, "
     r"or set generation.every_n_epochs=1, or give the checkpoint every_n_epochs=2 \(or a multiple\)"),
    ("roll", lambda path: ModelCheckpoint(dirpath=path, monitor="roll/skill", every_n_epochs=3),
     r"ModelCheckpoint\(monitor='roll/skill', every_n_epochs=3\)"),
    ("rollout", lambda path: EarlyStopping(monitor="rollout/nrmse"),
     r"EarlyStopping\(monitor='rollout/nrmse'\) reads 'rollout/nrmse' at the other epochs' validations too, where "
     r"it is missing \(before the first rollout\) or an older rollout's value"),
    # not strict, it would count an older rollout's value again as no improvement: patience runs out early
    ("rollout", lambda path: EarlyStopping(monitor="rollout/nrmse", strict=False),
     r"EarlyStopping\(monitor='rollout/nrmse'\).*HINT: .*trainer.check_val_every_n_epoch=2"),
    ("rollout", lambda path: ModelCheckpoint(dirpath=path, monitor="rollout/nrmse", every_n_epochs=0,
                                             every_n_train_steps=1),
     r"ModelCheckpoint\(monitor='rollout/nrmse', saving by training steps or time\)"),
], ids=["checkpoint", "checkpoint-every-3-epochs-other-prefix", "strict-early-stopping", "non-strict-early-stopping",
        "checkpoint-by-steps"])
def test_every_n_epochs_with_a_callback_monitoring_the_rollout_fails_at_fit_start(tmp_path, prefix,
                                                                                monitor_callback, message):
    callbacks = [RolloutCallback(num_sequences=2, every_n_epochs=2, prefix=prefix), monitor_callback(tmp_path / "c")]
    trainer = tiny_trainer(tmp_path, callbacks, logger=False, max_epochs=2, enable_checkpointing=True)
    with pytest.raises(ValueError, match=message):
        trainer.fit(tiny_module(), datamodule=tiny_data())
    assert trainer.global_step == 0  # before any training, not at the first epoch without a rollout


@pytest.mark.parametrize(("every_n_epochs", "monitor_callback", "trainer_options"), [
    (1, lambda path: ModelCheckpoint(dirpath=path, monitor="rollout/nrmse"), {}),
    (2, lambda path: ModelCheckpoint(dirpath=path, monitor="rollout/nrmse", every_n_epochs=2), {}),
    (2, lambda path: EarlyStopping(monitor="rollout/nrmse", verbose=False), dict(check_val_every_n_epoch=2)),
    (2, lambda path: ModelCheckpoint(dirpath=path, monitor="rollout/nrmse"), dict(check_val_every_n_epoch=2)),
    (2, lambda path: ModelCheckpoint(dirpath=path, monitor="val/loss"), {}),
], ids=["every-epoch", "checkpoint-every-2-epochs", "early-stopping-validating-every-2-epochs",
        "trainer-validates-every-2-epochs", "monitors-val-loss"])
def test_callbacks_that_see_the_rollout_metrics_whenever_they_look_train(tmp_path, every_n_epochs, monitor_callback,
                                                                          trainer_options):
    rollout, monitor = RolloutCallback(num_sequences=2, every_n_epochs=every_n_epochs), monitor_callback(tmp_path / "c")
    trainer = tiny_trainer(tmp_path, [rollout, monitor], logger=False, max_epochs=2, enable_checkpointing=True,
                           **trainer_options)
    trainer.fit(tiny_module(), datamodule=tiny_data())
    assert trainer.current_epoch == 2 and rollout.last_result.epoch == 1
    assert "rollout/nrmse" in trainer.callback_metrics
    if isinstance(monitor, ModelCheckpoint):
        assert monitor.best_model_path  # it did save, on the monitored value


def _picked_windows(tmp_path, **kwargs) -> RolloutCallback:
    callback = RolloutCallback(**kwargs)
    tiny_trainer(tmp_path, [callback], logger=False).validate(tiny_module(), datamodule=tiny_data())
    return callback


@pytest.mark.parametrize(("seed", "num_sequences"), [(7, 3), (1, 5)])
def test_resume_with_other_window_settings_warns_and_keeps_the_checkpoint_windows(tmp_path, seed, num_sequences):
    saved = _picked_windows(tmp_path, num_sequences=3, seed=1)
    state = saved.state_dict()
    resumed = RolloutCallback(num_sequences=num_sequences, seed=seed)
    with pytest.warns(UserWarning, match=rf"the checkpoint's rollout windows were drawn with seed=1, num_sequences=3, "
                                         rf"but this callback was given seed={seed}, num_sequences={num_sequences}; "
                                         r"the checkpoint's windows are kept.*HINT: .*start a fresh run"):
        resumed.load_state_dict(state)
    assert resumed.indices == saved.indices and (resumed.seed, resumed.num_sequences) == (1, 3)
    assert resumed.state_dict() == state  # the next checkpoint describes the windows it holds

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RolloutCallback")  # warned once per callback
        resumed.load_state_dict(state)
        tiny_trainer(tmp_path, [resumed], logger=False).validate(tiny_module(), datamodule=tiny_data())
    assert resumed.last_result.indices == saved.indices


def test_resume_with_the_same_window_settings_is_silent(tmp_path):
    saved = _picked_windows(tmp_path, num_sequences=3, seed=1)
    resumed = RolloutCallback(num_sequences=3, seed=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="RolloutCallback")
        resumed.load_state_dict(saved.state_dict())
    assert resumed.indices == saved.indices


def _dt_warnings(tmp_path, callback: RolloutCallback, max_epochs: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, [callback], logger=False, max_epochs=max_epochs).fit(
            tiny_module(), datamodule=tiny_data(event=True))
    return [str(w.message) for w in caught if "ignores the data's dt" in str(w.message)]


def test_event_data_rolled_out_without_dt_warns_once(tmp_path):
    callback = RolloutCallback(num_sequences=2, event_mode=False)
    with pytest.warns(UserWarning, match=r"RolloutCallback: event_mode=false, but the validation windows carry "
                                         r"per-step dt \(data.event=true\): the rollout ignores the data's dt.*HINT: "
                                         r"set generation.event=null \(follow the data\) or true"):
        tiny_trainer(tmp_path, [callback], logger=False).validate(tiny_module(), datamodule=tiny_data(event=True))
    assert callback.last_result.dt is None  # still as asked: without dt

    assert len(_dt_warnings(tmp_path, RolloutCallback(num_sequences=2, event_mode=False), max_epochs=2)) == 1
    assert _dt_warnings(tmp_path, RolloutCallback(num_sequences=2), max_epochs=1) == []  # event_mode=None: with dt


@pytest.mark.parametrize("compile_step", [True, False])
def test_compile_on_the_loop_path_warns_that_it_does_nothing(tmp_path, compile_step):
    callback = RolloutCallback(num_sequences=2, compile=compile_step)  # on the CPU: the step loop
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(tmp_path, [callback], logger=False, max_epochs=2).fit(tiny_module(), datamodule=tiny_data())
    said = [str(w.message) for w in caught if "compile=true" in str(w.message)]
    assert callback.last_result.stats.path == "loop"
    if compile_step:  # once, naming the path and the fix
        assert len(said) == 1 and "ran on the loop path, where it has no effect" in said[0] and "HINT" in said[0]
    else:
        assert said == []
