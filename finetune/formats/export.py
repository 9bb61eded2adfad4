"""Export a base model with a LoRA adapter merged in as one standalone model:

- `hf`: a Hugging Face folder (safetensors, tokenizer, generation config);
- `meta`: Meta's original layout (`<size>/consolidated.00.pth` + `params.json`, `tokenizer.model`),
  which `python -m finetune convert-meta` reads back;
- `gguf`: a llama.cpp file (architecture "llama") in f32, f16 or q8_0.

hf and meta are written in the base's own dtype unless --dtype says otherwise; gguf in f16. The merge
streams (export_stream.py): each tensor is read from the base's safetensors, merged with the
adapter's delta, checked for NaN/inf and written out before the next is read, so memory holds one
tensor (one output shard for hf), not the model; a .bin/.pth base or a DoRA adapter is merged whole
through PEFT, as before. This module is the command and the hf writer; the meta and gguf writers
live in export_llama.py. Everything is written into a temporary sibling folder that is renamed into
place at the end: a failure never leaves a half-written output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..data.prompts import ADAPTER_TEMPLATE_FILE
from ..errors import ExportError, user_errors
from ..model.adapter_folder import CARD_JSON
from ..model.loading import check_adapter_dir
from ..model.weights import MARKER, resolve_base_model
from ..staging import staged_dir
from .export_llama import GGUF_TYPES, check_llama_layout, gguf_vocab, meta_params, write_gguf, write_meta
from .export_stream import (
    DEFAULT_MAX_SHARD_SIZE,
    TORCH_DTYPES,
    Checkpoint,
    MergedTensors,
    brief,
    model_dtype,
    open_merged,
    write_hf_shards,
)

FORMATS = ("hf", "meta", "gguf")
# hf and meta default to the base's own dtype (config.json, else its stored weights).
DEFAULT_DTYPES = {"gguf": "f16"}
DEFAULT_MODEL_SIZE = "custom"
# Files of the adapter folder that describe the model and travel with every export.
ADAPTER_EXTRAS = (CARD_JSON, ADAPTER_TEMPLATE_FILE)


# --- the command ---------------------------------------------------------------------------------


def _check_output(output_dir: Path) -> None:
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ExportError(
            f"{output_dir} already exists and is not empty; delete it or choose another --output_dir"
        )


@contextmanager
def _staging(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling folder that becomes output_dir only when the body finishes."""
    with staged_dir(output_dir) as tmp:
        yield tmp
        # the files too (safetensors creates owner-only ones); a server may run as another user
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        _check_output(output_dir)  # someone may have written there while we were busy


