"""The merged model for `export`, one tensor at a time: memory holds the tensor being merged (and,
for `hf`, the output shard being filled), never the whole model.

- `Checkpoint`: a base stored as safetensors, one file or transformers' index of shards. Each tensor
  is read through its own `safe_open`: a handle kept open keeps every page it has read resident,
  which by the end is the whole file.
- `Lora`: the adapter, checked by adapter_limits.py (settings and tensor shapes, not the raw JSON); its
  delta `scale * B @ A` is added in fp32 and the sum checked for NaN/inf before it is cast back.
- `MergedTensors`: the tensors an export writes, by the model's own names, merged and cast on demand.
  A base stored as .bin/.pth, or a DoRA adapter, falls back to loading the whole model and merging
  through PEFT (`safe_merge`); the tensors are then taken out of it one by one.
- Writers: `write_hf_shards` (safetensors shards of bounded size, each written and closed before the
  next is gathered) and `write_torch_file` (torch.save's zip format written tensor by tensor, which
  torch.save itself cannot: it takes one dict holding everything).
"""

from __future__ import annotations

import collections
import copy
import io
import json
import math
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ExportError
from ..model.adapter_folder import CARD_JSON
from ..model.adapter_limits import (
    AdapterBounds,
    AdapterRefused,
    check_config,
    check_tensors,
    expected_tensors,
    linear_shapes,
)
from ..model.adapter_limits import read_json as read_capped_json
from ..model.loading import ADAPTER_CONFIG, ADAPTER_WEIGHTS, attach_adapter, check_identity

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "2GB"
# Adapters an export merges are the user's own: the trainer's limits (r up to 1024, any positive
# alpha), not the server's, which also guard its memory against strangers' adapters.
EXPORT_BOUNDS = AdapterBounds(max_rank=1024, max_alpha=1e6)


def brief(exc: BaseException) -> str:
    """An exception as one line: torch's state-dict errors put the useful part on their second line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(exc).__name__


# --- the base --------------------------------------------------------------------------------------


class Checkpoint:
    """A base model's safetensors: tensor name -> the file holding it, shape and stored dtype, read
    from the headers alone."""

    def __init__(self, files: Iterable[Path]) -> None:
        from safetensors import SafetensorError, safe_open

        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in files:
            try:
                with safe_open(path, "pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                        view = f.get_slice(name)
                        self.files[name] = path
                        self.shapes[name], self.dtypes[name] = tuple(view.get_shape()), view.get_dtype()
            except (OSError, SafetensorError) as exc:
                raise ExportError(f"could not read {path} as safetensors: {brief(exc)}") from exc

    @classmethod
    def find(cls, base: str) -> Checkpoint | None:
        """The base's safetensors (a local folder or the hub cache), or None when it has none."""
        from transformers.utils import cached_file

        def fetch(name: str) -> Path | None:
            found = cached_file(base, name, _raise_exceptions_for_missing_entries=False)
            return Path(found) if found else None

        index = fetch(INDEX_FILE)
        if index is None:
            single = fetch(SINGLE_FILE)
            return cls([single]) if single else None
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            raise ExportError(f"{index} is not a safetensors index: {brief(exc)}") from exc
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards or not all(isinstance(s, str) and Path(s).name == s for s in shards):
            raise ExportError(f"{index} must map tensor names to shard file names in its weight_map")
        paths = [fetch(shard) for shard in shards]
        missing = [shard for shard, path in zip(shards, paths, strict=True) if path is None]
        if missing:
            raise ExportError(f"{index} names shards that are missing: {', '.join(missing[:3])}")
        return cls(p for p in paths if p is not None)

    def stored_dtype(self) -> torch.dtype | None:
        """The float dtype most of the weights are stored in."""
        counts: collections.Counter[torch.dtype] = collections.Counter()
        for name, code in self.dtypes.items():
            if code in SAFETENSORS_DTYPES:
                counts[SAFETENSORS_DTYPES[code]] += math.prod(self.shapes[name])
        return counts.most_common(1)[0][0] if counts else None

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], "pt") as f:  # closed at once: see the module docstring
            return f.get_tensor(name)


