"""The serving engine: continuous batching of every request of a server in one decode loop.

A scheduler plus a runner, as in vLLM. Each `step()` the scheduler drops cancelled requests,
admits waiting ones while the batch and the KV budget allow, runs one prefill chunk of the newest
request (so a long prompt delays the running decodes by one chunk, not by its whole length) and one
batched decode step for every running request. A finished or cancelled request leaves the batch at
once and its rows of the KV cache are freed.

The running requests' KV cache (batch.Batch over decoder.KV, allocated ahead) has one row per
request, left-padded to a common length; the attention mask hides the padding and the positions are
each row's own, so a row computes what it would alone. Prompt prefixes are kept for the next request
that starts the same way (prefix_cache.PrefixCache; the chunk boundaries and keys are decided here).
Llama-architecture models run decoder.Decoder's forward, others transformers' own over the same
cache; decode steps a fast step covers (fast_paths.load_step) run through it. Rows may use different
LoRA adapters: the server's `prepare` hook sets the model up for the step's adapters (a merged setup
adapter, one active adapter, or PEFT's per-row `adapter_names`).

Everything here runs on one thread (the server's compute thread, or the caller's for
`stream_tokens` below); requests talk to the outside only through their outbox queue."""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import GenerationSettings
from ..data.encoding import encode_prompt
from . import quant
from .batch import Batch
from .decoder import KV, Decoder, hf_forward, unsupported
from .prefix_cache import PrefixCache, prefix_keys
from .requests import (
    DONE,
    GenerationError,
    GenerationStats,
    Request,
    TextStream,
    check_fits,
    eos_ids,
    logits_processors,
)

log = logging.getLogger(__name__)
_NO_IDS = torch.empty(1, 0, dtype=torch.long)  # the samplers' ids argument when no processor reads it


