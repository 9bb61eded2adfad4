"""Export a base model with a LoRA adapter merged in as one standalone model:

- `hf`: a Hugging Face folder (safetensors, tokenizer, generation config);
- `meta`: Meta's original layout (`<size>/consolidated.00.pth` + `params.json`, `tokenizer.model`),
  which `python -m finetune convert-meta` reads back;
- `gguf`: a llama.cpp file (architecture "llama") in f32, f16 or q8_0.

The adapter is attached with plain PEFT and merged with `safe_merge` (which refuses NaN). The meta
and gguf writers then take the merged tensors out of the model one at a time, so memory holds about
one copy of the weights. Everything is written into a temporary sibling folder that is renamed into
place at the end: a failure never leaves a half-written output.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .artifacts import CARD_JSON
from .convert_meta import LAYER_TENSORS, TOP_TENSORS, meta_params_to_hf_config, unpermute_to_meta
from .errors import ExportError, user_errors
from .modeling import attach_adapter, check_adapter_dir, check_identity
from .prompts import ADAPTER_TEMPLATE_FILE
from .staging import staged_dir
from .weights import MARKER, resolve_base_model

FORMATS = ("hf", "meta", "gguf")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
DEFAULT_DTYPES = {"hf": "float32", "meta": "float32", "gguf": "f16"}
DEFAULT_MODEL_SIZE = "custom"
# Files of the adapter folder that describe the model and travel with every export.
ADAPTER_EXTRAS = (CARD_JSON, ADAPTER_TEMPLATE_FILE)
F16_MAX = 65504.0

# HF tensor names -> llama.cpp's, per layer (`model.layers.{i}.` -> `blk.{i}.`) and at the top.
GGUF_LAYER_TENSORS = {
    "input_layernorm.weight": gguf.MODEL_TENSOR.ATTN_NORM,
    "self_attn.q_proj.weight": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj.weight": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj.weight": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj.weight": gguf.MODEL_TENSOR.ATTN_OUT,
    "post_attention_layernorm.weight": gguf.MODEL_TENSOR.FFN_NORM,
    "mlp.gate_proj.weight": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj.weight": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj.weight": gguf.MODEL_TENSOR.FFN_DOWN,
}
GGUF_TOP_TENSORS = {
    "model.embed_tokens.weight": gguf.MODEL_TENSOR.TOKEN_EMBD,
    "model.norm.weight": gguf.MODEL_TENSOR.OUTPUT_NORM,
    "lm_head.weight": gguf.MODEL_TENSOR.OUTPUT,
}


# --- base + adapter -> one merged model ----------------------------------------------------------


def _brief(exc: BaseException) -> str:
    """An exception as one line: torch's state-dict errors put the useful part on their second line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) or type(exc).__name__


def _read_card(adapter: Path) -> dict[str, Any] | None:
    path = adapter / CARD_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc


