"""The environment settings (finetune/settings.py): the server's and the training's, each read from
the environment once, every value checked, all bad ones reported together; a server or a training
given settings reads nothing else, and no other module reads a setting of its own."""

from __future__ import annotations

import ast
import re
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from finetune.engine.scheduler import EngineLimits
from finetune.settings import (
    ServeSettings,
    SettingsError,
    TrainSettings,
    base_model_from_env,
    jemalloc_from_env,
)

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def test_an_empty_environment_gives_the_documented_defaults():
    settings = ServeSettings.from_env({})
    assert settings == ServeSettings()
    assert (settings.device, settings.dtype, settings.quantization, settings.compile) == ("auto",) * 4
    engine = EngineLimits()
    assert (
        (
            settings.max_batch,
            settings.prefill_chunk,
            settings.prefix_tokens,
            settings.queue_timeout_s,
            settings.max_waiting,
        )
        == (8, 256, 1024, 300.0, 64)
        == (
            engine.max_batch,
            engine.prefill_chunk,
            engine.prefix_tokens,
            engine.queue_timeout_s,
            engine.max_waiting,
        )
    )
    assert settings.kv_tokens is None  # sized for the machine
    assert (settings.adapter_cache_size, settings.adapters_in_use) == (4, 8)
    assert (settings.download_deadline_s, settings.stall_s) == (300.0, 120.0)
    assert settings.allow_local_lora_weights is False
    # Set but empty is unset, as before.
    assert ServeSettings.from_env({"MAX_BATCH_SIZE": " ", "SERVE_DTYPE": ""}) == settings


def test_every_variable_reaches_its_field():
    settings = ServeSettings.from_env(
        {
            "SERVE_DEVICE": " CPU ",
            "SERVE_DTYPE": "bfloat16",
            "SERVE_QUANT": "bnb4",
            "SERVE_COMPILE": "off",
            "MAX_BATCH_SIZE": "3",
            "KV_CACHE_TOKENS": "999",
            "PREFILL_CHUNK_TOKENS": "32",
            "PREFIX_CACHE_TOKENS": "0",
            "QUEUE_TIMEOUT_S": "2.5",
            "MAX_QUEUED_REQUESTS": "5",
            "ADAPTER_CACHE_SIZE": "12",
            "LORA_DOWNLOAD_DEADLINE_S": "30",
            "SERVE_STALL_S": "0.5",
            "ALLOW_LOCAL_LORA_WEIGHTS": "Yes",
        }
    )
    assert settings == ServeSettings(
        device="cpu",
        dtype="bfloat16",
        quantization="bnb4",
        compile="off",
        max_batch=3,
        kv_tokens=999,
        prefill_chunk=32,
        prefix_tokens=0,
        queue_timeout_s=2.5,
        max_waiting=5,
        adapter_cache_size=12,
        download_deadline_s=30.0,
        stall_s=0.5,
        allow_local_lora_weights=True,
    )
    assert settings.adapters_in_use == 12  # the cache's size where larger than 8
    assert (
        ServeSettings.from_env({"MAX_ADAPTERS_IN_USE": "2", "ADAPTER_CACHE_SIZE": "12"}).adapters_in_use == 2
    )
    assert ServeSettings.from_env({"ALLOW_LOCAL_LORA_WEIGHTS": "0"}).allow_local_lora_weights is False


def test_all_bad_values_are_reported_at_once_with_their_variables():
    with pytest.raises(SettingsError) as info:
        ServeSettings.from_env(
            {
                "MAX_BATCH_SIZE": "eight",
                "KV_CACHE_TOKENS": "0",
                "ADAPTER_CACHE_SIZE": "-1",
                "QUEUE_TIMEOUT_S": "soon",
                "SERVE_STALL_S": "nan",
                "SERVE_DTYPE": "fp8",
                "SERVE_QUANT": "int2",
                "SERVE_COMPILE": "always",
                "SERVE_DEVICE": "tpu",
                "PREFILL_CHUNK_TOKENS": "64",  # a good one among them
            }
        )
    message = str(info.value)
    expected = [  # in the order of the fields
        "SERVE_DEVICE='tpu' is not a device: use one of auto, cuda, cpu",
        "SERVE_DTYPE='fp8' is not a dtype: use one of auto, float32, bfloat16, float16",
        "SERVE_QUANT='int2': use one of auto, none, int8, int4, bnb8, bnb4",
        "SERVE_COMPILE='always': use one of auto, off",
        "MAX_BATCH_SIZE='eight': use a whole number >= 1",
        "KV_CACHE_TOKENS='0': use a whole number >= 1",
        "QUEUE_TIMEOUT_S='soon': use a number >= 0",
        "ADAPTER_CACHE_SIZE='-1': use a whole number >= 0",
        "SERVE_STALL_S='nan': use a number >= 0.001",
    ]
    assert message.startswith(f"{len(expected)} serving settings are invalid:")
    assert [line.removeprefix("  - ") for line in message.splitlines()[1:]] == expected
    # One bad value: its line alone, as the variable's own error always read.
    with pytest.raises(SettingsError, match=r"^MAX_BATCH_SIZE='0': use a whole number >= 1$"):
        ServeSettings.from_env({"MAX_BATCH_SIZE": "0"})