def model_dtype(config: Any, checkpoint: Checkpoint | None) -> torch.dtype:
    """The base's own dtype: config.json's `dtype` (`torch_dtype` before transformers 5), else the
    dtype its weights are stored in, else float32."""
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = TORCH_DTYPES.get(declared)
    if declared in TORCH_DTYPES.values():
        return declared
    return (checkpoint and checkpoint.stored_dtype()) or torch.float32


def skeleton(config: Any) -> Any:
    """The model built on the meta device: its tensor names, shapes and linear layers, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise ExportError(f"transformers cannot build a causal LM from this config: {brief(exc)}") from exc


# --- the adapter -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lora:
    """A checked LoRA adapter: the base tensors it changes (`...q_proj.weight`) and its scale."""

    folder: Path
    targets: frozenset[str]
    scale: float
    dora: bool

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """weight + scale * B @ A in fp32, as PEFT's merge computes it, or ExportError on NaN/inf."""
        from safetensors import safe_open

        module = name.removesuffix(".weight")
        with safe_open(self.folder / ADAPTER_WEIGHTS, "pt") as f:
            a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").float()
            b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
        merged = weight.float()  # `weight` is the caller's own copy (read for this merge alone)
        delta = b @ a
        delta *= self.scale  # in place: one delta-sized temporary, the same values as PEFT's
        merged += delta
        if not torch.isfinite(merged).all():
            raise ExportError(
                f"merging adapter {self.folder} into {name} gives NaN or inf values; retrain it or use an "
                "earlier checkpoint"
            )
        return merged


def check_lora(folder: Path, linears: dict[str, tuple[int, int]], base: str) -> Lora:
    """The adapter's settings through adapter_limits.py's checks (the folder's JSON never reaches PEFT or
    the merge unchecked) and its tensors' names and shapes against this base."""
    raw = _adapter_json(folder, ADAPTER_CONFIG)
    # PEFT merges DoRA (a magnitude per output row on top of B @ A); the rest of the config must
    # still be plain LoRA.
    dora = isinstance(raw, dict) and raw.get("use_dora") is True
    try:
        settings = check_config({**raw, "use_dora": False} if dora else raw, linears, EXPORT_BOUNDS)
    except AdapterRefused as exc:
        raise ExportError(f"adapter {folder} cannot be merged: {exc}") from exc
    if not dora:  # DoRA adds magnitude tensors to the file; PEFT checks those when it loads them
        try:
            check_tensors(folder / ADAPTER_WEIGHTS, expected_tensors(settings, linears))
        except AdapterRefused as exc:
            raise ExportError(f"adapter {folder} does not fit base model {base}: {exc}") from exc
    r, alpha = settings["r"], settings["lora_alpha"]
    return Lora(
        folder=folder,
        targets=frozenset(f"{module}.weight" for module in settings["target_modules"]),
        scale=alpha / math.sqrt(r) if settings["use_rslora"] else alpha / r,
        dora=dora,
    )


def _adapter_json(folder: Path, name: str) -> Any:
    try:
        return read_capped_json(folder / name, name)
    except AdapterRefused as exc:
        raise ExportError(f"adapter {folder}: {exc}") from exc


def check_card(folder: Path, model: Any) -> None:
    """The training card's base identity against this base (before any shape: an adapter for another
    base is named as such)."""
    if not (folder / CARD_JSON).is_file():
        return
    card = _adapter_json(folder, CARD_JSON)
    if isinstance(card, dict) and isinstance(card.get("base_model"), dict):
        check_identity(card["base_model"], model, str(folder))


# --- merged tensors --------------------------------------------------------------------------------