def _sentencepiece_file(base: str) -> Path | None:
    """The base's tokenizer.model (local folder or hub cache), present for sentencepiece tokenizers."""
    from transformers.utils import cached_file

    found = cached_file(base, "tokenizer.model", _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def write_hf(
    source: MergedTensors,
    tokenizer: Any,
    folder: Path,
    dtype: torch.dtype,
    base: str,
    sp_file: Path | None,
    max_shard_bytes: int,
) -> None:
    """What save_pretrained writes (safetensors, config.json, generation_config.json), shard by
    shard, and the tokenizer."""
    from transformers import GenerationConfig

    write_hf_shards(source, folder, dtype, max_shard_bytes)
    config = source.config
    config.dtype = dtype
    config.architectures = [source.architecture]
    config.save_pretrained(folder)
    try:
        generation = GenerationConfig.from_pretrained(base)
    except OSError:  # none saved: transformers derives one from config.json, as it does on load
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sp_file is not None:  # transformers 5 saves no tokenizer.model; later exports need it
        shutil.copyfile(sp_file, folder / "tokenizer.model")


def _shard_bytes(size: int | str) -> int:
    """transformers' sizes ("2GB" is 2 * 10**9 bytes, "2GiB" 2 * 2**30), or a number of bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        value = int(size) if isinstance(size, str) and size.isdigit() else convert_file_size_to_int(size)
    except ValueError:
        value = 0
    if value <= 0:
        raise ExportError(f"--max_shard_size must be a size such as 2GB or 500MB, got {size!r}")
    return value


def _check_request(fmt: str, dtype: str | None, output_dir: Path, adapter_dir: Path | None) -> None:
    """What can be refused before anything is read."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    choices = GGUF_TYPES if fmt == "gguf" else TORCH_DTYPES
    if dtype is not None and dtype not in choices:
        raise ExportError(f"--dtype for {fmt} must be one of {', '.join(choices)}, got {dtype!r}")
    _check_output(output_dir)
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ExportError(f"adapter folder {adapter_dir} does not exist")
        check_adapter_dir(adapter_dir)


def export(
    fmt: str,
    output_dir: str | Path,
    base_model: str | None = None,
    adapter: str | Path | None = None,
    dtype: str | None = None,
    model_size: str = DEFAULT_MODEL_SIZE,
    tokenizer_pre: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> tuple[Path, list[str]]:
    """Merge `adapter` into `base_model` and write it as `fmt` into `output_dir`; return the path
    written (the .gguf file for gguf, else the folder) and notes for the user. `dtype` None: the
    base's own dtype for hf and meta, f16 for gguf."""
    dtype = dtype or DEFAULT_DTYPES.get(fmt)
    output_dir = Path(output_dir).expanduser()
    adapter_dir = Path(adapter).expanduser() if adapter else None
    _check_request(fmt, dtype, output_dir, adapter_dir)
    max_shard_bytes = _shard_bytes(max_shard_size)
    base = resolve_base_model(base_model)

    # Everything the config and tokenizer can rule out is checked before any weight is read.
    config, tokenizer = _config_and_tokenizer(base)
    if fmt != "hf":
        check_llama_layout(config, fmt)
    sp_file = _sentencepiece_file(base)
    params = meta_params(config) if fmt == "meta" else {}
    vocab = gguf_vocab(tokenizer, sp_file, config.vocab_size, tokenizer_pre) if fmt == "gguf" else None

    checkpoint = Checkpoint.find(base)
    if dtype is None:
        dtype = str(model_dtype(config, checkpoint)).removeprefix("torch.")
    # gguf merges in fp32: its converter rounds each tensor once, at the end.
    torch_dtype = TORCH_DTYPES.get(dtype, torch.float32)
    source = open_merged(base, config, adapter_dir, checkpoint, torch_dtype)
    notes: list[str] = []
    written = output_dir
    with _staging(output_dir) as tmp:
        if fmt == "hf":
            write_hf(source, tokenizer, tmp, torch_dtype, base, sp_file, max_shard_bytes)
        elif fmt == "meta":
            notes = write_meta(source, tokenizer, tmp, model_size, params, sp_file, torch_dtype)
        else:
            assert vocab is not None
            filename = f"model-{dtype}.gguf"
            name = Path(base).name + (f"-{adapter_dir.name}" if adapter_dir else "")
            write_gguf(source, tokenizer, vocab, tmp / filename, dtype, name)
            written = output_dir / filename
        _write_provenance(tmp, base, adapter_dir, fmt, dtype)
    return written, notes


def _config_and_tokenizer(base: str) -> tuple[Any, Any]:
    """The base's config and tokenizer, read without any weight."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    except OSError as exc:
        raise ExportError(f"could not load base model {base}: {brief(exc)}") from exc


def _write_provenance(folder: Path, base: str, adapter_dir: Path | None, fmt: str, dtype: str) -> None:
    """The adapter's card and template files beside the export, and the marker saying what it was
    made from."""
    for extra in ADAPTER_EXTRAS:
        if adapter_dir is not None and (adapter_dir / extra).is_file():
            shutil.copyfile(adapter_dir / extra, folder / extra)
    marker = {
        "source": base,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "format": fmt,
        "dtype": dtype,
    }
    (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune export",
        description="Merge a LoRA adapter into its base model and export one standalone model",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="{hf,meta,gguf}")
    for fmt, text, dtypes in (
        ("hf", "a Hugging Face folder (safetensors)", TORCH_DTYPES),
        ("meta", "Meta's original layout (consolidated.00.pth + params.json)", TORCH_DTYPES),
        ("gguf", "a llama.cpp GGUF file", GGUF_TYPES),
    ):
        sub = formats.add_parser(fmt, help=text, description=f"Export {text}")
        sub.add_argument(
            "--base_model",
            default=None,
            help="HF folder or hub id (default: $BASE_MODEL, then the embedded model)",
        )
        sub.add_argument(
            "--adapter", default=None, help="LoRA adapter folder; omit it to export the bare base"
        )
        sub.add_argument("--output_dir", required=True, help="new (or empty) folder to write")
        sub.add_argument(
            "--dtype",
            default=DEFAULT_DTYPES.get(fmt),
            choices=list(dtypes),
            help="default: " + (DEFAULT_DTYPES.get(fmt) or "the base model's own dtype"),
        )
        if fmt == "hf":
            sub.add_argument(
                "--max_shard_size",
                default=DEFAULT_MAX_SHARD_SIZE,
                help="largest safetensors file, e.g. 2GB or 500MB (the largest tensor may exceed it)",
            )
        if fmt == "meta":
            sub.add_argument(
                "--model_size",
                default=DEFAULT_MODEL_SIZE,
                help="subfolder for consolidated.00.pth and params.json (convert-meta's --model_size)",
            )
        if fmt == "gguf":
            sub.add_argument(
                "--tokenizer_pre",
                default=None,
                help="llama.cpp pre-tokenizer name for byte-level BPE tokenizers (default: detected)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path, notes = export(
            args.format,
            args.output_dir,
            base_model=args.base_model,
            adapter=args.adapter,
            dtype=args.dtype,
            model_size=getattr(args, "model_size", DEFAULT_MODEL_SIZE),
            tokenizer_pre=getattr(args, "tokenizer_pre", None),
            max_shard_size=getattr(args, "max_shard_size", DEFAULT_MAX_SHARD_SIZE),
        )
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in notes:
        print(note)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
