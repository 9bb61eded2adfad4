"""Meta → HF conversion, checked on a tiny checkpoint built here: split over two model-parallel
ranks the way Meta's fairscale layers split it, converted, and compared with a reference forward
pass written in Meta's own layout."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from conftest import train_llama_sentencepiece

from finetune.formats.convert_meta import (
    ConversionError,
    convert_meta,
    main,
    meta_params_to_hf_config,
    permute_for_hf,
    unpermute_to_meta,
)

SIZE = "tiny"
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "llama", "and", "alpaca",
    "models", "convert", "weights", "into", "tensors", "shards", "rotary", "heads", "2023", "7B", "naïve", "café",
)  # fmt: skip
TEXTS = (
    "the quick brown llama converts weights",
    "two  spaces\tand a tab\nthen 12345 naïve 🦙",
)
# Dimension along which each Meta tensor is split across ranks; absent = replicated on every rank.
# Column-parallel layers split output features, row-parallel ones input features, and LLaMA 1/2's
# ParallelEmbedding splits the embedding dimension.
RANK_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


@pytest.fixture(scope="module")
def sp_model() -> bytes:
    """A BPE sentencepiece model trained like LLaMA's (byte fallback, no whitespace normalization)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    return train_llama_sentencepiece(lines, vocab_size=320)


