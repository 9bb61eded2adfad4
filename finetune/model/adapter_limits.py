"""What a served LoRA adapter may be. Adapters reach the server from strangers (`lora_weights`), and
PEFT trusts its config: a huge `r` allocates gigabytes, a `target_modules` string is matched as a
regex against every module name, `init_lora_weights` = pissa/olora/loftq/eva rewrites the shared base
weights, `modules_to_save`/`bias` swap or retrain base parameters. So the server reads every JSON file
of an adapter under a byte cap, accepts a whitelist of plain LoRA settings, checks that the
safetensors file holds exactly the tensors that config implies (names, shapes, dtypes, offsets) from
its header alone, and hands PEFT a LoraConfig it built itself, never the file's."""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAX_JSON_BYTES = 1 << 20  # adapter_config.json, training_card.json, prompt_template.json
MAX_HEADER_BYTES = 16 << 20  # a safetensors header: ~100 bytes a tensor
# The LoRA settings a served adapter may set; everything else in adapter_config.json must hold its
# default (or be a key this PEFT does not know, which is never passed on).
INITS = (True, False, "gaussian")
DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


class AdapterRefused(ValueError):
    """An adapter outside what this server serves; the message names the field and the fix."""


@dataclass(frozen=True)
class AdapterBounds:
    max_rank: int = 256
    max_alpha: float = 4096.0


