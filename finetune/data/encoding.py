"""Record -> token ids + labels. The loss-mask contract: label IGNORE_INDEX means "no loss here".

The prompt and the response are tokenized separately and concatenated, which is exactly what the
model sees at inference (prompt tokenized alone, response generated after it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_example(
    prompt: str,
    response: str,
    tokenizer: Any,
    cutoff_len: int,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> Encoded:
    """Tokenize one example, truncating so that the end of the response and EOS always survive.

    Over-long examples lose the middle of the prompt first (its head keeps BOS and the instruction,
    its tail keeps the response marker); a response longer than the budget keeps its last tokens
    after a short prompt tail, since a model that never sees EOS never learns to stop.
    """
    prompt_ids = encode_prompt(tokenizer, prompt) if prompt else _bos(tokenizer)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    if add_eos_token and eos is not None and (not response_ids or response_ids[-1] != eos):
        response_ids.append(eos)

    truncated = len(prompt_ids) + len(response_ids) > cutoff_len
    if truncated:
        prompt_ids, response_ids = _truncate(prompt_ids, response_ids, cutoff_len)

    input_ids = prompt_ids + response_ids
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return Encoded(input_ids=input_ids, labels=labels, truncated=truncated)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A rendered prompt's ids with the tokenizer's special tokens (LLaMA's BOS) exactly once: chat
    templates that start with `{{ bos_token }}` (Llama 2/3, Mistral) already wrote BOS as text, and
    the tokenizer would add a second one in front."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos] and text.startswith(tokenizer.bos_token):
        return ids[1:]
    return ids


def _bos(tokenizer: Any) -> list[int]:
    # Plain-text records have no prompt, but LLaMA-style tokenizers still start with BOS.
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def _truncate(prompt_ids: list[int], response_ids: list[int], cutoff_len: int) -> tuple[list[int], list[int]]:
    min_prompt = min(len(prompt_ids), cutoff_len // 4)
    if len(response_ids) > cutoff_len - min_prompt:
        keep = cutoff_len - min_prompt
        prompt_tail = prompt_ids[len(prompt_ids) - min_prompt :] if min_prompt else []
        return prompt_tail, response_ids[len(response_ids) - keep :]
    budget = cutoff_len - len(response_ids)
    head = budget // 2
    tail = budget - head
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - tail :], response_ids
