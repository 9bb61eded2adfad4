"""The environment settings, parsed and checked once: `ServeSettings.from_env()` when a server is
set up, `TrainSettings.from_env()` when a training starts (the CLI's main, the train service, or
train() itself when it is given none).

Every variable's name lives here (other modules that print or set one import it from here), with
the value sets the string settings take. A bad value stops setup with the variable's name and what
to use instead; every bad one is reported at once, not the first only. Only config.py and
errors.py lie below this module, so every package can read names from here."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .config import ConfigError

SERVE_DEVICE_ENV = "SERVE_DEVICE"
DTYPE_ENV = "SERVE_DTYPE"
QUANT_ENV = "SERVE_QUANT"
COMPILE_ENV = "SERVE_COMPILE"
COMPILE_CACHE_ENV = "SERVE_COMPILE_CACHE"  # read where the cache is used (kernel.py), not here
CXX_ENV = "CXX"  # likewise: the compiler kernel.py builds the int8 kernel with
MAX_BATCH_ENV = "MAX_BATCH_SIZE"
KV_TOKENS_ENV = "KV_CACHE_TOKENS"
PREFILL_CHUNK_ENV = "PREFILL_CHUNK_TOKENS"
PREFIX_CACHE_ENV = "PREFIX_CACHE_TOKENS"
QUEUE_TIMEOUT_ENV = "QUEUE_TIMEOUT_S"
MAX_WAITING_ENV = "MAX_QUEUED_REQUESTS"
ADAPTER_CACHE_ENV = "ADAPTER_CACHE_SIZE"
ADAPTERS_IN_USE_ENV = "MAX_ADAPTERS_IN_USE"
DOWNLOAD_DEADLINE_ENV = "LORA_DOWNLOAD_DEADLINE_S"
STALL_ENV = "SERVE_STALL_S"  # one step or call on the compute thread longer than this: not healthy
LOCAL_LORA_ENV = "ALLOW_LOCAL_LORA_WEIGHTS"
BASE_MODEL_ENV = "BASE_MODEL"  # both sides: a model folder or hub id instead of the embedded default

TRAIN_DEVICE_ENV = "TRAIN_DEVICE"
STRATEGY_ENV = "TRAIN_STRATEGY"
CHECKPOINT_DIR_ENV = "TRAINING_CHECKPOINT_DIR"
CHECKPOINT_KEEP_ENV = "TRAINING_CHECKPOINT_KEEP"
CACHE_HOME_ENV = "XDG_CACHE_HOME"
JEMALLOC_ENV = "TRAIN_JEMALLOC"  # read on its own by jemalloc_from_env: see TrainSettings

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# SERVE_QUANT values that load the base through bitsandbytes, and the `quantization` they load with.
BNB_MODES = {"bnb8": "8bit", "bnb4": "4bit"}
QUANT_MODES = ("auto", "none", "int8", "int4", *BNB_MODES)
COMPILE_MODES = ("auto", "off")
STRATEGIES = ("ddp", "fsdp")  # TRAIN_STRATEGY also takes auto: the memory plan's choice
# Without MAX_ADAPTERS_IN_USE: this many distinct adapters in use, or the cache's size if larger.
MIN_ADAPTERS_IN_USE = 8
_TRUE = {"1", "true", "yes", "on"}  # config.parse_bool's spelling of "on"


class SettingsError(ConfigError):
    """A serving or training setting is invalid; the message names each bad variable and what to use."""


@dataclass(frozen=True)
class ServeSettings:
    """What a server is set up with. The defaults are those of an unset environment; scheduler.py's
    EngineLimits holds the same numbers for an engine built without a server."""

    device: str = "auto"
    """SERVE_DEVICE: auto (the GPU where torch sees one), cuda or cpu."""
    dtype: str = "auto"
    """SERVE_DTYPE: the weights' dtype; auto is fp32 on CPUs, bf16 on GPUs that have it."""
    quantization: str = "auto"
    """SERVE_QUANT: none, int8, int4 (CPU decoding), bnb8, bnb4 (a bitsandbytes base) or auto."""
    compile: str = "auto"
    """SERVE_COMPILE: the compiled decode step on a CPU, CUDA graphs on a GPU; off: eager."""
    max_batch: int = 8
    """MAX_BATCH_SIZE: rows decoded together."""
    kv_tokens: int | None = None
    """KV_CACHE_TOKENS: KV cache slots; None: sized for the machine (serving.engine_limits)."""
    prefill_chunk: int = 256
    """PREFILL_CHUNK_TOKENS: prompt tokens prefilled per step between decode steps."""
    prefix_tokens: int = 1024
    """PREFIX_CACHE_TOKENS: cached prompt heads and shared contexts; 0 turns the reuse off."""
    queue_timeout_s: float = 300.0
    """QUEUE_TIMEOUT_S: a request that cannot start in time fails with a reason."""
    max_waiting: int = 64
    """MAX_QUEUED_REQUESTS: requests waiting at most; more fail at once."""
    adapter_cache_size: int = 4
    """ADAPTER_CACHE_SIZE: per-request adapters kept loaded (LRU); 0 loads one per request."""
    max_adapters_in_use: int | None = None
    """MAX_ADAPTERS_IN_USE: distinct lora_weights in use at once; None: `adapters_in_use`'s rule."""
    download_deadline_s: float = 300.0
    """LORA_DOWNLOAD_DEADLINE_S: a lora_weights download's time in all."""
    stall_s: float = 120.0
    """SERVE_STALL_S: a model step longer than this makes the health check fail."""
    allow_local_lora_weights: bool = False
    """ALLOW_LOCAL_LORA_WEIGHTS: local paths in lora_weights (trusted callers only)."""

    def __post_init__(self) -> None:
        _raise(self.problems(), "serving")

    @property
    def adapters_in_use(self) -> int:
        """Distinct per-request adapters loaded or loading at once: each holds memory and a download,
        and none of them may be evicted while in use."""
        if self.max_adapters_in_use is not None:
            return self.max_adapters_in_use
        return max(self.adapter_cache_size, MIN_ADAPTERS_IN_USE)

    def problems(self) -> list[str]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _choice_problems(values, _CHOICES) + _range_problems(values, _NUMBERS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServeSettings:
        """The settings `environ` gives (an unset or empty variable: the default), every value
        checked; a SettingsError lists all the bad ones."""
        values: dict[str, Any] = {}
        for name, env, _, _ in _CHOICES:
            text = environ.get(env) or "auto"
            values[name] = text.strip().lower() if env == SERVE_DEVICE_ENV else text  # as devices.py
        problems = _choice_problems(values, _CHOICES)
        numbers, bad = _parse_numbers(environ, _NUMBERS)
        values.update(numbers)
        values["allow_local_lora_weights"] = environ.get(LOCAL_LORA_ENV, "").strip().lower() in _TRUE
        _raise(problems + bad, "serving")
        return cls(**values)


@dataclass(frozen=True)
class TrainSettings:
    """What a training run takes from the environment besides its TrainConfig (the flags, which
    cli.py fills from the seed's variables MICRO_BATCH_SIZE, DATA_PATH, ...). The defaults are those
    of an unset environment; an unset or blank variable is its default.

    Not here: TRAIN_JEMALLOC, read by `jemalloc_from_env` alone, as the allocator restarts the
    process before any setting is parsed and must not fail on another variable's bad value; and
    torchrun's WORLD_SIZE, LOCAL_RANK and RANK, which are not settings a user chooses but facts
    torchrun gives each process (distributed.init_distributed reads them beside
    torch.distributed, which reads the rest itself)."""

    device: str = "auto"
    """TRAIN_DEVICE: auto (the GPU where torch sees one), cuda, or cpu where torch sees no GPU."""
    strategy: str = "auto"
    """TRAIN_STRATEGY: ddp, fsdp, or auto (the memory plan's choice) for runs under torchrun."""
    base_model: str | None = None
    """BASE_MODEL: the base for runs without --base_model (a folder or hub id); None: the embedded one."""
    checkpoint_dir: Path | None = None
    """TRAINING_CHECKPOINT_DIR: where the train service's trainings work and stopped ones keep their
    checkpoints; None: finetune/training-checkpoints in the user's cache folder."""
    cache_home: Path | None = None
    """XDG_CACHE_HOME: the user's cache folder; None: ~/.cache."""
    checkpoints_kept: int = 8
    """TRAINING_CHECKPOINT_KEEP: stopped trainings the train service keeps, newest first."""

    def __post_init__(self) -> None:
        _raise(self.problems(), "training")

    @property
    def checkpoint_root(self) -> Path:
        """The train service's folder of trainings: TRAINING_CHECKPOINT_DIR, else in the cache."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        return (self.cache_home or Path.home() / ".cache") / "finetune" / "training-checkpoints"

    def problems(self) -> list[str]:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return _choice_problems(values, _TRAIN_CHOICES) + _range_problems(values, _TRAIN_NUMBERS)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> TrainSettings:
        """The settings `environ` gives (an unset or blank variable: the default), every value
        checked; a SettingsError lists all the bad ones."""
        values: dict[str, Any] = {
            name: (_given(environ, env) or "auto").strip().lower() for name, env, _, _ in _TRAIN_CHOICES
        }
        values["base_model"] = base_model_from_env(environ)
        for name, env in (("checkpoint_dir", CHECKPOINT_DIR_ENV), ("cache_home", CACHE_HOME_ENV)):
            text = _given(environ, env)
            values[name] = None if text is None else Path(text).expanduser()
        numbers, bad = _parse_numbers(environ, _TRAIN_NUMBERS)
        values.update(numbers)
        _raise(_choice_problems(values, _TRAIN_CHOICES) + bad, "training")
        return cls(**values)


def base_model_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """BASE_MODEL: a model folder or hub id in place of the embedded default; None where unset.
    TrainSettings holds it for a training; weights.resolve_base_model reads it here for the callers
    that name no base (the server, export, evaluation)."""
    return _given(environ, BASE_MODEL_ENV)


def jemalloc_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """TRAIN_JEMALLOC: auto (the system's jemalloc), off, or a library path or name to preload.
    Any value is valid; a library that cannot be loaded is reported where it is preloaded."""
    return (environ.get(JEMALLOC_ENV) or "").strip() or "auto"


# (field, variable, allowed values, what the message calls a bad one)
_Choices = tuple[tuple[str, str, tuple[str, ...], str], ...]
_CHOICES: _Choices = (
    ("device", SERVE_DEVICE_ENV, DEVICES, " is not a device"),
    ("dtype", DTYPE_ENV, DTYPES, " is not a dtype"),
    ("quantization", QUANT_ENV, QUANT_MODES, ""),
    ("compile", COMPILE_ENV, COMPILE_MODES, ""),
)
_TRAIN_CHOICES: _Choices = (
    ("device", TRAIN_DEVICE_ENV, DEVICES, " is not a device"),
    ("strategy", STRATEGY_ENV, ("auto", *STRATEGIES), " is not a training strategy"),
)
# What to use, where the allowed values need saying more than "one of ...".
_USE = {
    STRATEGY_ENV: "ddp (a whole model per process), fsdp (the model sharded over the processes) or auto",
}
# (field, variable, int or float, least value)
_Numbers = tuple[tuple[str, str, type, float], ...]
_NUMBERS: _Numbers = (
    ("max_batch", MAX_BATCH_ENV, int, 1),
    ("kv_tokens", KV_TOKENS_ENV, int, 1),
    ("prefill_chunk", PREFILL_CHUNK_ENV, int, 1),
    ("prefix_tokens", PREFIX_CACHE_ENV, int, 0),
    ("queue_timeout_s", QUEUE_TIMEOUT_ENV, float, 0),
    ("max_waiting", MAX_WAITING_ENV, int, 1),
    ("adapter_cache_size", ADAPTER_CACHE_ENV, int, 0),
    ("max_adapters_in_use", ADAPTERS_IN_USE_ENV, int, 1),
    ("download_deadline_s", DOWNLOAD_DEADLINE_ENV, float, 1),
    ("stall_s", STALL_ENV, float, 0.001),
)
_TRAIN_NUMBERS: _Numbers = (("checkpoints_kept", CHECKPOINT_KEEP_ENV, int, 1),)


def _given(environ: Mapping[str, str], env: str) -> str | None:
    """The variable's text; None where it is unset or blank."""
    text = environ.get(env)
    return text if text is not None and text.strip() else None


def _choice_problems(values: Mapping[str, Any], table: _Choices) -> list[str]:
    return [
        f"{env}={values[name]!r}{what}: use {_USE.get(env) or 'one of ' + ', '.join(choices)}"
        for name, env, choices, what in table
        if values[name] not in choices
    ]


def _range_problems(values: Mapping[str, Any], table: _Numbers) -> list[str]:
    return [
        _number_problem(env, values[name], kind, minimum)
        for name, env, kind, minimum in table
        if values[name] is not None and not _in_range(values[name], kind, minimum)
    ]


def _parse_numbers(environ: Mapping[str, str], table: _Numbers) -> tuple[dict[str, Any], list[str]]:
    """The numbers `environ` sets (unset or blank: left out), and a problem for each bad one."""
    values: dict[str, Any] = {}
    problems = []
    for name, env, kind, minimum in table:
        text = _given(environ, env)
        if text is None:
            continue
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not _in_range(value, kind, minimum):
            problems.append(_number_problem(env, text, kind, minimum))
        else:
            values[name] = value
    return values, problems


def _in_range(value: Any, kind: type, minimum: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        return False
    return not math.isnan(value) and value >= minimum  # nan compares false with everything


def _number_problem(env: str, value: Any, kind: type, minimum: float) -> str:
    return f"{env}={value!r}: use {'a whole number' if kind is int else 'a number'} >= {minimum}"


def _raise(problems: list[str], side: str) -> None:
    if len(problems) == 1:
        raise SettingsError(problems[0])
    if problems:
        raise SettingsError(f"{len(problems)} {side} settings are invalid:\n  - " + "\n  - ".join(problems))
