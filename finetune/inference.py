"""Generation: one decode loop with a KV cache that streams text as it is produced.

Our own loop instead of `model.generate` + a streamer thread: cancellation (Cog raises into the
calling thread) stops it at the next token, stop sequences never leak into the output, and partial
UTF-8 characters are held back until complete."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import GenerationSettings


class GenerationError(ValueError):
    """The request cannot be served as asked (e.g. the prompt does not fit the context)."""


@dataclass
class GenerationStats:
    input_token_count: int = 0
    output_token_count: int = 0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "eos", "stop_sequence", "length", "cancelled"
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens_per_second(self) -> float:
        # Decode rate after the first token (prefill is reported separately as time to first token).
        n = self.output_token_count - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def context_length(model: Any) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048))


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _logits_processors(settings: GenerationSettings) -> Any:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.temperature > 0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might still become a stop sequence (or a split character)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


@torch.inference_mode()
def stream_tokens(
    model: Any,
    tokenizer: Any,
    prompt: str,
    settings: GenerationSettings,
    stats: GenerationStats | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[str]:
    """Yield text chunks for `prompt` (already templated). Stops at EOS, a stop sequence,
    max_new_tokens or `cancel` (checked before every token); the stop sequence is never yielded."""
    stats = stats if stats is not None else GenerationStats()
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"].to(device)
    n_prompt = prompt_ids.shape[1]
    limit = context_length(model)
    if n_prompt == 0:
        raise GenerationError("the prompt is empty after tokenization")
    if n_prompt + settings.max_new_tokens > limit:
        raise GenerationError(
            f"the prompt is {n_prompt} tokens and max_new_tokens is {settings.max_new_tokens}, but this model's "
            f"context is {limit} tokens: shorten the prompt or lower max_new_tokens to {max(limit - n_prompt, 0)}"
        )
    stats.input_token_count = n_prompt
    processors = _logits_processors(settings)
    generator = None
    if settings.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    stop_ids = eos_ids(model, tokenizer)
    stops = [s for s in settings.stop_sequences if s]

    from transformers import DynamicCache

    cache = DynamicCache()
    all_ids = prompt_ids
    step_input = prompt_ids
    generated: list[int] = []
    emitted = 0
    t_first = 0.0
    stats.stop_reason = "length"
    for _ in range(settings.max_new_tokens):
        if cancel is not None and cancel.is_set():
            stats.stop_reason = "cancelled"
            break
        # logits_to_keep=1: the prompt's other positions need no vocabulary projection.
        out = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1)
        scores = out.logits[:, -1, :].float()
        scores = processors(all_ids, scores)
        if settings.temperature > 0:
            next_id = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
        else:
            next_id = scores.argmax(dim=-1, keepdim=True)
        token = int(next_id)
        if not generated:
            t_first = time.perf_counter()
            stats.time_to_first_token = t_first - stats.started
        if token in stop_ids:
            stats.stop_reason = "eos"
            break
        generated.append(token)
        stats.output_token_count = len(generated)
        all_ids = torch.cat([all_ids, next_id], dim=1)
        step_input = next_id
        text = tokenizer.decode(generated, skip_special_tokens=True)
        hits = [pos for pos in (text.find(s) for s in stops) if pos >= 0]
        if hits:
            stats.stop_reason = "stop_sequence"
            if min(hits) > emitted:
                yield text[emitted : min(hits)]
            break
        ready = len(text) - _held_back(text, stops)
        if ready > emitted:
            yield text[emitted:ready]
            emitted = ready
    if stats.stop_reason != "stop_sequence":
        # Flush what was held back; a character cut off by the token limit is dropped.
        tail = tokenizer.decode(generated, skip_special_tokens=True)[emitted:].rstrip("\ufffd")
        if tail:
            yield tail
    stats.output_token_count = len(generated)
    stats.decode_seconds = time.perf_counter() - t_first if t_first else 0.0