def read_json(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of an adapter, read under a byte cap before anything parses it."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise AdapterRefused(f"{what} cannot be read ({exc.strerror})") from None
    if len(data) > limit:
        raise AdapterRefused(f"{what} is over {limit // 1024} KB; an adapter's JSON files are small")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(f"{what} is not valid JSON ({exc}); write it again") from None


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """The base model's linear layers, name -> (in, out): what a LoRA adapter may target. Under a
    PeftModel the names are the base's (LoRA wrappers and their sublayers are not targets)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = {}
    for name, module in base.named_modules():
        if "lora_" in name or "base_layer" in name:
            continue
        layer = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if isinstance(layer, torch.nn.Linear):
            out[name] = (layer.in_features, layer.out_features)
    return out


def _suffixes(names: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """PEFT matches a list entry against a module name exactly or as a dotted suffix."""
    out: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            out.setdefault(".".join(parts[i:]), []).append(name)
    return out


@functools.cache
def _defaults() -> dict[str, Any]:
    from peft import LoraConfig

    return LoraConfig().to_dict()


# Settings check_config checks one by one (use_dora too); any other must keep PEFT's default.
_CHECKED_KEYS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "task_type",
    "target_modules", "base_model_name_or_path", "revision", "peft_version", "inference_mode",
    "auto_mapping", "use_dora",
}  # fmt: skip


def check_config(config: Any, linears: dict[str, tuple[int, int]], bounds: AdapterBounds) -> dict[str, Any]:
    """The validated settings of an adapter_config.json (r, alpha, targets, ...), or AdapterRefused
    naming every problem at once."""
    if not isinstance(config, dict):
        raise AdapterRefused(f"adapter_config.json must hold a JSON object, not {type(config).__name__}")
    problems: list[str] = []
    _check_lora_values(config, bounds, problems)
    matched = _check_targets(config.get("target_modules"), linears, problems)
    _check_defaults(config, problems)
    if problems:
        raise AdapterRefused("; ".join(problems))
    return {
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha", 8),
        "lora_dropout": float(config.get("lora_dropout", 0.0)),
        "use_rslora": bool(config.get("use_rslora", False)),
        "target_modules": matched,
    }


def _check_lora_values(config: dict, bounds: AdapterBounds, problems: list[str]) -> None:
    """The LoRA settings a served adapter may choose: its type, rank, scale, dropout and init."""
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {str(config.get('peft_type'))[:40]!r}: only LORA adapters are served")
    r = config.get("r")
    if type(r) is not int or not 1 <= r <= bounds.max_rank:
        problems.append(f"r = {str(r)[:40]}: use a whole number from 1 to {bounds.max_rank}")
    alpha = config.get("lora_alpha", 8)
    if type(alpha) not in (int, float) or not 0 < alpha <= bounds.max_alpha or not math.isfinite(alpha):
        problems.append(
            f"lora_alpha = {str(alpha)[:40]}: use a number above 0 and at most {bounds.max_alpha:g}"
        )
    dropout = config.get("lora_dropout", 0.0)
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        problems.append(f"lora_dropout = {str(dropout)[:40]}: use a number from 0 to below 1")
    if type(config.get("use_rslora", False)) is not bool:
        problems.append("use_rslora must be true or false")
    init = config.get("init_lora_weights", True)
    if not any(init is x or (isinstance(x, str) and init == x) for x in INITS):
        problems.append(
            f"init_lora_weights = {str(init)[:40]!r}: served adapters use plain initialisation (true, false "
            "or gaussian); pissa/olora/loftq/eva/corda rewrite the base weights"
        )
    if config.get("use_dora"):
        problems.append(
            "DoRA adapters (use_dora) cannot share a batch with other adapters, and this server batches "
            "requests; train a plain LoRA adapter, or merge this one into the base weights and serve those"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type {str(config.get('task_type'))[:40]!r}: use CAUSAL_LM")


def _check_targets(targets: Any, linears: dict[str, tuple[int, int]], problems: list[str]) -> list[str]:
    """The base model's linear layers that `target_modules` names (sorted), or [] with a problem
    when it is not a list of the base model's linear layer names."""
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        problems.append(
            'target_modules must be a list of module names (e.g. ["q_proj", "v_proj"]); a string is a '
            "pattern, which this server does not match"
        )
        return []
    if len(targets) > len(linears):
        problems.append(
            f"target_modules lists {len(targets)} names; this base model has {len(linears)} linear layers"
        )
        return []
    by_suffix = _suffixes(linears)
    unknown = [t for t in targets if t not in by_suffix]
    if unknown:
        problems.append(
            f"target_modules {[u[:60] for u in unknown[:5]]} are not linear layers of this base model "
            f"(its layers end in {sorted({n.rsplit('.', 1)[-1] for n in linears})})"
        )
    return sorted({name for t in targets for name in by_suffix.get(t, [])})


def _check_defaults(config: dict, problems: list[str]) -> None:
    """Every other setting this PEFT knows must keep its default; unknown ones are never passed on."""
    defaults = _defaults()
    for key, value in config.items():
        if key in _CHECKED_KEYS or key not in defaults:
            continue
        default = defaults[key]
        if value != default and (value or default):
            problems.append(
                f"{key} = {json.dumps(value)[:60]}: served adapters leave it at {json.dumps(default)}"
            )


def expected_tensors(settings: dict[str, Any], linears: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """The tensor names and shapes PEFT saves for these settings."""
    r = settings["r"]
    out = {}
    for name in settings["target_modules"]:
        fan_in, fan_out = linears[name]
        out[f"base_model.model.{name}.lora_A.weight"] = [r, fan_in]
        out[f"base_model.model.{name}.lora_B.weight"] = [fan_out, r]
    return out


def check_tensors(path: Path, expected: dict[str, list[int]]) -> None:
    """The safetensors file holds exactly these tensors, in a float dtype, within the file: read from
    its header alone, before anything is allocated for it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or n > min(MAX_HEADER_BYTES, size - 8):
                raise AdapterRefused("adapter_model.safetensors has no valid header; save the adapter again")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise AdapterRefused(f"adapter_model.safetensors cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterRefused(
            "adapter_model.safetensors has no valid header; save the adapter again"
        ) from None
    if not isinstance(header, dict):
        raise AdapterRefused("adapter_model.safetensors has no valid header; save the adapter again")
    header.pop("__metadata__", None)
    extra = sorted(set(header) - set(expected))
    missing = sorted(set(expected) - set(header))
    if extra or missing:
        raise AdapterRefused(
            "adapter_model.safetensors does not match adapter_config.json: "
            + (f"unexpected tensors {[k[:80] for k in extra[:3]]}" if extra else "")
            + ("; " if extra and missing else "")
            + (f"missing {[k[:80] for k in missing[:3]]}" if missing else "")
        )
    data = size - 8 - n
    for key, info in header.items():
        ok = isinstance(info, dict) and info.get("dtype") in DTYPES and info.get("shape") == expected[key]
        offsets = info.get("data_offsets") if ok else None
        if ok and not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
            and offsets[1] - offsets[0] == math.prod(expected[key]) * DTYPES[info["dtype"]]
        ):
            ok = False
        if not ok:
            raise AdapterRefused(
                f"adapter_model.safetensors: tensor {key[:80]} must be a float tensor of shape {expected[key]} "
                "inside the file; save the adapter again"
            )


def check_adapter(folder: Path, linears: dict[str, tuple[int, int]], bounds: AdapterBounds) -> Any:
    """A PEFT LoraConfig for this adapter folder, built from its validated settings (the folder's own
    config never reaches PEFT), or AdapterRefused."""
    from peft import LoraConfig

    from .loading import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    settings = check_config(read_json(folder / ADAPTER_CONFIG, ADAPTER_CONFIG), linears, bounds)
    check_tensors(folder / ADAPTER_WEIGHTS, expected_tensors(settings, linears))
    # init_lora_weights=False: the weights come from the file, so PEFT need not draw random ones.
    return LoraConfig(
        **settings, bias="none", task_type="CAUSAL_LM", init_lora_weights=False, inference_mode=True
    )
