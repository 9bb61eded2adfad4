"""The serving engine: continuous batching of every request of a server in one decode loop.

A scheduler plus a runner, as in vLLM. Each `step()` the scheduler drops cancelled requests,
admits waiting ones while the batch and the KV budget allow, runs one prefill chunk of the newest
request (so a long prompt delays the running decodes by one chunk, not by its whole length) and one
batched decode step for every running request. A finished or cancelled request leaves the batch at
once and its rows of the KV cache are freed.

The KV cache is transformers' `DynamicCache` with one row per running request, left-padded to a
common length; the 2-D attention mask hides the padding and `position_ids` carry each row's own
positions, so a row computes what it would alone. Rows may use different LoRA adapters: the
server's `prepare` hook sets the model up for the step's adapters (a merged setup adapter, one
active adapter, or PEFT's per-row `adapter_names`).

Everything here runs on one thread (the server's compute thread, or the caller's for
`inference.stream_tokens`); requests talk to the outside only through their outbox queue."""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import quant
from .config import GenerationSettings
from .inference import (
    GenerationError,
    GenerationStats,
    TextStream,
    _logits_processors,
    check_fits,
    eos_ids,
)

PEFT_BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
DONE = None  # the outbox item after the last chunk


@dataclass
class EngineLimits:
    max_batch: int = 8
    """Requests decoded together at most; more wait in the queue."""
    kv_tokens: int = 65536
    """KV cache budget in token slots (rows x padded length); a request reserves prompt + max_new_tokens."""
    prefill_chunk: int = 256
    """Prompt tokens prefilled per step, between decode steps of the running requests (several short
    prompts share one step's budget; a longer one takes several steps)."""
    queue_timeout_s: float = 300.0
    """A request that could not start within this time fails with a reason instead of waiting on."""


@dataclass(eq=False)
class Request:
    """One generation: plain state, filled in by the engine. `adapter` is the PEFT adapter name the
    request decodes with (None: the bare base)."""

    prompt_ids: list[int]
    settings: GenerationSettings
    adapter: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_finish: Callable[[Request], None] | None = None
    outbox: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    done: bool = False
    # Engine state.
    text: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    cache: Any = None  # this request's own cache while it is being prefilled
    generator: torch.Generator | None = None
    processors: Any = None
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