def _aliases(model: Any) -> dict[str, str]:
    """Each parameter name -> the first name of the same parameter (tied weights share one)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


class MergedTensors:
    """The tensors of the merged model by the model's own names, each read, merged, checked and cast
    when asked for. `read` gives a tensor by a name in `stored` (a tied name reads the tensor it is
    tied to when `stored` lacks it); `lora` (None: nothing to merge) adds its deltas."""

    def __init__(
        self,
        config: Any,
        model: Any,
        read: Callable[[str], torch.Tensor],
        stored: Container[str],
        lora: Lora | None = None,
    ) -> None:
        self.read, self.stored, self.lora = read, stored, lora
        self.architecture = type(model).__name__
        self.aliases = _aliases(model)
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
        # A delta on a tied head (lm_head over the input embeddings) leaves the embeddings as they
        # are: the merged head becomes a tensor of its own.
        self.untied = {n for n in (lora.targets if lora else ()) if self.aliases.get(n, n) != n}
        self.config = copy.deepcopy(config)
        if self.untied:
            self.config.tie_word_embeddings = False
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))

    def names(self) -> list[str]:
        """The tensors a Hugging Face folder of this model holds (a tied copy left out)."""
        return [n for n in self.shapes if self.aliases.get(n, n) == n or n in self.untied]

    def missing(self) -> list[str]:
        """The names this model needs that the stored tensors lack under any of their tied names."""
        return [n for n in self.names() if n not in self.stored and self.aliases.get(n, n) not in self.stored]

    def take(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The merged tensor `name` in `dtype` (float tensors; others as stored)."""
        key = name if name in self.stored else self.aliases.get(name, name)
        tensor = self.read(key)
        if tuple(tensor.shape) != self.shapes[name]:
            raise ExportError(
                f"the base's {key} has shape {tuple(tensor.shape)}, but its config.json implies "
                f"{self.shapes[name]}; the weights do not belong to this config"
            )
        if self.lora is not None and name in self.lora.targets:
            tensor = self.lora.merge(name, tensor)
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        out = tensor.to(dtype)
        # float16 tops out at 65504: a cast can overflow where the stored or merged values did not
        if not torch.isfinite(out).all():
            peak = tensor.float().abs().max().item()
            raise ExportError(
                f"{name} holds values up to {peak:g}, beyond {str(dtype).removeprefix('torch.')}'s range; "
                "use --dtype float32 or bfloat16"
            )
        return out


