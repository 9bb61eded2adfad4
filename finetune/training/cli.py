"""`python finetune.py` / `python -m finetune train`: alpaca-lora's flag names plus ours, the seed's
environment variables (MICRO_BATCH_SIZE, DATA_PATH, ...), flags winning. Every default and help
text comes from the dataclasses in config.py.

Those variables are the flags' defaults, one per TrainConfig field, so they are read here with the
flags (`config_from_args`), each checked by its flag's own parser. The machine's settings
(TRAIN_DEVICE, TRAIN_STRATEGY, ...) are TrainSettings (settings.py), parsed once in `main`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from typing import Any

from ..config import DataConfig, LoraSettings, TrainConfig, field_doc, parse_bool, parse_list
from ..settings import BASE_MODEL_ENV, TrainSettings

SECTIONS: dict[str, type] = {"": TrainConfig, "data": DataConfig, "lora": LoraSettings}
# The seed's environment names that differ from the upper-cased flag name.
ENV_ALIASES = {"EPOCHS": "num_epochs", BASE_MODEL_ENV: "base_model"}


def _fields() -> list[tuple[str, type, dataclasses.Field[Any]]]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS:
                continue
            out.append((section, hints[f.name], f))
    return out


def parse_auto_float(text: str) -> float | None:
    """A number, or "auto" for the value the trainer derives from the data."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def parse_auto_bool(text: str) -> bool | None:
    """true or false, or "auto" for what the memory plan decides."""
    return None if text.strip().lower() == "auto" else parse_bool(text)


def _converter(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args == [float] and len(typing.get_args(tp)) == 2:  # float | None: None reads as "auto"
        return parse_auto_float
    if args == [bool] and len(typing.get_args(tp)) == 2:  # bool | None: None reads as "auto"
        return parse_auto_bool
    if tp is bool:
        return parse_bool
    if origin is list:
        return parse_list
    if origin is typing.Literal:
        return str
    if args and origin is not None:  # Optional[X]
        return _converter(args[0])
    return tp


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune a LoRA adapter on an instruction dataset. Environment variables named like the "
        "flags in upper case (MICRO_BATCH_SIZE, DATA_PATH, EPOCHS, ...) set defaults; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section, tp, f in _fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {
            "type": _converter(tp),
            "default": "auto"
            if _converter(tp) in (parse_auto_float, parse_auto_bool) and default is None
            else default,
            "help": field_doc(SECTIONS[section], f.name) or " ",
        }
        if tp is bool:
            kwargs.update(nargs="?", const=True)
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def config_from_args(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainConfig:
    environ = os.environ if environ is None else environ
    parser = build_parser()
    # Environment first, as defaults; explicit flags override them.
    env_defaults: dict[str, Any] = {}
    names = {f.name for _, _, f in _fields()}
    converters = {f.name: _converter(tp) for _, tp, f in _fields()}
    for key, value in environ.items():
        name = ENV_ALIASES.get(key, key.lower())
        if name in names and (key.isupper()) and value != "":
            try:
                env_defaults[name] = converters[name](value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"environment variable {key}={value!r}: {exc}")
    parser.set_defaults(**env_defaults)
    args = vars(parser.parse_args(argv))
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, _, f in _fields():
        parts[section][f.name] = args[f.name]
    return TrainConfig(**parts[""], data=DataConfig(**parts["data"]), lora=LoraSettings(**parts["lora"]))


def main(argv: list[str] | None = None) -> int:
    from ..errors import user_errors
    from ..model.devices import train_device
    from .distributed import shutdown
    from .stopping import TrainingStopped
    from .trainer import train

    try:
        cfg = config_from_args(argv)
        settings = TrainSettings.from_env()  # every bad variable fails here, named together
        train_device(settings.device)  # a GPU image whose GPU torch cannot use fails here, not hours later
        train(cfg, settings=settings)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        shutdown()  # every rank stops at the same step, so all of them get here
        return 143
    shutdown()
    return 0
