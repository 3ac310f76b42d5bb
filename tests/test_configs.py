"""Every Hydra config in conf/ composes and instantiates; bad names and values fail clearly."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import open_dict

from lrnn_lightning.callbacks import RolloutCallback
from lrnn_lightning.data import WindowDataModule
from lrnn_lightning.models import SequenceModel
from lrnn_lightning.module import NextStepModule
from lrnn_lightning.utils.training import GENERATION_KEYS, build
from tests.helpers import has_module

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) with the run directories pointed into tmp_path, as Hydra would at run time."""
    csv_path = tmp_path / "series.csv"
    csv_path.write_text("time,a,b\n" + "\n".join(f"{k},{k % 7},{(k * 3) % 11}" for k in range(1000)))

    def _make(*overrides: str, hydra: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "out")
            cfg.paths.log_dir = str(tmp_path / "logs")
            if cfg.data._target_.endswith("CsvDataModule") and cfg.data.path is None:
                cfg.data.path = str(csv_path)
            if not hydra:
                del cfg.hydra
        return cfg

    yield _make
    GlobalHydra.instance().clear()


def test_every_group_has_the_documented_options():
    assert options("model") == ["lru", "mamba", "rglru", "s4d", "s5"]
    assert options("data") == ["csv", "lorenz", "oscillators", "sunspots"]
    assert options("logger") == ["csv", "none", "tensorboard", "wandb"]
    assert {"default", "cpu", "gpu", "ddp"} <= set(options("trainer"))
    assert len(options("experiment")) >= 3


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds_a_model_that_runs(make_cfg, model):
    parts = build(make_cfg(f"model={model}", "logger=none"))
    assert isinstance(parts["model"], SequenceModel) and parts["model"].mixer_name == model
    assert isinstance(parts["module"], NextStepModule) and isinstance(parts["trainer"], pl.Trainer)
    x = torch.randn(2, 9, 3)
    assert parts["model"](x).shape == (2, 9, 3)


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_serves_the_default_rollout(make_cfg, data):
    cfg = make_cfg(f"data={data}", "logger=none")
    parts = build(cfg)
    datamodule = parts["datamodule"]
    assert isinstance(datamodule, WindowDataModule)
    datamodule.setup("fit")
    window = datamodule.val_dataset[0]
    assert window["context"].shape == (cfg.generation.context, datamodule.num_channels)
    assert window["future"].shape == (cfg.generation.horizon, datamodule.num_channels)
    assert len(datamodule.val_dataset) >= min(cfg.generation.num_sequences, 16)
    rollout = next(c for c in parts["callbacks"] if isinstance(c, RolloutCallback))
    assert (rollout.context, rollout.horizon) == (cfg.generation.context, cfg.generation.horizon)


@pytest.mark.parametrize("logger", options("logger"))
def test_every_logger_config_instantiates(make_cfg, logger):
    if logger == "tensorboard" and not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        pytest.skip("needs tensorboard or tensorboardX")
    loggers = build(make_cfg(f"logger={logger}"))["loggers"]
    expected = {"wandb": [WandbLogger], "csv": [CSVLogger], "tensorboard": [TensorBoardLogger], "none": []}[logger]
    assert len(loggers) == len(expected) and all(isinstance(lg, kind) for lg, kind in zip(loggers, expected,
                                                                                          strict=True))


