"""The server's settings (finetune/settings.py): read from the environment once, every value checked,
all bad ones reported together; a server given settings reads nothing else."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from finetune.engine.scheduler import EngineLimits
from finetune.settings import ServeSettings, SettingsError


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