def load_merged(base: str, adapter: Path | None, dtype: torch.dtype) -> Any:
    """The base model with the adapter merged into its weights (or the bare base)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    except OSError as exc:
        raise ExportError(f"could not load base model {base}: {_brief(exc)}") from exc
    if adapter is None:
        return model
    card = _read_card(adapter)
    if card and card.get("base_model"):
        check_identity(card["base_model"], model, str(adapter))
    try:
        peft_model = attach_adapter(model, adapter)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(f"adapter {adapter} does not fit base model {base}: {_brief(exc)}") from exc
    try:
        # safe_merge adds each delta to a copy of the weight and checks that copy for NaN/inf first
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise ExportError(
            f"merging adapter {adapter} failed ({_brief(exc)}); retrain it or use an earlier checkpoint"
        ) from exc
    return merged


def _release(model: Any, name: str) -> torch.Tensor:
    """Take a weight out of the model (an empty tensor stays behind), so that once the caller has
    converted and written it, its memory is freed: writing holds about one copy of the model."""
    param = model.get_parameter(name)
    tensor = param.data
    param.data = torch.empty(0, dtype=tensor.dtype)
    return tensor


def _is_tied(model: Any) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg: Any) -> float:
    return float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))


def _check_llama_layout(cfg: Any, fmt: str) -> None:
    """Meta's layout and llama.cpp's "llama" architecture describe plain LLaMA blocks only."""
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    problems = [
        text
        for failed, text in (
            (cfg.model_type != "llama", f"model_type is {cfg.model_type!r}, not 'llama'"),
            (getattr(cfg, "attention_bias", False), "attention projections have biases"),
            (getattr(cfg, "mlp_bias", False), "MLP projections have biases"),
            (cfg.hidden_act != "silu", f"hidden_act is {cfg.hidden_act!r}, not 'silu'"),
            (rope_type != "default", f"rope_type is {rope_type!r} (only plain RoPE is supported)"),
            (
                _head_dim(cfg) * cfg.num_attention_heads != cfg.hidden_size,
                "head_dim * num_attention_heads differs from hidden_size",
            ),
        )
        if failed
    ]
    if problems:
        raise ExportError(
            f"export {fmt} supports plain LLaMA models only: " + "; ".join(problems) + "; use `export hf`"
        )


def _to_interleaved(hf_name: str, tensor: torch.Tensor, cfg: Any) -> torch.Tensor:
    """q/k rows back from HF's half-split rotary layout to Meta's interleaved pairs, which is also
    what llama.cpp's llama architecture expects; every other tensor passes through."""
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(hf_name.split(".")[-2])
    if heads is None:
        return tensor
    return unpermute_to_meta(tensor, heads, heads * _head_dim(cfg), cfg.hidden_size)


# --- Meta's original layout ----------------------------------------------------------------------


def meta_params(cfg: Any) -> dict[str, Any]:
    """params.json for this config; multiple_of / ffn_dim_multiplier are chosen so that Meta's
    FeedForward rounding (and `meta_params_to_hf_config`) gives back intermediate_size exactly."""
    dim, hidden = cfg.hidden_size, cfg.intermediate_size
    base = int(2 * (4 * dim) / 3)  # Meta's FeedForward starts from 2/3 of 4 * dim
    multiple_of = math.gcd(hidden, 256)
    # A clean multiple_of when it suffices (LLaMA-2 7B: 256); else a multiplier, nudged by half a
    # unit when float rounding in int(multiplier * base) would land one below.
    for extra in ({}, {"ffn_dim_multiplier": hidden / base}, {"ffn_dim_multiplier": (hidden + 0.5) / base}):
        params = {
            "dim": dim,
            "n_layers": cfg.num_hidden_layers,
            "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
            "multiple_of": multiple_of,
            **extra,
            "norm_eps": cfg.rms_norm_eps,
            "rope_theta": _rope_theta(cfg),
        }
        if meta_params_to_hf_config(params, cfg.vocab_size, 2).intermediate_size == hidden:
            return params
    raise ExportError(f"no Meta multiple_of / ffn_dim_multiplier gives intermediate_size {hidden}")


def _meta_names(n_layers: int) -> list[tuple[str, str]]:
    """(Meta name, HF name) of every tensor: embeddings, each layer, final norm, output."""
    top = {meta: hf for meta, (hf, _) in TOP_TENSORS.items()}
    layers = [
        (f"layers.{i}.{meta}", f"model.layers.{i}.{hf}")
        for i in range(n_layers)
        for meta, (hf, _) in LAYER_TENSORS.items()
    ]
    return [
        ("tok_embeddings.weight", top["tok_embeddings.weight"]),
        *layers,
        ("norm.weight", top["norm.weight"]),
        ("output.weight", top["output.weight"]),
    ]