class Batch:
    """The running requests and their KV cache: row i of every layer's keys/values is rows[i]."""

    def __init__(self) -> None:
        self.rows: list[Request] = []
        self.cache: Any = None  # a DynamicCache, its layers [rows, kv heads, length, head dim]
        self.mask: torch.Tensor | None = None  # [rows, length], False on left padding

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, request: Request, cache: Any) -> None:
        """Add a prefilled request (its own one-row cache) as the last row."""
        n = cache.get_seq_length()
        mask = torch.ones(1, n, dtype=torch.bool, device=cache.layers[0].keys.device)
        if not self.rows:
            self.rows, self.cache, self.mask = [request], cache, mask
            return
        assert self.mask is not None
        total = max(self.length, n)
        for layer, new in zip(self.cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat(
                [_pad_left(layer.keys, total - self.length), _pad_left(new.keys, total - n)]
            )
            layer.values = torch.cat(
                [_pad_left(layer.values, total - self.length), _pad_left(new.values, total - n)]
            )
        self.mask = torch.cat([_pad_left(self.mask, total - self.length), _pad_left(mask, total - n)])
        self.rows.append(request)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows; drop the columns that are padding in every remaining row."""
        if len(rows) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in rows]
        if not rows:
            self.cache, self.mask = None, None
            return
        assert self.mask is not None
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).int().argmax())  # the first column some row still uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """Pad a mask's last dimension, or a KV tensor's sequence dimension (2), with n zeros on the left."""
    if n == 0:
        return t
    dim = 2 if t.dim() == 4 else 1
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        limits: EngineLimits | None = None,
        prepare: Callable[[list[str | None]], dict[str, Any]] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or EngineLimits()
        # Sets the model up for a forward pass whose rows use these adapters; returns extra forward kwargs.
        self.prepare = prepare or (lambda adapters: {})
        self.device = next(model.parameters()).device
        self.stop_ids = eos_ids(model, tokenizer)
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()  # from any thread
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.batch = Batch()

    # -- the outside ------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue a request (any thread); the engine picks it up at its next step."""
        self.inbox.put(request)
        return request

    def drive(self, request: Request) -> Iterator[str]:
        """Step the engine in this thread until a submitted `request` is done, yielding its chunks
        (and raising its error): for callers that own the thread the engine runs on."""
        while True:
            self.step()
            for item in request.drain():
                if isinstance(item, BaseException):
                    raise item
                yield item
            if request.done:
                return

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.prefilling or self.batch.rows or not self.inbox.empty())

    def active_adapters(self) -> set[str | None]:
        """Adapters that queued or running requests use (the server must not evict these)."""
        requests = [*self.waiting, *self.batch.rows, *([self.prefilling] if self.prefilling else [])]
        return {r.adapter for r in requests if not r.done}

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, prefill one chunk, decode one token for every running request. True while work is left."""
        try:
            self._step()
        except Exception as exc:  # a bug here must fail the requests, not stop the loop that serves them
            for r in [*self.waiting, *self.batch.rows, *([self.prefilling] if self.prefilling else [])]:
                self._finish(r, "error", exc)
            self.waiting.clear()
            self.prefilling, self.batch = None, Batch()
        return self.busy

    def _step(self) -> None:
        while not self.inbox.empty():
            self._accept(self.inbox.get_nowait())
        self._drop_cancelled()
        budget = self.limits.prefill_chunk
        while budget > 0:
            self._admit()
            if self.prefilling is None:
                break
            r = self.prefilling
            n = min(budget, len(r.prompt_ids) - r.prefilled)
            self._guard(functools.partial(self._prefill_chunk, n), [r])
            budget -= n
        if self.batch.rows:
            self._guard(self._decode, list(self.batch.rows))

    def _guard(self, fn: Callable[[], None], requests: list[Request]) -> None:
        """An error in a forward pass fails the requests in it, not the engine."""
        try:
            fn()
        except Exception as exc:
            for r in requests:
                self._finish(r, "error", exc)
            self._compact()
            if self.prefilling in requests:
                self.prefilling = None

    def _accept(self, r: Request) -> None:
        try:
            check_fits(self.model, len(r.prompt_ids), r.settings.max_new_tokens)
            if r.reserve > self.limits.kv_tokens:
                raise GenerationError(
                    f"the prompt ({len(r.prompt_ids)} tokens) plus max_new_tokens ({r.settings.max_new_tokens}) "
                    f"needs {r.reserve} KV cache slots, more than this server's {self.limits.kv_tokens} "
                    "(KV_CACHE_TOKENS): shorten the prompt or lower max_new_tokens"
                )
        except GenerationError as exc:
            self._finish(r, "error", exc)
            return
        r.stats.input_token_count = len(r.prompt_ids)
        r.text = TextStream(self.tokenizer, r.settings.stop_sequences)
        r.processors = _logits_processors(r.settings)
        if r.settings.samples:
            r.generator = torch.Generator(device=self.device)
            r.generator.manual_seed(r.settings.seed if r.settings.seed is not None else torch.seed())
        self.waiting.append(r)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.waiting if r.cancel.is_set()]:
            self.waiting.remove(r)
            self._finish(r, "cancelled")
        if self.prefilling is not None and self.prefilling.cancel.is_set():
            self._finish(self.prefilling, "cancelled")
            self.prefilling = None
        if any(r.cancel.is_set() for r in self.batch.rows):
            for r in self.batch.rows:
                if r.cancel.is_set():
                    self._finish(r, "cancelled")
            self._compact()
        now = time.monotonic()
        for r in [r for r in self.waiting if now - r.submitted > self.limits.queue_timeout_s]:
            self.waiting.remove(r)
            self._finish(
                r,
                "error",
                GenerationError(
                    f"the server is at capacity: the request waited {now - r.submitted:.0f} s without starting; "
                    "retry later"
                ),
            )

    def _admit(self) -> None:
        """Start prefilling the oldest waiting request if the batch and the KV budget have room for it."""
        if self.prefilling is not None or not self.waiting:
            return
        r = self.waiting[0]
        running = [*self.batch.rows]
        if len(running) + 1 > self.limits.max_batch:
            return
        # The padded cache holds rows x the longest row: bound that, not the sum of the rows.
        longest = max([r.reserve, *(x.reserve for x in running)])
        if (len(running) + 1) * longest > self.limits.kv_tokens:
            return
        self.waiting.popleft()
        self.prefilling = r

    # -- the runner -------------------------------------------------------------------------
    def _forward(self, adapters: list[str | None], **kwargs: Any) -> torch.Tensor:
        extra = self.prepare(adapters)
        out = self.model(use_cache=True, logits_to_keep=1, **kwargs, **extra)
        return out.logits[:, -1, :].float()

    def _prefill_chunk(self, n: int) -> None:
        r = self.prefilling
        assert r is not None
        if r.cache is None:
            from transformers import DynamicCache

            r.cache = DynamicCache()
        start = r.prefilled
        end = start + n
        ids = torch.tensor([r.prompt_ids[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        with quant.fp32_weights():  # prompts: exact and fast; see quant.py
            logits = self._forward([r.adapter], input_ids=ids, position_ids=positions, cache=r.cache)
        r.prefilled = end
        if end < len(r.prompt_ids):
            return
        self.prefilling = None
        cache, r.cache = r.cache, None
        if self._emit(r, self._sample(r, logits[0:1])):
            self.batch.join(r, cache)

    def _decode(self) -> None:
        batch = self.batch
        assert batch.mask is not None
        rows = batch.rows
        last = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = batch.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(
            [r.adapter for r in rows],
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            cache=batch.cache,
        )
        batch.mask = mask
        greedy = logits.argmax(dim=-1).tolist()
        keep = []
        for i, r in enumerate(rows):
            plain = not r.settings.samples and not r.processors
            token = greedy[i] if plain else self._sample(r, logits[i : i + 1])
            if self._emit(r, token):
                keep.append(i)
        batch.keep(keep)

    def _sample(self, r: Request, scores: torch.Tensor) -> int:
        if r.processors:
            ids = torch.tensor([r.prompt_ids + r.generated], device=self.device)
            scores = r.processors(ids, scores)
        if r.settings.samples:
            return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=r.generator))
        return int(scores.argmax(dim=-1))

    def _emit(self, r: Request, token: int) -> bool:
        """Record a sampled token and send its text; False when the request is finished."""
        if not r.generated and not r.first_token_at:
            r.first_token_at = time.perf_counter()
            r.stats.time_to_first_token = r.first_token_at - r.stats.started
        if token in self.stop_ids:
            self._finish(r, "eos")
            return False
        r.generated.append(token)
        r.stats.output_token_count = len(r.generated)
        assert r.text is not None
        chunk = r.text.push(token)
        if chunk:
            r.outbox.put(chunk)
        if r.text.stopped:
            self._finish(r, "stop_sequence")
            return False
        if len(r.generated) >= r.settings.max_new_tokens:
            self._finish(r, "length")
            return False
        return True

    def _finish(self, r: Request, reason: str, error: BaseException | None = None) -> None:
        if r.done:
            return
        r.done = True
        r.cache = None
        r.stats.stop_reason = reason
        if r.first_token_at:
            r.stats.decode_seconds = time.perf_counter() - r.first_token_at
        if error is not None:
            r.outbox.put(error)
        else:
            tail = r.text.flush() if r.text is not None and reason != "cancelled" else ""
            if tail:
                r.outbox.put(tail)
        r.outbox.put(DONE)
        if r.on_finish is not None:
            r.on_finish(r)

    def _compact(self) -> None:
        self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.done])
