"""Keys and values of prompt prefixes kept for reuse across requests (`PREFIX_CACHE_TOKENS`): a
prompt template's head, then whole prefill chunks, so that a request whose prompt starts as an
earlier one's skips prefilling that part. Bounded in tokens, least recently used dropped first;
the engine (scheduler.py) decides the chunk boundaries; `prefix_keys` makes the keys."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Any

import torch

from .decoder import KV
from .requests import Request


class PrefixCache:
    """Keys and values of prompt prefixes that end at chunk boundaries (Engine._boundaries: a
    template's head, then every prefill_chunk tokens), one entry per chunk holding that chunk's
    columns, least recently used first, bounded in tokens. A prefix's keys and values depend only on
    its tokens and the weights that computed them, so an entry's key holds the adapter, a tag for the
    weights' state (the server's `prefix_tag`), the chunk's end and a SHA-256 of every prompt token up
    to it (chained chunk by chunk: linear in the prompt; a cryptographic hash, so that no prompt can be
    made to collide with another user's and be answered from its keys and values). Reuse is
    exact: the boundaries depend on the prompt alone, so a prompt that reuses chunks and one that
    prefills them run the same kernels on the same rows. Of a prompt's chunks, the first is kept
    longest: a later chunk is no use without the ones before it."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.held = 0
        self.hits = 0
        self.entries: OrderedDict[tuple[Any, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = (
            OrderedDict()
        )

    def get(self, chain: list[tuple[Any, ...]], capacity: int) -> KV | None:
        """A one-row KV holding the longest run of cached chunks from the start of `chain` (a
        prompt's keys, boundary by boundary), with room for `capacity` columns."""
        found = []
        for key in chain:
            entry = self.entries.get(key)
            if entry is None:
                break
            found.append(entry)
        if not found:
            return None
        self._touch(chain[: len(found)])
        self.hits += 1
        return KV.from_prefix(
            [torch.cat(parts) for parts in zip(*(keys for keys, _ in found), strict=True)],
            [torch.cat(parts) for parts in zip(*(values for _, values in found), strict=True)],
            capacity,
        )

    def put(self, chain: list[tuple[Any, ...]], kv: KV, start: int) -> None:
        """Keep kv's columns [start, length) under chain[-1]; chain[:-1] are the chunks before it."""
        key, n = chain[-1], kv.length - start
        # A chunk whose predecessors are gone could never be reused.
        if key not in self.entries and n <= self.tokens and all(k in self.entries for k in chain[:-1]):
            self.entries[key] = (
                [k[start : kv.length].clone() for k in kv.keys],
                [v[start : kv.length].clone() for v in kv.values],
            )
            self.held += n
        self._touch(chain)
        while self.held > self.tokens:
            self._drop(next(iter(self.entries)))

    def forget(self, adapter: str | None = None) -> None:
        """Drop the prefixes computed with this adapter (all of them when None)."""
        for key in [k for k in self.entries if adapter is None or k[0] == adapter]:
            self._drop(key)

    def _touch(self, chain: list[tuple[Any, ...]]) -> None:
        for key in reversed(chain):  # the first chunk last: the most recently used, dropped last
            if key in self.entries:
                self.entries.move_to_end(key)

    def _drop(self, key: tuple[Any, ...]) -> None:
        keys, _ = self.entries.pop(key)
        self.held -= keys[0].shape[0] if keys else 0


def prefix_keys(r: Request, ends: list[int], tag: Any) -> list[tuple[Any, ...]]:
    """The PrefixCache keys of r's prompt prefixes up to each of `ends` (chunk boundaries, in
    order), with `tag` for the state of the weights: each chunk's digest chains the one before it,
    hashed once per request (kept in r.digests)."""
    while len(r.digests) < len(ends):
        i = len(r.digests)
        start, previous = (ends[i - 1], r.digests[-1]) if i else (0, b"")
        chunk = array("q", r.prompt_ids[start : ends[i]]).tobytes()
        r.digests.append(hashlib.sha256(previous + chunk).digest())
    return [(r.adapter, tag, end, digest) for end, digest in zip(ends, r.digests, strict=False)]