def write_meta(
    model: Any, tokenizer: Any, folder: Path, model_size: str, params: dict[str, Any], sp_file: Path | None
) -> list[str]:
    """Write the Meta layout into `folder`; return notes for the user."""
    cfg = model.config
    tied = _is_tied(model)
    state: dict[str, torch.Tensor] = {}
    for meta_name, hf_name in tqdm(_meta_names(cfg.num_hidden_layers), desc="meta tensors", unit="tensor"):
        if meta_name == "output.weight" and tied:
            # Meta's model has no tied head: output.weight is a separate copy of the embeddings.
            state[meta_name] = state["tok_embeddings.weight"].clone()
            continue
        state[meta_name] = _to_interleaved(hf_name, _release(model, hf_name), cfg)
    dtype_name = str(state["tok_embeddings.weight"].dtype).removeprefix("torch.")
    size_dir = folder / model_size
    size_dir.mkdir()
    torch.save(state, size_dir / "consolidated.00.pth")
    (size_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")

    if sp_file is not None:
        shutil.copyfile(sp_file, folder / "tokenizer.model")
        notes = []
        tokenizer_text = (
            "tokenizer.model: the sentencepiece tokenizer.\n\n"
            "Read it back into a Hugging Face folder with (params.json has no field for the context length)\n"
            f"  python -m finetune convert-meta --input_dir <this folder> --model_size {model_size} "
            f"--output_dir <new folder> --max_position_embeddings {cfg.max_position_embeddings}"
        )
    else:
        tokenizer.save_pretrained(folder)
        notes = [
            "note: the tokenizer is not sentencepiece, so there is no tokenizer.model (Meta's format and "
            "convert-meta need one); its Hugging Face tokenizer files are written instead, see README.txt"
        ]
        tokenizer_text = (
            "No tokenizer.model: this model's tokenizer is not sentencepiece (it is a byte-level BPE), so\n"
            "the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, ...) are here instead;\n"
            "load them with transformers' AutoTokenizer. convert-meta needs a tokenizer.model, so it cannot\n"
            f"read this export back. The context length is {cfg.max_position_embeddings}."
        )
    readme = (
        "Meta LLaMA checkpoint exported by `python -m finetune export meta`.\n\n"
        f"{model_size}/consolidated.00.pth: the merged weights (one shard, {dtype_name}),\n"
        "  q/k rows in Meta's interleaved rotary layout"
        + (", output.weight a copy of the tied embeddings" if tied else "")
        + ".\n"
        f"{model_size}/params.json: the architecture.\n"
        f"{tokenizer_text}\n"
    )
    (folder / "README.txt").write_text(readme)
    return notes


# --- GGUF ----------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp stores it."""

    model: str  # "llama" (sentencepiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_space_prefix: bool | None = None


def _pre_tokenizer_steps(spec: dict[str, Any]) -> list[dict[str, Any]]:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def bpe_pre_tokenizer(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer in a tokenizer.json, or None when it is not one we know.

    llama.cpp itself recognises a tokenizer by hashing how it splits a test text; we read the
    pre-tokenizer's description instead: GPT-2's byte-level regex, that regex after splitting digits
    one by one (SmolLM), or a Split regex that transformers' GGUF reader knows by name (Llama 3, Qwen2).
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    steps = _pre_tokenizer_steps(spec)
    shape = [
        (s.get("type"), s.get("use_regex"), s.get("individual_digits"), (s.get("pattern") or {}).get("Regex"))
        for s in steps
    ]
    if shape == [("ByteLevel", True, None, None)]:
        return "gpt-2"
    if shape == [("Digits", None, True, None), ("ByteLevel", True, None, None)]:
        return "smollm"
    if len(shape) == 2 and shape[0][0] == "Split" and shape[1][:2] == ("ByteLevel", False):
        return next((name for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items() if regex == shape[0][3]), None)
    return None


def _token_type(known: bool, added_special: bool | None) -> gguf.TokenType:
    """llama.cpp's type for a token: HF added tokens are control (special) or user-defined; ids with
    no token at all are unused padding."""
    if not known:
        return gguf.TokenType.UNUSED
    if added_special is None:
        return gguf.TokenType.NORMAL
    return gguf.TokenType.CONTROL if added_special else gguf.TokenType.USER_DEFINED


def _extend_vocab(vocab: GGUFVocab, tokenizer: Any, vocab_size: int) -> None:
    """Fill the ids the base vocabulary lacks up to the model's vocab_size: HF added tokens, or
    llama.cpp's `[PAD{i}]` placeholders for rows of the embedding no token uses."""
    if max(len(vocab.tokens), len(tokenizer)) > vocab_size:
        raise ExportError(
            f"the tokenizer has {max(len(vocab.tokens), len(tokenizer))} tokens but the model embeds only "
            f"{vocab_size}; the base model's tokenizer does not belong to its weights"
        )
    added = tokenizer.added_tokens_decoder
    for i in range(len(vocab.tokens), vocab_size):
        token = added.get(i)
        vocab.tokens.append(token.content if token else f"[PAD{i}]")
        vocab.types.append(_token_type(token is not None, token.special if token else None))
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)  # llama.cpp's score for tokens outside the sentencepiece model


def gguf_vocab(tokenizer: Any, sp_file: Path | None, vocab_size: int, pre: str | None) -> GGUFVocab:
    if sp_file is not None:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp_file.read_bytes())
        vocab = GGUFVocab(
            model="llama",
            tokens=[p.piece for p in proto.pieces],
            # sentencepiece's piece types use the same numbers as llama.cpp's token types
            types=[int(gguf.TokenType(p.type)) for p in proto.pieces],
            scores=[p.score for p in proto.pieces],
            add_space_prefix=proto.normalizer_spec.add_dummy_prefix,
        )
    else:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        model = spec["model"]
        byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        if model["type"] != "BPE" or not byte_level:
            raise ExportError(
                "export gguf supports sentencepiece tokenizers (with tokenizer.model) and byte-level BPE "
                f"tokenizers; this one is a {model['type']} tokenizer with a "
                f"{(spec.get('decoder') or {}).get('type')} decoder"
            )
        pre = pre or bpe_pre_tokenizer(spec)
        if pre is None:
            raise ExportError(
                "cannot tell which llama.cpp pre-tokenizer matches this tokenizer's pre_tokenizer "
                f"({json.dumps(spec.get('pre_tokenizer'))[:200]}); pass --tokenizer_pre NAME "
                "(e.g. gpt-2, llama-bpe, qwen2)"
            )
        by_id = {i: t for t, i in model["vocab"].items()} | {
            a["id"]: a["content"] for a in spec["added_tokens"]
        }
        special = {a["id"]: a["special"] for a in spec["added_tokens"]}
        size = max(by_id, default=-1) + 1
        vocab = GGUFVocab(
            model="gpt2",
            tokens=[by_id.get(i, f"[PAD{i}]") for i in range(size)],
            types=[_token_type(i in by_id, special.get(i)) for i in range(size)],
            # tokenizers writes merges as pairs (newer) or as "a b" strings (older)
            merges=[m if isinstance(m, str) else " ".join(m) for m in model["merges"]],
            pre=pre,
            add_space_prefix=any(
                s.get("add_prefix_space", False)
                for s in _pre_tokenizer_steps(spec)
                if s.get("type") == "ByteLevel"
            ),
        )
    _extend_vocab(vocab, tokenizer, vocab_size)
    return vocab


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types([int(t) for t in vocab.types])
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # Whether BOS/EOS get added is how the HF tokenizer behaves, so ask it rather than its config.
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _gguf_names(n_layers: int, tied: bool) -> list[tuple[str, str]]:
    """(llama.cpp name, HF name) of every tensor; a tied head has no `output` (llama.cpp then
    reuses token_embd)."""
    names = gguf.TENSOR_NAMES
    top = {hf: names[t] + ".weight" for hf, t in GGUF_TOP_TENSORS.items()}
    layers = [
        (names[t].format(bid=i) + ".weight", f"model.layers.{i}.{hf}")
        for i in range(n_layers)
        for hf, t in GGUF_LAYER_TENSORS.items()
    ]
    head = [] if tied else [(top["lm_head.weight"], "lm_head.weight")]
    return [
        (top["model.embed_tokens.weight"], "model.embed_tokens.weight"),
        *layers,
        (top["model.norm.weight"], "model.norm.weight"),
        *head,
    ]


