"""Convert Meta's original LLaMA 1/2 checkpoints into a Hugging Face LLaMA folder.

Input: `<input_dir>/<model_size>/consolidated.NN.pth` (one file per model-parallel rank),
`params.json`, `tokenizer.model`, and optional md5 `checklist.chk` files.
Output: safetensors shards, `config.json`, `generation_config.json` and tokenizer files.

transformers no longer ships `convert_llama_weights_to_hf`, so this is our own; the tests compare
logits of the converted model with a reference forward pass in Meta's layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from tqdm import tqdm

from ..model.weights import MARKER
from ..staging import staged_dir

if TYPE_CHECKING:
    from transformers import LlamaConfig

ConvertDtype = Literal["float16", "bfloat16", "float32"]

SUPPORTED_VERSIONS = (1, 2)
DEFAULT_MAX_POSITIONS = {1: 2048, 2: 4096}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
LLAMA3_MESSAGE = (
    "Llama 3 checkpoints use a tiktoken tokenizer, which this converter does not support; "
    "download the Hugging Face release of Llama 3 instead"
)

# Meta name -> (HF name, dimension along which model-parallel ranks split it; None = replicated).
# ColumnParallelLinear splits its output features (dim 0), RowParallelLinear its input features
# (dim 1). LLaMA 1/2 use fairscale's ParallelEmbedding, which splits the embedding dimension
# (dim 1), not the vocabulary.
TOP_TENSORS: dict[str, tuple[str, int | None]] = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
# The same for each layer, under `layers.{i}.` (Meta) and `model.layers.{i}.` (HF).
LAYER_TENSORS: dict[str, tuple[str, int | None]] = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
# Meta stores precomputed rotary frequencies (`rope.freqs`); HF recomputes them from rope_theta.
IGNORED_SUFFIX = "rope.freqs"
# Text the converted tokenizer must encode exactly like sentencepiece does. Not text that starts with
# a space: transformers 5 rebuilds every LlamaTokenizer with a Metaspace pre-tokenizer, which skips
# sentencepiece's dummy prefix there (as it does for the hub's own LLaMA tokenizers).
TOKENIZER_PROBES = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "two  spaces,\ttabs and\nnew lines 1234567",
    "ünïcödé and emoji 🦙",
)


class ConversionError(Exception):
    """The input is missing, corrupt or unsupported; the message says what was expected where."""


def permute_for_hf(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """Reorder wq/wk rows from Meta's rotary layout to HF's.

    Meta rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; HF's `rotate_half` pairs
    x_i with x_{i + head_dim/2}. Within each head, rows 0, 2, 4, ... go first, then 1, 3, 5, ...
    """
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def unpermute_to_meta(w: torch.Tensor, n_heads: int, dim1: int, dim2: int) -> torch.Tensor:
    """The exact inverse of `permute_for_hf`: HF's half-split rows back to interleaved pairs."""
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    # Meta's FeedForward: 2/3 of 4*dim, optionally scaled, rounded up to a multiple of multiple_of.
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_params_to_hf_config(
    params: dict,
    vocab_size: int,
    llama_version: int,
    max_position_embeddings: int | None = None,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaConfig:
    """Translate Meta's `params.json` into a `transformers.LlamaConfig`."""
    from transformers import LlamaConfig

    if llama_version not in SUPPORTED_VERSIONS:
        raise ConversionError(f"llama_version must be one of {SUPPORTED_VERSIONS}, got {llama_version}")
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise ConversionError(f"params.json lacks {', '.join(missing)}")
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    if dim % n_heads or n_heads % n_kv_heads:
        raise ConversionError(
            f"params.json is inconsistent: dim {dim} must divide by n_heads {n_heads}, "
            f"and n_heads by n_kv_heads {n_kv_heads}"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=_ffn_hidden_size(
            dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
        ),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5),
        max_position_embeddings=max_position_embeddings or DEFAULT_MAX_POSITIONS[llama_version],
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with (
        open(path, "rb") as fh,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"md5 {path.name}") as bar,
    ):
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _verify_checklist(checklist: Path) -> None:
    """Check every file an md5sum-format checklist names, relative to the checklist's folder."""
    for number, line in enumerate(checklist.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ConversionError(f"{checklist}:{number}: expected '<md5>  <filename>', got {line!r}")
        expected, name = parts[0].lower(), parts[1].strip().lstrip("*")  # '*' marks md5sum's binary mode
        path = checklist.parent / name
        if not path.is_file():
            raise ConversionError(f"{checklist} lists {name}, but {path} does not exist; re-download it")
        if _md5(path) != expected:
            raise ConversionError(
                f"checksum mismatch for {path} (listed in {checklist}); the file is corrupt, re-download it"
            )


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only refuses arbitrary pickled objects; mmap keeps the tensors on disk until read.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ConversionError(f"could not read {path} as a PyTorch checkpoint: {exc}") from exc


def _merge(
    shards: list[dict[str, torch.Tensor]], name: str, dim: int | None, dtype: torch.dtype
) -> torch.Tensor:
    if dim is None or len(shards) == 1:
        return shards[0][name].to(dtype)
    return torch.cat([shard[name].to(dtype) for shard in shards], dim=dim)


class _SafetensorsWriter:
    """Writes tensors into safetensors files of at most `max_bytes`, so memory holds one file's worth."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size
        self.shapes[name] = tuple(tensor.shape)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Give the files their final HF names and write the index when there is more than one."""
        if self.pending:
            self._flush()
        if len(self.files) == 1:
            self._rename(self.files[0][0], "model.safetensors")
            return
        weight_map = {}
        for number, (path, names) in enumerate(self.files, start=1):
            final = f"model-{number:05d}-of-{len(self.files):05d}.safetensors"
            self._rename(path, final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def _rename(self, path: Path, name: str) -> None:
        path.rename(self.folder / name)
        # safetensors creates owner-only files; the server may run as another user
        (self.folder / name).chmod(0o644)


def _find_inputs(input_dir: Path, model_size: str) -> tuple[Path, list[Path], Path]:
    """Locate params.json, the shards and tokenizer.model; report everything missing at once."""
    size_dir = input_dir / model_size
    problems = []
    if not size_dir.is_dir():
        raise ConversionError(
            f"{size_dir} does not exist; expected <input_dir>/<model_size>/ with consolidated.NN.pth and params.json "
            f"(folders in {input_dir}: {', '.join(sorted(p.name for p in input_dir.iterdir() if p.is_dir())) or 'none'})"
        )
    params_path = size_dir / "params.json"
    if not params_path.is_file():
        problems.append(f"params.json is missing; expected it at {params_path}")
    shard_paths = sorted(size_dir.glob("consolidated.*.pth"))
    if not shard_paths:
        problems.append(f"no checkpoint shards; expected {size_dir}/consolidated.00.pth (one file per rank)")
    tokenizer_path = next(
        (p for p in (input_dir / "tokenizer.model", size_dir / "tokenizer.model") if p.is_file()), None
    )
    if tokenizer_path is None:
        problems.append(
            f"tokenizer.model is missing; expected it at {input_dir / 'tokenizer.model'} or {size_dir / 'tokenizer.model'}"
        )
    if problems:
        raise ConversionError("cannot convert:\n  - " + "\n  - ".join(problems))
    return params_path, shard_paths, tokenizer_path


def _read_params(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from exc


def _save_tokenizer(tokenizer_path: Path, folder: Path, model_max_length: int) -> tuple[int, int, int]:
    """Build the HF tokenizer from tokenizer.model into `folder`; return (vocab size, bos id, eos id).

    `LlamaTokenizer(vocab_file=...)` silently builds a 3-token tokenizer in transformers 5, so it is
    loaded with `from_pretrained` from a folder holding only tokenizer.model, then checked against
    sentencepiece itself.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    if min(sp.bos_id(), sp.eos_id(), sp.unk_id()) < 0:
        raise ConversionError(
            f"{tokenizer_path} defines no BOS, EOS or UNK piece; it is not a LLaMA tokenizer"
        )
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    tokenizer = LlamaTokenizerFast.from_pretrained(
        str(folder),
        bos_token=sp.id_to_piece(sp.bos_id()),
        eos_token=sp.id_to_piece(sp.eos_id()),
        unk_token=sp.id_to_piece(sp.unk_id()),
        add_bos_token=True,  # as the original LLaMA tokenizers did; transformers 5 no longer defaults to it
        add_eos_token=False,
        model_max_length=model_max_length,
    )
    tokenizer.save_pretrained(str(folder))

    reloaded = AutoTokenizer.from_pretrained(str(folder))
    if len(reloaded) != sp.vocab_size():
        raise ConversionError(
            f"converted tokenizer has {len(reloaded)} tokens but {tokenizer_path} has {sp.vocab_size()}"
        )
    for text in TOKENIZER_PROBES:
        if reloaded(text).input_ids != [sp.bos_id(), *sp.encode(text)]:
            raise ConversionError(
                f"the converted tokenizer encodes {text!r} differently from {tokenizer_path}; "
                "only LLaMA-style sentencepiece models (BPE, byte fallback, no whitespace normalization) are supported"
            )
    return sp.vocab_size(), sp.bos_id(), sp.eos_id()


def _tensor_groups(n_layers: int) -> list[list[tuple[str, str, int | None]]]:
    """(Meta name, HF name, split dim) of every tensor, grouped per progress step: embeddings, each layer, head."""
    top = {meta: (meta, hf, dim) for meta, (hf, dim) in TOP_TENSORS.items()}
    layers = [
        [(f"layers.{i}.{meta}", f"model.layers.{i}.{hf}", dim) for meta, (hf, dim) in LAYER_TENSORS.items()]
        for i in range(n_layers)
    ]
    return [[top["tok_embeddings.weight"]], *layers, [top["norm.weight"], top["output.weight"]]]


def _check_keys(shards: list[dict[str, torch.Tensor]], shard_paths: list[Path], n_layers: int) -> None:
    expected = {meta for group in _tensor_groups(n_layers) for meta, _, _ in group}
    for shard, path in zip(shards, shard_paths, strict=True):
        keys = {key for key in shard if not key.endswith(IGNORED_SUFFIX)}
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        if missing or unexpected:
            raise ConversionError(
                f"{path} does not match params.json (n_layers={n_layers}) for a LLaMA 1/2 model: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )


def _check_rank_split(config: LlamaConfig, num_shards: int) -> None:
    for what, count in (("n_heads", config.num_attention_heads), ("n_kv_heads", config.num_key_value_heads)):
        if count % num_shards:
            raise ConversionError(
                f"{num_shards} checkpoint shards cannot split {what}={count}; is a consolidated.NN.pth missing?"
            )


def _check_request(input_dir: Path, output_dir: Path, llama_version: int, dtype: str) -> None:
    """Refuse a conversion that cannot start: an unsupported version or dtype, a missing input
    folder, or an output folder that holds anything."""
    if llama_version == 3:
        raise ConversionError(LLAMA3_MESSAGE)
    if llama_version not in SUPPORTED_VERSIONS:
        raise ConversionError(f"llama_version must be one of {SUPPORTED_VERSIONS}, got {llama_version}")
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not input_dir.is_dir():
        raise ConversionError(f"input folder {input_dir} does not exist")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ConversionError(
            f"{output_dir} already exists and is not empty; delete it or choose another output folder"
        )


def _write_weights(
    shards: list[dict[str, torch.Tensor]],
    config: LlamaConfig,
    folder: Path,
    dtype: torch.dtype,
    max_shard_bytes: int,
    desc: str,
) -> None:
    """Merge the shards into HF's tensors, one layer at a time, and write them as safetensors files
    under `folder`; each tensor is checked against the shape LlamaForCausalLM expects, and the
    rotary projections are permuted to HF's layout."""
    from transformers import LlamaForCausalLM

    # Shapes HF expects, from a model on the meta device (no memory allocated).
    with torch.device("meta"):
        expected_shapes = {name: tuple(t.shape) for name, t in LlamaForCausalLM(config).state_dict().items()}

    head_dim = config.hidden_size // config.num_attention_heads
    rotary_heads = {"wq": config.num_attention_heads, "wk": config.num_key_value_heads}
    writer = _SafetensorsWriter(folder, max_shard_bytes)
    # One layer at a time: memory holds the layer being merged plus the safetensors file being filled.
    for group in tqdm(_tensor_groups(config.num_hidden_layers), desc=desc, unit="layer"):
        for meta_name, hf_name, split_dim in group:
            tensor = _merge(shards, meta_name, split_dim, dtype)
            if tuple(tensor.shape) != expected_shapes[hf_name]:
                raise ConversionError(
                    f"{meta_name} merged from {len(shards)} shard(s) has shape {tuple(tensor.shape)}, but "
                    f"params.json and tokenizer.model imply {expected_shapes[hf_name]}; "
                    "check that they belong to this checkpoint"
                )
            if heads := rotary_heads.get(meta_name.split(".")[-2]):
                tensor = permute_for_hf(tensor, heads, heads * head_dim, config.hidden_size)
            writer.add(hf_name, tensor)
    writer.finish()
    assert writer.shapes == expected_shapes, "converted tensors differ from LlamaForCausalLM's"


def convert_meta(
    input_dir: str | os.PathLike,
    model_size: str,
    output_dir: str | os.PathLike,
    llama_version: int = 2,
    max_position_embeddings: int | None = None,
    dtype: ConvertDtype = "float16",
    verify_checksums: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert `<input_dir>/<model_size>` into an HF LLaMA folder at `output_dir` and return its path.

    Everything is written into a temporary sibling folder that is renamed at the end, so a failure
    never leaves a half-written output.
    """
    from transformers import GenerationConfig

    input_dir, output_dir = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    _check_request(input_dir, output_dir, llama_version, dtype)
    params_path, shard_paths, tokenizer_path = _find_inputs(input_dir, model_size)

    if verify_checksums:
        for checklist in (input_dir / "tokenizer_checklist.chk", input_dir / model_size / "checklist.chk"):
            if checklist.is_file():
                _verify_checklist(checklist)

    params = _read_params(params_path)
    with staged_dir(output_dir) as tmp:  # absent or empty, checked above
        max_positions = max_position_embeddings or DEFAULT_MAX_POSITIONS[llama_version]
        vocab_size, bos_id, eos_id = _save_tokenizer(tokenizer_path, tmp, max_positions)
        config = meta_params_to_hf_config(params, vocab_size, llama_version, max_positions, bos_id, eos_id)
        config.dtype = dtype

        shards = [_load_shard(path) for path in shard_paths]
        _check_keys(shards, shard_paths, config.num_hidden_layers)
        _check_rank_split(config, len(shards))
        _write_weights(shards, config, tmp, DTYPES[dtype], max_shard_bytes, f"converting {model_size}")
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        marker = {
            "source": str(input_dir / model_size),
            "format": "meta",
            "llama_version": llama_version,
            "num_shards": len(shard_paths),
            "dtype": dtype,
            "checksums_verified": verify_checksums,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="finetune convert-meta",
        description="Convert Meta's original LLaMA 1/2 checkpoints (consolidated.NN.pth) into a Hugging Face folder",
    )
    parser.add_argument("--input_dir", required=True, help="folder holding tokenizer.model and <model_size>/")
    parser.add_argument(
        "--model_size", required=True, help="subfolder with consolidated.NN.pth and params.json, e.g. 7B"
    )
    parser.add_argument("--output_dir", required=True, help="new folder for the Hugging Face model")
    parser.add_argument("--llama_version", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument(
        "--max_position_embeddings",
        type=int,
        default=None,
        help="context length (default: 2048 for v1, 4096 for v2)",
    )
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument(
        "--no_verify", action="store_true", help="skip the md5 checks against checklist.chk files"
    )
    args = parser.parse_args(argv)
    try:
        path = convert_meta(
            args.input_dir,
            args.model_size,
            args.output_dir,
            llama_version=args.llama_version,
            max_position_embeddings=args.max_position_embeddings,
            dtype=args.dtype,
            verify_checksums=not args.no_verify,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