def test_wandb_logger_config_is_offline_by_default(make_cfg, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    (logger,) = build(make_cfg("logger=wandb"))["loggers"]
    assert logger._wandb_init["mode"] == "offline"
    assert logger._wandb_init["project"] == "lrnn_lightning"


@pytest.mark.parametrize("trainer", options("trainer"))
def test_every_trainer_config_instantiates(make_cfg, trainer):
    overrides = [f"trainer={trainer}", "logger=none"]
    if trainer in ("gpu", "ddp") and not torch.cuda.is_available():
        overrides += ["trainer.accelerator=cpu", "trainer.devices=2" if trainer == "ddp" else "trainer.devices=1"]
    assert isinstance(build(make_cfg(*overrides))["trainer"], pl.Trainer)


@pytest.mark.parametrize("callbacks", ["default", "none", "[default,early_stopping]"])
def test_callback_configs_instantiate(make_cfg, callbacks):
    built = build(make_cfg(f"callbacks={callbacks}", "logger=none"))["callbacks"]
    names = sorted(type(c).__name__ for c in built)
    expected = {"default": ["ModelCheckpoint", "RolloutCallback"], "none": [],
                "[default,early_stopping]": ["EarlyStopping", "ModelCheckpoint", "RolloutCallback"]}[callbacks]
    assert names == expected


@pytest.mark.parametrize("experiment", [e for e in options("experiment") if e != "gpu_long_horizon"])
def test_every_experiment_builds(make_cfg, experiment):
    cfg = make_cfg(f"experiment={experiment}", "logger=none")
    parts = build(cfg)
    datamodule = parts["datamodule"]
    datamodule.setup("fit")
    assert parts["model"].mixer_name == cfg.model.name
    assert datamodule.val_dataset[0]["future"].shape[0] == cfg.data.horizon >= cfg.generation.horizon
    assert ("dt" in datamodule.val_dataset[0]) == bool(cfg.data.event)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_the_gpu_experiment_fails_fast_without_cuda(make_cfg):
    cfg = make_cfg("experiment=gpu_long_horizon", "logger=none")
    assert cfg.generation.cuda_graph is True and cfg.generation.horizon == 1024
    with pytest.raises(Exception, match=r"cuda_graph=true needs a CUDA GPU.*HINT"):
        build(cfg)


def test_cli_cuda_graph_true_reaches_the_callback_as_a_bool(make_cfg):
    cfg = make_cfg("model=lru", "generation.cuda_graph=true")
    assert cfg.callbacks.rollout.cuda_graph is True


@pytest.mark.parametrize(("group", "bad"), [("model", "transformer"), ("data", "mnist"), ("logger", "mlflow")])
def test_unknown_names_list_the_valid_ones(make_cfg, group, bad):
    with pytest.raises(MissingConfigException) as error:
        make_cfg(f"{group}={bad}")
    message = str(error.value)
    assert f"Could not find '{group}/{bad}'" in message
    for valid in options(group):
        assert f"\t{valid}\n" in message


def test_unknown_mixer_name_inside_a_model_config_lists_the_valid_ones(make_cfg):
    with pytest.raises(Exception, match=r"Unknown mixer 'gru'. Valid names: lru, mamba, rglru, s4d, s5"):
        build(make_cfg("model.name=gru", "logger=none"))


@pytest.mark.parametrize(("override", "message"), [
    ("generation.batch_size=0", r"batch_size must be a positive integer, got 0"),
    ("generation.batch_size=1.5", r"batch_size must be a positive integer, got 1.5"),
    ("data.batch_size=-4", r"batch_size must be a positive integer, got -4"),
    ("generation.num_sequences=0", r"num_sequences must be a positive integer, got 0"),
    ("generation.cuda_graph=maybe", r"cuda_graph must be 'auto', true or false, got 'maybe'"),
])
def test_bad_values_fail_with_their_name(make_cfg, override, message):
    with pytest.raises(Exception, match=message):
        build(make_cfg(override, "logger=none"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["generation.horizon=512"], r"horizon=512 is longer than the validation windows' horizon \(256 steps\)"),
    (["generation.context=100"], r"context=100 is longer than the validation windows' context \(64 steps\)"),
    (["generation.event=true"], r"event_mode=true needs per-step dt from the data"),
])
def test_rollouts_the_data_cannot_serve_fail_before_training(make_cfg, overrides, message):
    parts = build(make_cfg(*overrides, "logger=none", "experiment=smoke", "data.horizon=256", "data.context_length=64",
                           "data.num_samples=2000"))
    rollout = next(c for c in parts["callbacks"] if isinstance(c, RolloutCallback))
    with pytest.raises(ValueError, match=message):
        parts["trainer"].fit(parts["module"], datamodule=parts["datamodule"])
    assert parts["trainer"].global_step == 0 and rollout.last_result is None