def test_settings_made_or_changed_in_code_are_checked_too():
    with pytest.raises(SettingsError, match=re.escape("MAX_BATCH_SIZE=0: use a whole number >= 1")):
        ServeSettings(max_batch=0)
    with pytest.raises(SettingsError, match=re.escape("SERVE_QUANT='int2'")):
        replace(ServeSettings(), quantization="int2")
    with pytest.raises(SettingsError, match="ADAPTER_CACHE_SIZE=2.5: use a whole number"):
        ServeSettings(adapter_cache_size=2.5)  # type: ignore[arg-type]


def test_a_server_takes_its_settings_and_the_keyword_overrides(tiny_model_dir, monkeypatch):
    from finetune.serving.server import ModelServer

    # Given settings, the server reads no environment: this would stop a server that did.
    monkeypatch.setenv("MAX_BATCH_SIZE", "eight")
    settings = ServeSettings(max_batch=3, kv_tokens=999, prefill_chunk=32, adapter_cache_size=2, stall_s=5)
    server = ModelServer(
        base_model=str(tiny_model_dir), settings=settings, dtype="float32", quantization="none", cache_size=0
    )
    assert server.settings == replace(settings, dtype="float32", quantization="none", adapter_cache_size=0)
    assert server.settings.adapters_in_use == 8  # follows the overridden cache size
    limits = server.engine.limits
    assert (limits.max_batch, limits.kv_tokens, limits.prefill_chunk) == (3, 999, 32)
    assert server.quantization == "none" and str(server.precision.weights) == "torch.float32"


# --- the training's settings -------------------------------------------------------------------


def test_an_empty_environment_gives_the_training_defaults():
    settings = TrainSettings.from_env({})
    assert settings == TrainSettings()
    assert (settings.device, settings.strategy, settings.base_model) == ("auto", "auto", None)
    assert settings.checkpoints_kept == 8
    assert settings.checkpoint_root == Path.home() / ".cache" / "finetune" / "training-checkpoints"
    blank = {
        name: " "
        for name in (
            "TRAIN_DEVICE",
            "TRAIN_STRATEGY",
            "BASE_MODEL",
            "TRAINING_CHECKPOINT_DIR",
            "TRAINING_CHECKPOINT_KEEP",
            "XDG_CACHE_HOME",
        )
    }
    assert TrainSettings.from_env(blank) == settings  # set but blank is unset
    assert jemalloc_from_env({}) == jemalloc_from_env({"TRAIN_JEMALLOC": " "}) == "auto"
    assert base_model_from_env({}) is base_model_from_env({"BASE_MODEL": ""}) is None


def test_every_training_variable_reaches_its_field(tmp_path):
    settings = TrainSettings.from_env(
        {
            "TRAIN_DEVICE": " CPU ",
            "TRAIN_STRATEGY": "FSDP",
            "BASE_MODEL": "huggyllama/llama-7b",
            "TRAINING_CHECKPOINT_DIR": "~/trainings",
            "TRAINING_CHECKPOINT_KEEP": "3",
            "XDG_CACHE_HOME": str(tmp_path),
            "TRAIN_JEMALLOC": "/opt/lib/libjemalloc.so.2",  # not a field: jemalloc_from_env alone
        }
    )
    assert settings == TrainSettings(
        device="cpu",
        strategy="fsdp",
        base_model="huggyllama/llama-7b",
        checkpoint_dir=Path.home() / "trainings",
        cache_home=tmp_path,
        checkpoints_kept=3,
    )
    assert settings.checkpoint_root == Path.home() / "trainings"
    cached = TrainSettings.from_env({"XDG_CACHE_HOME": str(tmp_path)})
    assert cached.checkpoint_root == tmp_path / "finetune" / "training-checkpoints"
    assert jemalloc_from_env({"TRAIN_JEMALLOC": " off "}) == "off"


def test_all_bad_training_values_are_reported_at_once_with_their_variables():
    with pytest.raises(SettingsError) as info:
        TrainSettings.from_env(
            {
                "TRAINING_CHECKPOINT_KEEP": "0",
                "TRAIN_STRATEGY": "zero3",
                "TRAIN_DEVICE": "tpu",
                "BASE_MODEL": "anything",  # a good one among them: checked where it is loaded
            }
        )
    expected = [  # in the order of the fields
        "TRAIN_DEVICE='tpu' is not a device: use one of auto, cuda, cpu",
        "TRAIN_STRATEGY='zero3' is not a training strategy: use ddp (a whole model per process), "
        "fsdp (the model sharded over the processes) or auto",
        "TRAINING_CHECKPOINT_KEEP='0': use a whole number >= 1",
    ]
    message = str(info.value)
    assert message.startswith(f"{len(expected)} training settings are invalid:")
    assert [line.removeprefix("  - ") for line in message.splitlines()[1:]] == expected
    with pytest.raises(SettingsError, match=r"^TRAINING_CHECKPOINT_KEEP='eight': use a whole number >= 1$"):
        TrainSettings.from_env({"TRAINING_CHECKPOINT_KEEP": "eight"})
    # Made or changed in code: checked too.
    with pytest.raises(SettingsError, match=re.escape("TRAIN_STRATEGY='zero3'")):
        replace(TrainSettings(), strategy="zero3")
    with pytest.raises(SettingsError, match=re.escape("TRAINING_CHECKPOINT_KEEP=0")):
        TrainSettings(checkpoints_kept=0)