def load_whole(base: str, adapter: Path | None, dtype: torch.dtype, reason: str) -> MergedTensors:
    """The old way, for what cannot stream: the whole model loads and PEFT merges the adapter with
    `safe_merge` (which refuses NaN/inf); tensors are then taken out of it one at a time, so writing
    holds no second copy."""
    from transformers import AutoModelForCausalLM

    print(f"note: {reason}, so the whole model is loaded and merged in memory", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except OSError as exc:
        raise ExportError(f"could not load base model {base}: {brief(exc)}") from exc
    if adapter is not None:
        try:
            peft_model = attach_adapter(model, adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ExportError(f"adapter {adapter} does not fit base model {base}: {brief(exc)}") from exc
        try:
            model = peft_model.merge_and_unload(safe_merge=True)
        except ValueError as exc:
            raise ExportError(
                f"merging adapter {adapter} failed ({brief(exc)}); retrain it or use an earlier checkpoint"
            ) from exc
    aliases = _aliases(model)
    tied = {name for pair in aliases.items() if pair[0] != pair[1] for name in pair}

    def release(name: str) -> torch.Tensor:
        # An empty tensor stays behind, so the weight's memory goes once it is written; tied
        # weights stay, another name still reads them.
        module, _, attr = name.rpartition(".")
        held = getattr(model.get_submodule(module), attr)
        tensor = held.data
        if isinstance(held, torch.nn.Parameter) and name not in tied:
            held.data = torch.empty(0, dtype=tensor.dtype)
        return tensor

    return MergedTensors(model.config, model, release, stored=model.state_dict(keep_vars=True))


def open_merged(
    base: str, config: Any, adapter: Path | None, checkpoint: Checkpoint | None, load_dtype: torch.dtype
) -> MergedTensors:
    """The base with `adapter` merged in: streamed from `checkpoint` when it can be, else loaded whole
    in `load_dtype` (a log line says why)."""
    model = skeleton(config)
    lora = None
    if adapter is not None:
        check_card(adapter, model)
        lora = check_lora(adapter, linear_shapes(model), base)
    if checkpoint is None:
        reason = "the base stores its weights as .bin/.pth, not safetensors"
    elif lora is not None and lora.dora:
        reason = "the adapter is DoRA, which PEFT merges"
    else:
        source = MergedTensors(config, model, checkpoint.read, stored=checkpoint.files, lora=lora)
        missing = source.missing()
        if not missing:
            return source
        reason = f"the base's safetensors name its tensors otherwise than the model (no {missing[0]})"
    return load_whole(base, adapter, load_dtype, reason)


# --- writers ---------------------------------------------------------------------------------------


def write_hf_shards(source: MergedTensors, folder: Path, dtype: torch.dtype, max_bytes: int) -> list[str]:
    """The weights as safetensors files of at most `max_bytes` each (a single larger tensor gets a
    file of its own), with transformers' index when there are several; return the file names."""
    from safetensors.torch import save_file

    groups: list[list[str]] = []
    parts: list[Path] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0

    def flush() -> None:
        parts.append(folder / f".part-{len(parts):05d}.safetensors")
        save_file(pending, parts[-1], metadata={"format": "pt"})
        groups.append(list(pending))
        pending.clear()

    for name in tqdm(source.names(), desc="hf tensors", unit="tensor"):
        tensor = source.take(name, dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_bytes:
            flush()
            pending_bytes = 0
        pending[name] = tensor
        pending_bytes += size
        total += size
    if pending:
        flush()
    if len(parts) == 1:
        parts[0].rename(folder / SINGLE_FILE)
        return [SINGLE_FILE]
    names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
    for part, final in zip(parts, names, strict=True):
        part.rename(folder / final)
    weight_map = {t: final for final, group in zip(names, groups, strict=True) for t in group}
    index = {
        "metadata": {"total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


# torch.save's zip layout: storage records start on 64-byte boundaries, so that torch.load(mmap=True)
# maps them in place.
TORCH_ALIGNMENT = 64
_ZIP_HEADER = 30  # a local file header before its name
_ZIP64_EXTRA = 20  # the sizes a zip64 local header adds
_EPOCH = (1980, 1, 1, 0, 0, 0)
_STORAGE_TYPES = {
    torch.float32: torch.FloatStorage,
    torch.bfloat16: torch.BFloat16Storage,
    torch.float16: torch.HalfStorage,
}


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRecord:
    """Pickles as torch.save pickles a contiguous tensor: its storage by key, no data."""

    storage: _Storage
    shape: tuple[int, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        stride = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        args = (self.storage, 0, self.shape, stride, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _StatePickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", _STORAGE_TYPES[obj.dtype], obj.key, "cpu", obj.numel)
        return None


def write_torch_file(
    path: Path,
    entries: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    tensors: Iterator[torch.Tensor],
) -> None:
    """What `torch.save(dict(zip(names, tensors)), path)` writes (`torch.load(weights_only=True)`
    reads it back), but each tensor of `tensors` goes to the file as it comes: the dict's pickle
    holds only each tensor's dtype, shape and storage key, and the storages follow it one by one."""
    records = {
        name: _TensorRecord(_Storage(str(i), dtype, math.prod(shape)), shape)
        for i, (name, shape) in enumerate(entries)
    }
    pickled = io.BytesIO()
    _StatePickler(pickled, protocol=2).dump(records)  # torch.save's protocol
    prefix = path.stem
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
        for name, data in (
            ("data.pkl", pickled.getvalue()),
            (".format_version", b"1"),
            (".storage_alignment", str(TORCH_ALIGNMENT).encode()),
            ("byteorder", sys.byteorder.encode()),
        ):
            archive.writestr(zipfile.ZipInfo(f"{prefix}/{name}", _EPOCH), data)
        for (name, shape), record, tensor in zip(entries, records.values(), tensors, strict=True):
            assert tuple(tensor.shape) == shape and tensor.dtype == dtype, name
            data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
            info = zipfile.ZipInfo(f"{prefix}/data/{record.storage.key}", _EPOCH)
            info.file_size = data.nbytes
            # Pad the local header's extra field (torch pads the same way) so the data is aligned.
            fixed = f.tell() + _ZIP_HEADER + len(info.filename.encode()) + 4 + _ZIP64_EXTRA
            pad = -fixed % TORCH_ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
            with archive.open(info, "w", force_zip64=True) as out:
                assert f.tell() % TORCH_ALIGNMENT == 0
                out.write(memoryview(data))
        archive.writestr(zipfile.ZipInfo(f"{prefix}/version", _EPOCH), b"3")
