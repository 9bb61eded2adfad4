"""Streaming text from token ids: the chunks a request streams concatenate to exactly what the
tokenizer decodes from all of its ids, on a LLaMA sentencepiece tokenizer with byte fallback (a
Chinese character is three byte tokens, each decoding alone to U+FFFD) and on a byte-level BPE,
with and without stop sequences; through the whole generation path (a scripted model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tokenizer, train_llama_sentencepiece

from finetune.config import GenerationSettings
from finetune.engine.requests import TextStream
from finetune.engine.scheduler import stream_tokens

# English only: every CJK character and emoji below falls back to bytes in the sentencepiece model.
CORPUS = [
    "the quick brown fox jumps over the lazy dog and keeps running through the field",
    "an alpaca lives in the mountains of peru and eats grass every single day",
    "hello world, this is a small corpus for a tiny tokenizer; numbers 0 1 2 3 4 5 6 7 8 9",
] * 30
TEXTS = {
    "chinese": "你好，世界！羊驼生活在安第斯山脉。",
    "emoji": "alpacas 🦙🦙 are fluffy 🎉",
    "mixed": "The alpaca 羊驼 says hello 👋 to the world 世界.",
}


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> Any:
    from transformers import LlamaTokenizerFast

    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(train_llama_sentencepiece(CORPUS, vocab_size=300))
    tokenizer = LlamaTokenizerFast.from_pretrained(
        str(folder), bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )
    ids = tokenizer("你", add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode([i]) for i in ids[-3:]] == ["\ufffd"] * 3, "expected byte fallback for 你"
    return tokenizer


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory) -> Any:
    return build_tokenizer(Path(tmp_path_factory.mktemp("bl")))


@pytest.fixture(params=["sentencepiece", "byte_level"])
def tokenizer(request) -> Any:
    return request.getfixturevalue(request.param)


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chunks_of(tokenizer: Any, ids: list[int], stops: list[str] | None = None) -> list[str]:
    stream = TextStream(tokenizer, stops)
    chunks = []
    for token in ids:
        chunks.append(stream.push(token))
        if stream.stopped:
            break
    chunks.append(stream.flush())
    return [c for c in chunks if c]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_chunks_concatenate_to_the_full_decode(tokenizer, name):
    ids = ids_of(tokenizer, TEXTS[name])
    chunks = chunks_of(tokenizer, ids)
    assert "".join(chunks) == tokenizer.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in c for c in chunks), chunks
    assert len(chunks) > 3  # streamed, not released at the end in one piece


@pytest.mark.parametrize("stop", ["世界", "🦙", "hello", "。"])
def test_stop_sequences_end_the_text_before_them(tokenizer, stop):
    text = next(t for t in TEXTS.values() if stop in t)
    ids = ids_of(tokenizer, text)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert stop in full
    assert "".join(chunks_of(tokenizer, ids, [stop])) == full[: full.find(stop)]


def test_a_stop_prefix_that_does_not_complete_is_released(tokenizer):
    ids = ids_of(tokenizer, TEXTS["mixed"])
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(chunks_of(tokenizer, ids, ["world peace"])) == full


def test_a_character_cut_off_at_the_end_is_dropped(sentencepiece):
    ids = ids_of(sentencepiece, "ok 你")
    assert "".join(chunks_of(sentencepiece, ids[:-1])) == "ok "


class ScriptedLM(torch.nn.Module):
    """A causal LM that greedily produces `script` after any prompt, then EOS: the whole
    generation path (engine, cache, detokenization) runs on a real tokenizer's ids."""

    def __init__(self, script: list[int], eos: int, vocab: int, prompt_len: int) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.script, self.eos, self.vocab, self.prompt_len = script, eos, vocab, prompt_len
        self.config = PretrainedConfig(max_position_embeddings=4096, eos_token_id=eos)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, **_: Any) -> Any:
        batch, length = input_ids.shape
        cache.update(torch.zeros(batch, 1, length, 1), torch.zeros(batch, 1, length, 1), 0)
        k = cache.get_seq_length() - self.prompt_len  # one request: no padding in the cache
        logits = torch.zeros(batch, 1, self.vocab)
        logits[:, 0, self.script[k] if k < len(self.script) else self.eos] = 1.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("stops", [[], ["世界"]])
def test_generation_streams_what_the_tokenizer_decodes(tokenizer, stops):
    text = TEXTS["mixed"]
    script = ids_of(tokenizer, text)
    prompt = "hello"
    n_prompt = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    model = ScriptedLM(script, tokenizer.eos_token_id, len(tokenizer), n_prompt)
    settings = GenerationSettings(max_new_tokens=len(script) + 5, temperature=0, stop_sequences=stops)
    chunks = list(stream_tokens(model, tokenizer, prompt, settings))
    full = tokenizer.decode(script, skip_special_tokens=True)
    expected = full[: full.find(stops[0])] if stops else full
    assert "".join(chunks) == expected
    assert all("\ufffd" not in c for c in chunks)