BAD_ENVIRONMENT = {
    "TRAIN_DEVICE": "tpu",
    "TRAIN_STRATEGY": "zero3",
    "TRAINING_CHECKPOINT_KEEP": "0",
    "BASE_MODEL": "./no/such/model",
    "SERVE_DEVICE": "tpu",
}


@pytest.fixture
def bad_environment(monkeypatch) -> None:
    """An environment that stops whatever reads a setting from it."""
    for name, value in BAD_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def test_a_training_given_settings_reads_no_environment(bad_environment, tiny_model_dir, tiny_data, tmp_path):
    from finetune.config import DataConfig, TrainConfig
    from finetune.training.trainer import plan_run

    cfg = TrainConfig(
        output_dir=str(tmp_path / "adapter"),
        max_steps=1,
        batch_size=4,
        micro_batch_size=2,
        data=DataConfig(data_path=str(tiny_data), val_set_size=0),
    )
    assert cfg.base_model is None  # the base comes from the settings
    settings = TrainSettings(device="auto", strategy="fsdp", base_model=str(tiny_model_dir))
    plan = plan_run(cfg, settings)
    assert plan.base_path == str(tiny_model_dir)
    assert plan.place.strategy == "fsdp"  # the settings', not the memory plan's choice
    # Without settings, train() parses the environment first: every bad value, before any data.
    from finetune.training.trainer import train

    with pytest.raises(SettingsError, match="^3 training settings are invalid"):
        train(cfg)


def test_the_train_service_takes_its_folder_and_keep_count_from_its_settings(
    bad_environment, tmp_path, monkeypatch
):
    from finetune.cog import service_train
    from finetune.config import TrainConfig

    seen: list[object] = []

    def fake_train(cfg, log, settings):
        seen.append(settings)
        raise RuntimeError("stop here")

    monkeypatch.setattr(service_train, "train", fake_train)
    monkeypatch.setattr(service_train, "train_device", lambda device, log: seen.append(device))
    settings = TrainSettings(device="cpu", checkpoint_dir=tmp_path / "trainings", checkpoints_kept=2)
    with pytest.raises(RuntimeError, match="stop here"):
        service_train.run_training(lambda output_dir: TrainConfig(output_dir=output_dir), settings=settings)
    assert seen == ["cpu", settings]  # the device checked first, then the training given the same settings
    root = tmp_path / "trainings"
    assert root.is_dir() and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert list(root.iterdir()) == []  # the failed training's folder is gone


def test_the_cli_reports_every_bad_setting_before_any_work(bad_environment, monkeypatch, capsys, tmp_path):
    from finetune.model import devices
    from finetune.training import trainer
    from finetune.training.cli import main

    monkeypatch.setattr(devices, "train_device", lambda *a, **k: pytest.fail("the device was probed"))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("a training started"))
    assert main(["--output_dir", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 3 training settings are invalid:")
    assert all(
        name in err for name in ("TRAIN_DEVICE='tpu'", "TRAIN_STRATEGY='zero3'", "TRAINING_CHECKPOINT_KEEP")
    )


def test_the_device_comes_from_the_parsed_settings(bad_environment):
    from finetune.model.devices import serve_device

    assert serve_device(ServeSettings(device="cpu")) == "cpu"
    with pytest.raises(SettingsError, match="SERVE_DEVICE='tpu' is not a device"):
        serve_device()  # without settings: parsed from the environment, all of it


# Modules that read the environment for something other than a setting of their own, and what.
NOT_SETTINGS = {
    "finetune.settings": "the settings themselves",
    "finetune.engine.kernel": "SERVE_COMPILE_CACHE and CXX where the kernel is built (names in settings.py)",
    "finetune.cog.cogtools": "the environment of the Cog servers it starts",
    "finetune.model.devices": "NVIDIA_VISIBLE_DEVICES, a fact of the container",
    "finetune.training.distributed": "torchrun's WORLD_SIZE and LOCAL_RANK, facts of the process",
    "finetune.training.allocator": "LD_PRELOAD and its restart marker; the environment it restarts with",
    "finetune.training.cli": "the flags' defaults (MICRO_BATCH_SIZE, DATA_PATH, ...), one per flag",
    "finetune.training.progress": "WANDB_* set for wandb",
}


def environment_readers() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
                found.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_no_module_reads_a_setting_of_its_own():
    readers = environment_readers()
    assert "finetune.settings" in readers  # the walk sees them
    assert readers - set(NOT_SETTINGS) == set()