# The share of free memory after loading a CPU server's KV cache takes when KV_CACHE_TOKENS is unset
# (a GPU server takes what its memory plan leaves, plan.largest_kv_budget).
KV_MEMORY_SHARE = 0.25


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
    prefix_tokens: int = 1024
    """Prompt-prefix KV kept for reuse (PrefixCache), in tokens; 0 turns the reuse off."""
    max_waiting: int = 64
    """Requests waiting to start at most; more are refused at once (never queued without bound)."""


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        limits: EngineLimits | None = None,
        prepare: Callable[[list[str | None]], dict[str, Any]] | None = None,
        own_forward: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.limits = limits or EngineLimits()
        # Sets the model up for a forward pass whose rows use these adapters; returns extra forward kwargs.
        self.prepare = prepare or (lambda adapters: {})
        self.device = next(model.parameters()).device
        # decoder.Decoder for Llama models; False: transformers' forward for every model (the bench
        # compares the two on the same cache).
        self.own_forward = own_forward
        self._decoder: tuple[Any, Decoder | None] = (None, None)
        # fast_paths.load_step's step: decode steps it covers run through it (the server sets it up).
        self.compiled: Any = None
        self.stop_ids = eos_ids(model, tokenizer)
        self.inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()  # from any thread
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.batch = Batch()
        self.prefixes = PrefixCache(self.limits.prefix_tokens)
        # The state of the weights a request's prefill runs on, beside its adapter's name (the server
        # tells a merged setup adapter from an unmerged one, and an adapter from a later one of the
        # same name); called after `prepare` has set the model up for that prefill.
        self.prefix_tag: Callable[[str | None], Any] = lambda adapter: None

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
            r = self.prefilling
            if r is None:
                break
            if r.cache is None:
                self._guard(functools.partial(self._reuse_prefix, r), [r])
                if self.prefilling is not r:
                    continue
            n = self._chunk_end(r) - r.prefilled
            if n > budget and budget < self.limits.prefill_chunk:
                break  # the next chunk does not fit what is left of this step's budget: next step
            self._guard(functools.partial(self._prefill_chunk, n), [r])
            budget -= n
        if self.batch.rows:
            self._guard(self._decode, list(self.batch.rows))

    def _guard(self, fn: Callable[[], None], requests: list[Request]) -> None:
        """An error in a forward pass fails the requests in it, not the engine."""
        try:
            fn()
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                exc = self._out_of_memory(exc)
            for r in requests:
                self._finish(r, "error", exc)
            self._compact()
            if self.prefilling in requests:
                self.prefilling = None

    def _out_of_memory(self, exc: torch.OutOfMemoryError) -> GenerationError:
        """Give the allocator's cached blocks back, so the next request starts from a clean pool, and
        say what the request can change (the allocator's own message is about the whole device)."""
        log.warning("out of memory in a forward pass: %s", exc)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return GenerationError(
            f"the {self.device.type.upper()} ran out of memory for this request; retry, or shorten the prompt or "
            "lower max_new_tokens (the operator can lower KV_CACHE_TOKENS or MAX_BATCH_SIZE)"
        )

    def _accept(self, r: Request) -> None:
        """Check a new request and set up its sampling state; any failure here fails it alone."""
        try:
            check_fits(self.model, len(r.prompt_ids), r.settings.max_new_tokens)
            if r.reserve > self.limits.kv_tokens:
                raise GenerationError(
                    f"the prompt ({len(r.prompt_ids)} tokens) plus max_new_tokens ({r.settings.max_new_tokens}) "
                    f"needs {r.reserve} KV cache slots, more than this server's {self.limits.kv_tokens} "
                    "(KV_CACHE_TOKENS): shorten the prompt or lower max_new_tokens"
                )
            if len(self.waiting) >= self.limits.max_waiting:
                raise GenerationError(
                    f"the server is at capacity: {len(self.waiting)} requests are already waiting to start; "
                    "retry later"
                )
            r.stats.input_token_count = len(r.prompt_ids)
            r.text = TextStream(self.tokenizer, r.settings.stop_sequences)
            r.processors = logits_processors(r.settings)
            if r.settings.repetition_penalty != 1.0:
                # Only the penalty reads the ids: one buffer filled token by token, not a new tensor of
                # the whole sequence every step.
                r.seen = torch.empty(1, r.reserve, dtype=torch.long, device=self.device)
                r.seen[0, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
            if r.settings.samples:
                r.generator = torch.Generator(device=self.device)
                r.generator.manual_seed(r.settings.seed if r.settings.seed is not None else torch.seed())
        except Exception as exc:
            self._finish(r, "error", exc)
            return
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
    def decoder(self) -> Decoder | None:
        """Our forward for this model (None: transformers'); rebuilt when the server wraps the model."""
        if not self.own_forward:
            return None
        if self._decoder[0] is not self.model:
            self._decoder = (self.model, None if unsupported(self.model) else Decoder(self.model))
        return self._decoder[1]

    def _forward(
        self,
        adapters: list[str | None],
        ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KV,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        extra = self.prepare(adapters)
        decoder = self.decoder()
        if decoder is not None:
            if self.compiled is not None:
                logits = self.compiled.forward(decoder, ids, positions, kv, mask, extra.get("adapter_names"))
                if logits is not None:
                    return logits
            return decoder.forward(ids, positions, kv, mask, extra.get("adapter_names"))
        return hf_forward(self.model, kv, extra, input_ids=ids, position_ids=positions, attention_mask=mask)

    def _chunk_end(self, r: Request) -> int:
        """Where the prefill chunk that starts at r.prefilled ends: the next of r's boundaries, or
        the prompt's end."""
        return next((end for end in self._boundaries(r) if end > r.prefilled), len(r.prompt_ids))

    def _head(self, r: Request) -> int:
        if not self.limits.prefix_tokens:
            return 0
        return min(r.head, self.limits.prefill_chunk, len(r.prompt_ids) - 1)

    def _boundaries(self, r: Request) -> list[int]:
        """r's chunk boundaries before its last token: the head (at most one chunk long), then every
        prefill_chunk tokens from there. Prefill chunks end there, and so do cached prefixes (the
        last token is always prefilled, for the logits of the first new token). They depend on the
        prompt alone, not on what else is waiting: a matmul over rows [a, b) does not give every row
        the same bits as one over [0, n) (fp32 on CPU, measured: splits at 8 or 25 of 43 prompt
        tokens changed logits by ~2e-5), so a prompt's cache, and its text, would otherwise depend
        on load; and a reused chunk holds the bits a fresh one would."""
        head, chunk = self._head(r), self.limits.prefill_chunk
        return ([head] if head else []) + list(range(head + chunk, len(r.prompt_ids), chunk))

    def _chain(self, r: Request, ends: list[int]) -> list[tuple[Any, ...]]:
        """The cache keys of r's prefixes up to each of `ends` (a start of _boundaries(r))."""
        return prefix_keys(r, ends, self.prefix_tag(r.adapter))

    def _reuse_prefix(self, r: Request) -> None:
        """Start r's cache from its longest cached prefix, if any (the model set up as for its prefill)."""
        r.cache = KV(len(r.prompt_ids))
        ends = self._boundaries(r) if self.limits.prefix_tokens else []
        if ends:
            self.prepare([r.adapter])
            cached = self.prefixes.get(self._chain(r, ends), len(r.prompt_ids))
            if cached is not None:
                r.cache, r.prefilled = cached, cached.length

    def _prefill_chunk(self, n: int) -> None:
        r = self.prefilling
        assert r is not None
        start = r.prefilled
        end = start + n
        ids = torch.tensor([r.prompt_ids[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device).unsqueeze(0)
        # Eager; each layer's kernel chosen by its kind and the CPU, never by the row count (quant.py).
        with quant.prefill():
            logits = self._forward([r.adapter], ids, positions, r.cache, None)
        r.prefilled = end
        if end < len(r.prompt_ids):
            if self.limits.prefix_tokens:
                ends = [e for e in self._boundaries(r) if e <= end]
                self.prefixes.put(self._chain(r, ends), r.cache, start)
            return
        self.prefilling = None
        cache, r.cache = r.cache, None
        if self._emit(r, self._sample(r, logits[0:1])):
            self.batch.join(r, cache)

    def _decode(self) -> None:
        batch = self.batch
        assert batch.mask is not None and batch.kv is not None
        rows = batch.rows
        last = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = batch.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        try:
            logits = self._forward(
                [r.adapter for r in rows], last, positions, batch.kv, mask if batch.padded else None
            )
        except Exception:
            if len(rows) == 1:
                raise  # _guard fails the request
            logits = self._decode_rows_alone(last, positions)
        batch.mask = mask
        greedy = logits.argmax(dim=-1).tolist()
        keep = []
        for i, r in enumerate(rows):
            if r.done:  # its forward failed alone
                continue
            try:
                plain = not r.settings.samples and not r.processors
                token = greedy[i] if plain else self._sample(r, logits[i : i + 1])
            except Exception as exc:  # e.g. NaN logits from its adapter: this row's failure only
                self._finish(r, "error", GenerationError(f"sampling failed: {exc}"))
                continue
            if self._emit(r, token):
                keep.append(i)
        batch.keep(keep)

    def _decode_rows_alone(self, last: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The batched forward failed: run each row on its own (a one-row view of its cache columns),
        write its new keys and values back into the batch's cache, and fail only the rows whose own
        forward fails. A failed forward never advanced the cache, so nothing of it is left."""
        batch = self.batch
        assert batch.mask is not None and batch.kv is not None
        kv, rows = batch.kv, batch.rows
        kv.reserve(1)
        out: list[torch.Tensor | None] = []
        for i, r in enumerate(rows):
            start = int(batch.mask[i].int().argmax())  # its first column (left padding before it)
            own = kv.rows_of([i], start)
            try:
                logits = self._forward([r.adapter], last[i : i + 1], positions[i : i + 1], own, None)
            except Exception as exc:
                log.warning("a request's decode step failed alone: %s", exc)
                self._finish(r, "error", GenerationError(f"the model failed on this request: {exc}"))
                out.append(None)
                continue
            for mine, theirs in ((own.keys, kv.keys), (own.values, kv.values)):
                for layer, t in enumerate(mine):
                    theirs[layer][kv.length, i] = t[own.length - 1, 0]
            out.append(logits)
        kv.advance(1)
        like = next((t for t in out if t is not None), None)
        if like is None:
            raise GenerationError("the model failed on every request of the batch")
        # A failed row's logits are never read (it is finished); NaN keeps the rows in place.
        return torch.cat([like.new_full(like.shape, float("nan")) if t is None else t for t in out])

    def _sample(self, r: Request, scores: torch.Tensor) -> int:
        if r.processors:
            n = len(r.prompt_ids) + len(r.generated)
            ids = r.seen[:, :n] if r.seen is not None else _NO_IDS
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
        if r.seen is not None:
            r.seen[0, len(r.prompt_ids) + len(r.generated) - 1] = token
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
        r.cache = r.seen = None
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
            try:
                r.on_finish(r)
            except Exception:  # cleanup after a request must not stop the engine that serves the rest
                log.exception("cleaning up after a request failed")

    def _compact(self) -> None:
        self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.done])


def stream_tokens(
    model: Any,
    tokenizer: Any,
    prompt: str,
    settings: GenerationSettings,
    stats: GenerationStats | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[str]:
    """Yield text chunks for `prompt` (already templated), in this thread: the serving engine with
    one request. Stops at EOS, a stop sequence, max_new_tokens or `cancel` (checked before every
    token); the stop sequence is never yielded."""
    # transformers' forward: the model here may be mid-training (its precision, its autocast);
    # decoder.py's forward serves (ModelServer), where the model is set up for it.
    engine = Engine(model, tokenizer, own_forward=False)
    request = Request(encode_prompt(tokenizer, prompt), settings, stats=stats or GenerationStats())
    if cancel is not None:
        request.cancel = cancel
    yield from engine.drive(engine.submit(request))
