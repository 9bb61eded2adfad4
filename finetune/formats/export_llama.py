"""The two export formats that describe plain LLaMA blocks only, and what they share:

- Meta's original layout: `<size>/consolidated.00.pth` + `params.json` (+ `tokenizer.model`), which
  `python -m finetune convert-meta` reads back;
- llama.cpp's GGUF (architecture "llama") in f32, f16 or q8_0, with the tokenizer and chat template.

Both put q/k rows back in Meta's interleaved rotary order and take the merged tensors one at a time
from export_stream.MergedTensors as they write them.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ..errors import ExportError
from .convert_meta import LAYER_TENSORS, TOP_TENSORS, meta_params_to_hf_config, unpermute_to_meta
from .export_stream import MergedTensors, write_torch_file

GGUF_TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
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


# --- LLaMA layout checks and rotary order ------------------------------------------------------


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope_theta(cfg: Any) -> float:
    return float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0))


def check_llama_layout(cfg: Any, fmt: str) -> None:
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


def _write_meta_weights(source: MergedTensors, path: Path, dtype: torch.dtype) -> None:
    """consolidated.00.pth, one tensor at a time. Meta's model has no tied head: a tied model's
    output.weight is read again from the embeddings, a copy of its own."""
    cfg = source.config
    names = _meta_names(cfg.num_hidden_layers)
    entries = [(meta_name, source.shapes[hf_name]) for meta_name, hf_name in names]
    tensors = (
        _to_interleaved(hf_name, source.take(hf_name, dtype), cfg)
        for _, hf_name in tqdm(names, desc="meta tensors", unit="tensor")
    )
    write_torch_file(path, entries, dtype, tensors)


def write_meta(
    source: MergedTensors,
    tokenizer: Any,
    folder: Path,
    model_size: str,
    params: dict[str, Any],
    sp_file: Path | None,
    dtype: torch.dtype,
) -> list[str]:
    """Write the Meta layout into `folder`; return notes for the user."""
    cfg, tied = source.config, source.tied
    dtype_name = str(dtype).removeprefix("torch.")
    size_dir = folder / model_size
    size_dir.mkdir()
    _write_meta_weights(source, size_dir / "consolidated.00.pth", dtype)
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


def write_gguf(
    source: MergedTensors, tokenizer: Any, vocab: GGUFVocab, path: Path, dtype: str, name: str
) -> None:
    cfg = source.config
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
    for gguf_name, hf_name in _gguf_names(cfg.num_hidden_layers, source.tied):
        shape = source.shapes[hf_name]
        tensor_type = _gguf_type(shape, qtype)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, tensor_type)
        writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), tensor_type)
        plan.append((gguf_name, hf_name, tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for gguf_name, hf_name, tensor_type in tqdm(plan, desc=f"gguf {dtype}", unit="tensor"):
        # fp32: the converter rounds each tensor once, at the end
        tensor = _to_interleaved(hf_name, source.take(hf_name, torch.float32), cfg)
        writer.write_tensor_data(_encode(gguf_name, tensor, tensor_type))
    writer.close()
