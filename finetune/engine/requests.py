"""What one generation request carries and needs besides the model: the `Request` record the
engine fills in as it runs (its outbox is how it talks to other threads), its errors and figures,
the sampling processors its settings ask for, the context check, and the text stream that turns
tokens into text (stop sequences never leak into the output, partial UTF-8 characters are held back
until complete). The decode loop itself is the engine's (scheduler.py)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import GenerationSettings
from ..errors import UserError

if TYPE_CHECKING:
    import torch

DONE = None  # the outbox item after the last chunk


class GenerationError(UserError, ValueError):
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


def logits_processors(settings: GenerationSettings) -> Any:
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
    if settings.samples:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


class TextStream:
    """Token ids in, text out, incrementally: each token decodes only a short window of ids, not the
    whole output again (O(1) per token instead of O(n)).

    The window starts at the token before the last emitted text, so tokenizers that change a
    token's text by what precedes it (sentencepiece drops a leading space at the start of a decode)
    decode both the old and the new window the same way. While the window ends in U+FFFD the last
    character is incomplete (a byte-level BPE split, or a sentencepiece byte-fallback run, which
    decodes as one U+FFFD per byte) and nothing is emitted. Text that might still become a stop
    sequence is held back; a stop sequence ends the stream and is never emitted."""

    def __init__(self, tokenizer: Any, stops: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops or [] if s]
        self.ids: list[int] = []
        self.prefix = 0  # the window's first id
        self.read = 0  # ids before this one have been turned into text
        self.pending = ""  # decoded, not yet emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (maybe ""). Sets `stopped` on a stop sequence."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.pending += now[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """The rest at the end of the stream; an incomplete last character is dropped."""
        if not self.stopped:
            before = self._decode(self.ids[self.prefix : self.read])
            self.pending += self._decode(self.ids[self.prefix :])[len(before) :].rstrip("\ufffd")
            self.prefix = self.read = len(self.ids)
        out = self._release(final=True)
        self.pending = ""
        return out

    def _release(self, final: bool = False) -> str:
        if self.stopped:
            return ""
        hits = [pos for pos in (self.pending.find(s) for s in self.stops) if pos >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = 0 if final else _stop_prefix_len(self.pending, self.stops)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """The longest suffix of `text` that is the start of a stop sequence (it may still become one)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold


def check_fits(model: Any, n_prompt: int, max_new_tokens: int) -> None:
    limit = context_length(model)
    if n_prompt == 0:
        raise GenerationError("the prompt is empty after tokenization")
    if n_prompt + max_new_tokens > limit:
        raise GenerationError(
            f"the prompt is {n_prompt} tokens and max_new_tokens is {max_new_tokens}, but this model's "
            f"context is {limit} tokens: shorten the prompt or lower max_new_tokens to {max(limit - n_prompt, 0)}"
        )


@dataclass(eq=False)
class Request:
    """One generation: plain state, filled in by the engine. `adapter` is the PEFT adapter name the
    request decodes with (None: the bare base)."""

    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: str | None = None
    head: int = 0
    """Leading prompt tokens that other requests share (a prompt template's text before the
    instruction): prefilled as a chunk of their own, whose keys and values the engine keeps for the
    next request with the same head and adapter."""
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_finish: Callable[[Request], None] | None = None
    outbox: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    done: bool = False
    # Engine state.
    text: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    digests: list[bytes] = field(default_factory=list)  # of the prompt up to each chunk boundary, in order
    cache: Any = None  # this request's own cache while it is being prefilled
    generator: torch.Generator | None = None
    processors: Any = None
    seen: torch.Tensor | None = None  # prompt + generated ids, for a repetition penalty (filled as we go)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float = 0.0

    @property
    def reserve(self) -> int:
        return len(self.prompt_ids) + self.settings.max_new_tokens

    def drain(self) -> Iterator[Any]:
        """What the engine has put in the outbox so far (chunks, then DONE or an exception)."""
        while True:
            try:
                item = self.outbox.get_nowait()
            except queue.Empty:
                return
            if item is not DONE:
                yield item
