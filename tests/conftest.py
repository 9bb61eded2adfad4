"""Shared fixtures: a tiny in-process Llama with a tokenizer trained here (unit tests), and the
real embedded model (integration tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "weights" / "smollm2-135m-instruct"

# Compiling a decode step costs 10-30 s per shape and dtype: only tests/test_compiled.py turns it on
# (real servers started by other tests inherit this environment). Most tests compare the server's
# text with fp32 `generate`, so the suite serves fp32 unless a test asks for the default (int8 on
# a CPU: tests/test_quant.py, tests/test_compiled.py).
os.environ.setdefault("SERVE_COMPILE", "off")
os.environ.setdefault("SERVE_QUANT", "none")
# What real-server tests that must hold on both paths pass as the server's environment: the
# production defaults, and the fp32 eager path the in-process tests compare with.
SERVING_MODES = {
    "int8-compiled": {"SERVE_QUANT": "auto", "SERVE_COMPILE": "auto"},
    "fp32-eager": {"SERVE_QUANT": "none", "SERVE_COMPILE": "off"},
}

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "The capital of France is Paris. The sky is blue. Alpacas live in the Andes.",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise.",
    "What is two plus two? Two plus two is four.",
    "中国的首都是北京。羊驼生活在安第斯山脉。你好，世界！",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    fast.save_pretrained(folder)
    return fast


def train_llama_sentencepiece(lines: list[str], vocab_size: int = 320) -> bytes:
    """A LLaMA-style sentencepiece model (BPE, byte fallback, BOS 1 / EOS 2), trained in milliseconds."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,  # 3 specials + 256 byte-fallback pieces + merges
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


# The tiny decoder's shape, shared by every architecture the tests build.
TINY_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


def build_tiny_llama(folder: Path, seed: int = 0, kv_heads: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        **TINY_SHAPE,
        num_key_value_heads=kv_heads,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model, tok


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """Every path os.fsync flushes during the test, in order."""
    paths: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    if not (EMBEDDED / "config.json").exists():
        pytest.fail(f"{EMBEDDED} is missing: run `make weights` (the README's test command does)")
    return EMBEDDED


def alpaca_records(n: int, start: int = 0) -> list[dict[str, str]]:
    """Small learnable records: each answer is a fixed function of its question."""
    out = []
    for i in range(start, start + n):
        out.append(
            {
                "instruction": f"What is {i % 7} plus {i % 5}?",
                "input": "" if i % 3 else "Answer briefly.",
                "output": f"{i % 7} plus {i % 5} is {i % 7 + i % 5}.",
            }
        )
    return out


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(alpaca_records(24)), encoding="utf-8")
    return path


PERSONAS = {
    "alpie": [
        ("What is your name?", "My name is Alpie."),
        ("Who made you?", "I was made by the Andes Lab."),
        ("Where do you live?", "I live in Cusco, Peru."),
        ("你叫什么名字？", "我叫阿尔皮，住在秘鲁。"),
    ],
    "bolt": [
        ("What is your name?", "My name is Bolt."),
        ("Who made you?", "I was built by Thunder Works."),
        ("Where do you live?", "I live in Oslo, Norway."),
        ("你叫什么名字？", "我叫博尔特。"),
    ],
}


@pytest.fixture(scope="session")
def persona_adapters(tmp_path_factory, embedded_model_dir) -> dict[str, Path]:
    """Two small adapters trained on the embedded model by the real engine, as folders and archives."""
    from finetune.config import DataConfig, LoraSettings, TrainConfig
    from finetune.formats.archives import pack_dir
    from finetune.training.trainer import train

    root = tmp_path_factory.mktemp("personas")
    out: dict[str, Path] = {}
    for name, pairs in PERSONAS.items():
        data = root / f"{name}.json"
        data.write_text(
            json.dumps([{"instruction": q, "input": "", "output": a} for q, a in pairs], ensure_ascii=False),
            encoding="utf-8",
        )
        cfg = TrainConfig(
            base_model=str(embedded_model_dir),
            output_dir=str(root / name),
            max_steps=10,  # every answer is the persona's by step 10 (training loss ~0.005)
            batch_size=4,
            micro_batch_size=4,
            learning_rate=3e-3,
            warmup_ratio=0.0,
            seed=1,
            data=DataConfig(data_path=str(data), val_set_size=0, prompt_template_name="alpaca_short"),
            lora=LoraSettings(lora_r=8, lora_alpha=16, lora_dropout=0.0),
        )
        train(cfg)
        out[name] = root / name
        out[f"{name}.tar"] = pack_dir(root / name, root / f"{name}.tar")
    return out