def test_event_mode_on_csv_without_timestamps_is_an_error(make_cfg):
    with pytest.raises(Exception, match=r"event mode \(data.event=true\) needs timestamps.*data.timestamp_column"):
        build(make_cfg("data=csv", "data.event=true", "logger=none"))


@pytest.mark.skipif(not has_module("hydra_plugins.hydra_optuna_sweeper"),
                    reason="needs the optuna extra (hydra-optuna-sweeper)")
def test_optuna_search_config_composes(make_cfg):
    cfg = make_cfg("hparams_search=optuna", hydra=True)
    assert cfg.optimized_metric == "rollout/nrmse"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
    params = cfg.hydra.sweeper.params
    assert "model" in params and any(key.startswith("generation.") for key in params)


@pytest.mark.parametrize("data", options("data"))
def test_the_optuna_search_space_fits_every_data_config(make_cfg, data):
    """A drawn rollout context longer than the data's windows would stop the whole study at that trial."""
    search = yaml.safe_load((CONF / "hparams_search" / "optuna.yaml").read_text())["hydra"]["sweeper"]["params"]
    contexts = [int(v) for v in re.fullmatch(r"choice\((.*)\)", search["generation.context"])[1].split(",")]
    assert max(contexts) <= make_cfg(f"data={data}").data.context_length


@pytest.mark.skipif(not has_module("hydra_plugins.hydra_submitit_launcher"),
                    reason="needs the slurm extra (hydra-submitit-launcher)")
def test_slurm_launcher_config_composes(make_cfg):
    cfg = make_cfg("hydra/launcher=slurm", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize("overrides, unknown", [
    (("experiment=smoke", "data=sunspots"), "num_samples, num_series"),  # smoke's keys for the generated data
    (("+data.batchsize=4",), "batchsize"),  # a misspelt key
])
def test_a_data_key_its_module_does_not_take_is_named_before_anything_is_built(make_cfg, overrides, unknown):
    with pytest.raises(ValueError, match=rf"data: \w+DataModule takes no {unknown} \(it takes .*batch_size.*HINT"):
        build(make_cfg("logger=none", *overrides))


def test_a_generation_key_nothing_reads_is_named_before_anything_is_built(make_cfg):
    with pytest.raises(ValueError, match=r"generation: nothing reads generation.horizn \(the config reads .*horizon.*\)"
                                         r"\. HINT: fix the spelling \(horizn -> horizon\)"):
        build(make_cfg("logger=none", "+generation.horizn=8"))
    # without a rollout callback nothing reads the group at all: not second-guessed
    assert build(make_cfg("logger=none", "callbacks=none", "+generation.horizn=8"))["callbacks"] == []
    # a known key whose reader was overridden directly, and readers written other ways, are fine
    (callback,) = [c for c in build(make_cfg("logger=none", "callbacks.rollout.horizon=64"))["callbacks"]
                   if isinstance(c, RolloutCallback)]
    assert callback.horizon == 64
    build(make_cfg("logger=none", "+generation.extra=3", "callbacks.rollout.seed=${oc.select:generation.extra,1}"))
    assert set(make_cfg("logger=none").generation) <= GENERATION_KEYS  # every default key is known


def test_smoke_runs_on_shipped_data_without_the_generated_data_keys(make_cfg):
    parts = build(make_cfg("logger=none", "experiment=smoke", "data=sunspots", "~data.num_series",
                           "~data.num_samples"))
    assert type(parts["datamodule"]).__name__ == "SunspotsDataModule"


def test_keys_of_a_target_that_forwards_kwargs_elsewhere_are_not_second_guessed():
    from lightning.pytorch import LightningDataModule

    from lrnn_lightning.utils.instantiate import accepted_keys

    class UserData(LightningDataModule):  # **options go where this package cannot see
        def __init__(self, path: str, **options):
            super().__init__()
            self.options = options

    assert accepted_keys(UserData) is None
    assert accepted_keys(WindowDataModule) >= {"context_length", "horizon", "batch_size"}