def make_weights(params: dict, vocab_size: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = params.get("n_kv_heads", n_heads) * (dim // n_heads)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    weights = {"tok_embeddings.weight": rand(vocab_size, dim, scale=1.0)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        weights |= {
            p + "attention.wq.weight": rand(dim, dim),
            p + "attention.wk.weight": rand(kv_dim, dim),
            p + "attention.wv.weight": rand(kv_dim, dim),
            p + "attention.wo.weight": rand(dim, dim),
            p + "feed_forward.w1.weight": rand(hidden, dim),
            p + "feed_forward.w2.weight": rand(dim, hidden),
            p + "feed_forward.w3.weight": rand(hidden, dim),
            p + "attention_norm.weight": 1 + rand(dim),
            p + "ffn_norm.weight": 1 + rand(dim),
        }
    weights |= {"norm.weight": 1 + rand(dim), "output.weight": rand(vocab_size, dim)}
    return weights


def shard(weights: dict[str, torch.Tensor], ranks: int, head_dim: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(ranks)]
    for name, tensor in weights.items():
        dim = RANK_SPLIT.get(name.split(".")[-2])
        # clone: torch.save would otherwise write the whole storage behind each chunk view
        pieces = [tensor.clone()] * ranks if dim is None else [t.clone() for t in tensor.chunk(ranks, dim)]
        for rank_dict, piece in zip(shards, pieces, strict=True):
            rank_dict[name] = piece
    for rank_dict in shards:  # Meta's checkpoints carry precomputed rotary frequencies
        rank_dict["rope.freqs"] = torch.ones(head_dim // 2)
    return shards


def write_checkpoint(
    root: Path, sp_bytes: bytes, params: dict, hidden: int, ranks: int = 2
) -> dict[str, torch.Tensor]:
    """Lay out a Meta download: tokenizer + checklist at the top, shards + params + checklist in SIZE/."""
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    weights = make_weights(params, sp.vocab_size(), hidden)
    size_dir = root / SIZE
    size_dir.mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(sp_bytes)
    for rank, rank_dict in enumerate(shard(weights, ranks, params["dim"] // params["n_heads"])):
        torch.save(rank_dict, size_dir / f"consolidated.{rank:02d}.pth")
    (size_dir / "params.json").write_text(json.dumps(params | {"vocab_size": -1}))
    for folder, names in (
        (root, ["tokenizer.model"]),
        (size_dir, sorted(p.name for p in size_dir.iterdir())),
    ):
        lines = [f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}" for n in names]
        (folder / ("tokenizer_checklist.chk" if folder == root else "checklist.chk")).write_text(
            "\n".join(lines) + "\n"
        )
    return weights


def meta_forward(w: dict[str, torch.Tensor], params: dict, tokens: list[int]) -> torch.Tensor:
    """Logits the way Meta's model.py computes them: rotary on interleaved pairs as complex numbers."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv_heads = params.get("n_kv_heads", n_heads)
    head_dim, eps, steps = dim // n_heads, params["norm_eps"], len(tokens)
    freqs = 1.0 / params.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cis = torch.polar(torch.ones(steps, head_dim // 2), torch.outer(torch.arange(steps).float(), freqs))
    mask = torch.full((steps, steps), float("-inf")).triu(1)

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rotary(x: torch.Tensor) -> torch.Tensor:  # (steps, heads, head_dim)
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * cis[:, None, :]).flatten(-2)

    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        q = rotary((x @ w[p + "attention.wq.weight"].T).view(steps, n_heads, head_dim))
        k = rotary((x @ w[p + "attention.wk.weight"].T).view(steps, n_kv_heads, head_dim))
        v = (x @ w[p + "attention.wv.weight"].T).view(steps, n_kv_heads, head_dim)
        # repeat_kv: each key/value head serves n_heads // n_kv_heads consecutive query heads
        k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=1) for t in (k, v))
        scores = torch.einsum("qhd,khd->hqk", q, k) / head_dim**0.5 + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(steps, dim)
        h = h + attn @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"])
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["output.weight"].T


@pytest.mark.parametrize(
    ("params", "hidden", "llama_version", "max_shard_bytes"),
    [
        # multi-head attention; 2/3 * 4 * 64 = 170, rounded up to a multiple of 32
        ({"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-6}, 192, 1, None),
        # grouped-query attention, ffn_dim_multiplier (int(1.3 * 170) = 221 -> 224), rope_theta, several files
        (
            {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
             "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0},
            224, 2, 100_000,
        ),
    ],
    ids=["mha", "gqa"],
)  # fmt: skip
def test_logits_match_meta_reference(tmp_path, sp_model, params, hidden, llama_version, max_shard_bytes):
    from transformers import AutoTokenizer, LlamaForCausalLM

    weights = write_checkpoint(tmp_path / "meta", sp_model, params, hidden)
    extra = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    out = convert_meta(
        tmp_path / "meta", SIZE, tmp_path / "hf", llama_version=llama_version, dtype="float32", **extra
    )

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    config = model.config
    assert config.intermediate_size == hidden
    assert config.num_key_value_heads == params.get("n_kv_heads", params["n_heads"])
    assert config.max_position_embeddings == {1: 2048, 2: 4096}[llama_version]
    assert config.rope_parameters["rope_theta"] == params.get("rope_theta", 10000.0)
    assert config.rms_norm_eps == params["norm_eps"]
    assert (out / "model.safetensors.index.json").exists() == bool(max_shard_bytes)
    assert (out / "generation_config.json").exists() and (out / "tokenizer.model").exists()

    for text in TEXTS:
        ids = tokenizer(text).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        expected = meta_forward(weights, params, ids)
        assert (logits - expected).abs().max().item() < 1e-4


def test_permute_is_exactly_inverted():
    g = torch.Generator().manual_seed(0)
    for n_heads, dim1 in ((4, 64), (2, 32)):
        w = torch.randn(dim1, 64, generator=g)
        permuted = permute_for_hf(w, n_heads, dim1, 64)
        assert not torch.equal(permuted, w)
        assert torch.equal(unpermute_to_meta(permuted, n_heads, dim1, 64), w)
    # one head of size 4: Meta's pairs (0, 1), (2, 3) become HF's halves [0, 2 | 1, 3]
    rows = torch.arange(4.0)[:, None]
    assert permute_for_hf(rows, 1, 4, 1).flatten().tolist() == [0, 2, 1, 3]


def test_config_matches_published_llama_sizes():
    llama2_7b = meta_params_to_hf_config(
        {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-5}, 32000, 2
    )
    assert (llama2_7b.intermediate_size, llama2_7b.max_position_embeddings) == (11008, 4096)
    assert llama2_7b.rope_parameters["rope_theta"] == 10000.0
    llama1_13b = meta_params_to_hf_config(
        {"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-6}, 32000, 1
    )
    assert (llama1_13b.intermediate_size, llama1_13b.max_position_embeddings) == (13824, 2048)
    llama2_70b = meta_params_to_hf_config(
        {
            "dim": 8192,
            "multiple_of": 4096,
            "ffn_dim_multiplier": 1.3,
            "n_heads": 64,
            "n_kv_heads": 8,
            "n_layers": 80,
            "norm_eps": 1e-5,
        },
        32000,
        2,
    )
    assert (llama2_70b.intermediate_size, llama2_70b.num_key_value_heads) == (28672, 8)


@pytest.fixture
def small_checkpoint(tmp_path, sp_model) -> Path:
    """A two-rank checkpoint too small to matter for logits, for tokenizer and error tests."""
    params = {"dim": 16, "n_layers": 1, "n_heads": 2, "multiple_of": 16, "norm_eps": 1e-5}
    write_checkpoint(tmp_path / "meta", sp_model, params, hidden=48)
    return tmp_path / "meta"


def test_tokenizer_matches_sentencepiece(small_checkpoint, tmp_path, sp_model):
    from transformers import AutoTokenizer

    out = convert_meta(small_checkpoint, SIZE, tmp_path / "hf")
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == sp.vocab_size()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
        sp.bos_id(),
        sp.eos_id(),
        sp.unk_id(),
    )
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids == [sp.bos_id(), *sp.encode(text)]
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text))
    assert (out / "tokenizer.model").read_bytes() == sp_model


def test_checksum_mismatch_names_the_file(small_checkpoint, tmp_path):
    rank1 = small_checkpoint / SIZE / "consolidated.01.pth"
    checklist = small_checkpoint / SIZE / "checklist.chk"
    checklist.write_text(checklist.read_text().replace(hashlib.md5(rank1.read_bytes()).hexdigest(), "0" * 32))
    with pytest.raises(ConversionError, match=r"checksum mismatch for .*consolidated\.01\.pth"):
        convert_meta(small_checkpoint, SIZE, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # --no_verify skips the checklists
    assert (
        convert_meta(small_checkpoint, SIZE, tmp_path / "hf", verify_checksums=False) / "config.json"
    ).exists()


def test_missing_tokenizer_says_where_it_is_expected(small_checkpoint, tmp_path, sp_model):
    (small_checkpoint / "tokenizer.model").unlink()
    (small_checkpoint / "tokenizer_checklist.chk").unlink()
    with pytest.raises(ConversionError, match=r"tokenizer\.model is missing"):
        convert_meta(small_checkpoint, SIZE, tmp_path / "hf")
    # tokenizer.model inside the size folder is accepted too
    (small_checkpoint / SIZE / "tokenizer.model").write_bytes(sp_model)
    assert (
        convert_meta(small_checkpoint, SIZE, tmp_path / "hf") / "tokenizer.model"
    ).read_bytes() == sp_model


def test_main_reports_errors_and_leaves_no_output(small_checkpoint, tmp_path, capsys):
    (small_checkpoint / SIZE / "consolidated.01.pth").write_bytes(b"corrupt")
    args = ["--input_dir", str(small_checkpoint), "--model_size", SIZE, "--output_dir", str(tmp_path / "hf")]
    assert main(args) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert main([*args, "--no_verify"]) == 2  # now torch.load itself rejects the file
    assert "could not read" in capsys.readouterr().err
    assert main([*args, "--llama_version", "3"]) == 2
    assert "tiktoken" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]  # no output, no temporary folder


def test_refuses_to_overwrite_an_existing_folder(small_checkpoint, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_meta(small_checkpoint, SIZE, tmp_path / "hf")
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"