def _gguf_type(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """Norms stay f32; q8_0 needs rows in whole 32-value blocks, so other matrices fall back to f16."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _encode(name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = tensor.to(torch.float32).numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        peak = float(np.abs(data).max())
        if peak > F16_MAX:
            raise ExportError(f"{name} holds values up to {peak:g}, beyond float16's range; use --dtype f32")
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_gguf(model: Any, tokenizer: Any, vocab: GGUFVocab, path: Path, dtype: str, name: str) -> None:
    cfg = model.config
    qtype, file_type = GGUF_TYPES[dtype]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(_head_dim(cfg))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_file_type(file_type)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, vocab)

    # The header lists every tensor's type and size before any data, so plan them all first; the
    # data then streams one tensor at a time instead of the writer holding the whole model.
    plan = []
    for gguf_name, hf_name in _gguf_names(cfg.num_hidden_layers, _is_tied(model)):
        shape = tuple(model.get_parameter(hf_name).shape)
        tensor_type = _gguf_type(shape, qtype)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, tensor_type)
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), tensor_type)
        plan.append((gguf_name, hf_name, tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, hf_name, tensor_type in tqdm(plan, desc=f"gguf {dtype}", unit="tensor"):
        tensor = _to_interleaved(hf_name, _release(model, hf_name), cfg)
        writer.write_tensor_data(_encode(gguf_name, tensor, tensor_type))
    writer.close()


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


def export(
    fmt: str,
    output_dir: str | Path,
    base_model: str | None = None,
    adapter: str | Path | None = None,
    dtype: str | None = None,
    model_size: str = DEFAULT_MODEL_SIZE,
    tokenizer_pre: str | None = None,
) -> tuple[Path, list[str]]:
    """Merge `adapter` into `base_model` and write it as `fmt` into `output_dir`; return the path
    written (the .gguf file for gguf, else the folder) and notes for the user."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    choices = GGUF_TYPES if fmt == "gguf" else TORCH_DTYPES
    dtype = dtype or DEFAULT_DTYPES[fmt]
    if dtype not in choices:
        raise ExportError(f"--dtype for {fmt} must be one of {', '.join(choices)}, got {dtype!r}")
    output_dir = Path(output_dir).expanduser()
    _check_output(output_dir)
    adapter_dir = Path(adapter).expanduser() if adapter else None
    if adapter_dir is not None:
        if not adapter_dir.is_dir():
            raise ExportError(f"adapter folder {adapter_dir} does not exist")
        check_adapter_dir(adapter_dir)
    base = resolve_base_model(base_model)

    # Everything the config and tokenizer can rule out is checked before the weights load.
    from transformers import AutoConfig, AutoTokenizer

    try:
        config, tokenizer = AutoConfig.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    except OSError as exc:
        raise ExportError(f"could not load base model {base}: {_brief(exc)}") from exc
    if fmt != "hf":
        _check_llama_layout(config, fmt)
    sp_file = _sentencepiece_file(base)
    params = meta_params(config) if fmt == "meta" else {}
    vocab = gguf_vocab(tokenizer, sp_file, config.vocab_size, tokenizer_pre) if fmt == "gguf" else None

    # Merging happens in the dtype the weights load in: the output dtype for hf/meta, fp32 for gguf,
    # whose converter rounds each tensor once, at the end.
    model = load_merged(base, adapter_dir, TORCH_DTYPES.get(dtype, torch.float32))
    notes: list[str] = []
    written = output_dir
    with _staging(output_dir) as tmp:
        if fmt == "hf":
            model.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
            tokenizer.save_pretrained(tmp)
            if sp_file is not None:  # transformers 5 saves no tokenizer.model; later exports need it
                shutil.copyfile(sp_file, tmp / "tokenizer.model")
        elif fmt == "meta":
            notes = write_meta(model, tokenizer, tmp, model_size, params, sp_file)
        else:
            assert vocab is not None
            filename = f"model-{dtype}.gguf"
            name = Path(base).name + (f"-{adapter_dir.name}" if adapter_dir else "")
            write_gguf(model, tokenizer, vocab, tmp / filename, dtype, name)
            written = output_dir / filename
        for extra in ADAPTER_EXTRAS:
            if adapter_dir is not None and (adapter_dir / extra).is_file():
                shutil.copyfile(adapter_dir / extra, tmp / extra)
        marker = {
            "source": base,
            "adapter": str(adapter_dir) if adapter_dir else None,
            "format": fmt,
            "dtype": dtype,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return written, notes


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
        sub.add_argument("--dtype", default=DEFAULT_DTYPES[fmt], choices=list(dtypes))
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
