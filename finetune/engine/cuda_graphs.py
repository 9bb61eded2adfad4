"""The engine's decode step as CUDA graphs (`SERVE_COMPILE=auto` on a GPU).

On a GPU a small model's decode step is launch-bound: every op of decoder.Decoder's forward is a
kernel of a few microseconds, and the host takes longer to issue it than the GPU to run it (the
135M model decoded at 22 tokens/s on an H200 before this). A CUDA graph records the step's
kernels once and replays them with one launch.

A graph replays fixed addresses and shapes, so the step here is a static version of decoder.py's:

* the KV cache lives in one pool per layer, [columns, rows, kv heads, head dim] (time-major, like
  decoder.KV), and the batch's `KV` becomes a view of it (`_adopt`: one copy when a request joins
  or leaves the batch, none per token); the new key/value is written at the column a device
  scalar names, and attention reads a bucket of columns (a power of two >= 64) under a mask
  that hides the columns past the cache and each row's left padding;
* rows are padded to a bucket (1, 2, 4, ... up to the batch limit); the padding rows compute
  garbage nobody reads;
* one graph per (rows, columns) bucket, captured on first use (milliseconds) and dropped when the
  weights they read move (fused anew, an adapter swapped by replacing tensors) or the pool grows;
* the pool (rows bucket x columns bucket) comes out of the engine's KV budget (`pool_tokens`, the
  KV_CACHE_TOKENS slots): a step whose pool would be larger decodes eagerly, and a pool or a
  recording the GPU cannot allocate drops the graphs, lowers the limit and decodes eagerly, so an
  out-of-memory error here never reaches a request.

What a graph does not cover runs eagerly, as on CPU: prefill (matmul-bound), per-request LoRA
adapters (unmerged), quantized or biased linear layers, models decoder.py does not cover.
`capture=False` runs the same static step without graphs: the tests check its logits against
the eager step on a CPU."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import quant
from .cpu_layer import rms_norm_fp32
from .cpu_step import CompiledStep
from .decoder import KV, Decoder, base_linear

MIN_COLUMNS = 64  # the smallest column bucket: a short prompt's first graph serves its first 64 tokens


def _bucket(n: int, floor: int = 1) -> int:
    """The power of two >= max(n, floor)."""
    return 1 << (max(n, floor) - 1).bit_length()


@dataclass
class _Graph:
    """One captured step (or, without capture, the same buffers run eagerly)."""

    ids: torch.Tensor  # [rows, 1]
    positions: torch.Tensor  # [rows, 1]
    mask: torch.Tensor  # [rows, columns], True where a row may attend
    column: torch.Tensor  # 0-dim: where the new key/value goes
    logits: torch.Tensor | None = None  # [rows, vocab], written by each replay
    graph: Any = None

    @staticmethod
    def buffers(rows: int, columns: int, device: torch.device) -> _Graph:
        return _Graph(
            ids=torch.zeros(rows, 1, dtype=torch.long, device=device),
            positions=torch.zeros(rows, 1, dtype=torch.long, device=device),
            mask=torch.zeros(rows, columns, dtype=torch.bool, device=device),
            column=torch.zeros((), dtype=torch.long, device=device),
        )


class GraphStep:
    """The engine's `compiled` hook on a GPU: `forward` as cpu_step.CompiledStep's."""

    def __init__(self, max_rows: int, capture: bool = True, pool_tokens: int | None = None) -> None:
        self.max_rows = max_rows
        self.capture = capture
        # The engine's KV budget in token slots (rows x columns): the pool never holds more, so a
        # long prompt decodes eagerly instead of asking for a pool the budget never counted.
        self.pool_tokens = pool_tokens
        self.weights = CompiledStep(None, "none", "none", None)  # gathers the fused weights it reads
        self.pool_k: list[torch.Tensor] = []
        self.pool_v: list[torch.Tensor] = []
        self.columns = 0
        self.pool_rows = 0
        self._eager_logged: set[str] = set()
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.steps = 0  # decode steps this object ran (replays, or eager runs without capture)
        self._prepared: tuple[Any, ...] | None = None
        self._pointers: tuple[int, ...] = ()
        self._plain = False

    def row_bucket(self, rows: int) -> int:
        return min(_bucket(rows), self.max_rows)

    # -- what the step reads ----------------------------------------------------------------
    def _ready(self, decoder: Decoder) -> bool:
        """The weights are plain fused fp/bf16 matrices the graphs can read; graphs recorded for
        other tensors are dropped."""
        prepared = self.weights.prepared(decoder)
        if prepared is None:
            return False
        if prepared is not self._prepared:
            embed, layers, norm, head = prepared
            tensors = [embed, *(t for layer in layers for t in layer), norm, *head]
            pointers = tuple(t.data_ptr() for t in tensors)
            if pointers != self._pointers:
                self.graphs.clear()
            self._prepared, self._pointers = prepared, pointers
            # CompiledStep.covers checks kind and bias; a graph also needs torch's own Linear (not
            # bitsandbytes' or another library's layer) and the six tensors a layer of kind none has.
            bases = [base_linear(m) for layer in decoder.layers() for m in layer.linears]
            self._plain = all(type(b) is torch.nn.Linear for b in bases) and all(len(x) == 6 for x in layers)
        return self._plain

    def _fits(self, rows: int, columns: int) -> bool:
        return self.pool_tokens is None or rows * columns <= self.pool_tokens

    def _eager(self, why: str) -> None:
        """Log once per reason that steps of this size decode eagerly."""
        if why not in self._eager_logged:
            self._eager_logged.add(why)
            print(f"compile: {why}: those steps decode eagerly", file=sys.stderr, flush=True)

    def _grow(self, kv: KV, rows: int, columns: int) -> bool:
        """A pool of at least `rows` x `columns` slots within the budget (columns doubled when that
        still fits, so a growing context re-allocates rarely). The new pool is made before anything
        of the old one changes: a failed allocation leaves the step as it was."""
        if columns <= self.columns and rows <= self.pool_rows and self.pool_k:
            return True
        rows = max(rows, self.pool_rows)
        if not self._fits(rows, columns):
            self._eager(
                f"a {rows}-row x {columns}-column pool is over the KV budget of {self.pool_tokens} slots"
            )
            return False
        wide = max(columns, 2 * self.columns)
        columns = wide if self._fits(rows, wide) else columns
        template = kv.keys[0]
        shape = (columns, rows, *template.shape[2:])
        try:
            # Zeros, not empty: masked columns still enter attention's sums (times 0), and 0 x NaN is NaN.
            pool_k = [template.new_zeros(shape) for _ in kv.keys]
            pool_v = [template.new_zeros(shape) for _ in kv.values]
        except torch.OutOfMemoryError:
            self.out_of_memory(rows * columns)
            return False
        self.pool_k, self.pool_v, self.columns, self.pool_rows = pool_k, pool_v, columns, rows
        self.graphs.clear()
        return True

    def out_of_memory(self, slots: int) -> None:
        """Drop the graphs and the pool, and keep later pools below the size that failed."""
        self.graphs.clear()
        self.pool_k, self.pool_v, self.columns, self.pool_rows = [], [], 0, 0
        self.pool_tokens = min(self.pool_tokens or slots, max(slots // 2, MIN_COLUMNS))
        self._eager(f"out of GPU memory for a pool of {slots} slots (now at most {self.pool_tokens})")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _adopt(self, kv: KV, rows: int, padded: int, columns: int) -> bool:
        """Make `kv` (rows x kv.length tokens) a view of the pool, growing the pool to `padded` x
        `columns`; False when the budget or the GPU's memory cannot hold that pool."""
        if not self._grow(kv, padded, columns):
            return False
        pool_k, pool_v = self.pool_k, self.pool_v
        if kv.keys[0].data_ptr() == pool_k[0].data_ptr() and kv.keys[0].shape[:2] == (self.columns, rows):
            return True
        n = kv.length
        for i in range(len(kv.keys)):
            pool_k[i][:n, :rows] = kv.keys[i][:n]
            pool_v[i][:n, :rows] = kv.values[i][:n]
            kv.keys[i], kv.values[i] = pool_k[i][:, :rows], pool_v[i][:, :rows]
        kv.capacity = self.columns
        return True

    # -- one step ---------------------------------------------------------------------------
    def forward(
        self,
        decoder: Decoder,
        ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KV,
        mask: torch.Tensor | None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor | None:
        """Logits [rows, vocab] for one new token per row, appended to `kv` as Decoder.forward does;
        None when a graph does not cover this step (the engine runs it eagerly): per-row adapters
        (`adapter_names`), and whatever `_ready` refuses."""
        rows = ids.shape[0]
        decode = ids.shape[1] == 1 and kv.length >= 1 and not quant.eager_only()
        if not decode or adapter_names is not None or rows > self.max_rows or not self._ready(decoder):
            return None
        padded, length = self.row_bucket(rows), kv.length
        columns = _bucket(length + 1, MIN_COLUMNS)
        if not self._adopt(kv, rows, padded, columns):
            return None
        try:
            logits = self._run(decoder, ids, positions, kv, mask, padded, columns)
        except torch.OutOfMemoryError:
            # Nothing advanced: the eager step that follows writes this token's key/value again.
            self.out_of_memory(padded * columns)
            return None
        kv.advance(1)
        self.steps += 1
        return logits

    def _run(
        self,
        decoder: Decoder,
        ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KV,
        mask: torch.Tensor | None,
        padded: int,
        columns: int,
    ) -> torch.Tensor:
        """Fill the bucket's inputs, record its graph on first use, replay it."""
        rows, length = ids.shape[0], kv.length
        g = self.graphs.get((padded, columns))
        fresh = g is None
        if g is None:
            g = self.graphs[(padded, columns)] = _Graph.buffers(padded, columns, ids.device)
        g.ids[:rows] = ids
        g.positions[:rows] = positions
        g.mask[:, : length + 1] = True
        g.mask[:, length + 1 :] = False
        if mask is not None:
            g.mask[:rows, : length + 1] = mask
        g.column.fill_(length)
        if fresh:  # after the inputs are in place: recording runs the step on them
            self._record(decoder, g, padded, columns)
        if g.graph is not None:
            g.graph.replay()
        else:
            g.logits = self._step(decoder, g, padded, columns)
        assert g.logits is not None
        return g.logits[:rows].clone()  # the next replay overwrites the graph's output

    def _record(self, decoder: Decoder, g: _Graph, rows: int, columns: int) -> None:
        """Run the step once outside a graph, then record it. Both run on this step's inputs (the
        caller filled them first), so the key/value they write is the one the replay that follows
        writes again: recording changes nothing. Without capture only the first run happens, so
        that the CPU tests check that claim (inputs filled after recording wrote a zero step's
        key/value over column 0 on the GPU)."""
        forward = lambda: self._step(decoder, g, rows, columns)  # noqa: E731
        if not self.capture:
            forward()
            return
        device = g.ids.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # kernel selection and workspace allocation, outside the graph
            forward()
        torch.cuda.current_stream(device).wait_stream(stream)
        g.graph = torch.cuda.CUDAGraph()
        # Each graph has its own memory pool: a step's intermediates are a few MB, and a pool shared
        # through torch.cuda.graph_pool_handle() failed an allocator assert at the second capture
        # (torch 2.11, H200).
        with torch.cuda.graph(g.graph):
            g.logits = forward()

    def _step(self, decoder: Decoder, g: _Graph, rows: int, columns: int) -> torch.Tensor:
        """decoder.Decoder._forward's math for one token per row over the pool: only fixed shapes and
        device tensors, so that it can be recorded."""
        assert self._prepared is not None
        embed, layers, norm, head = self._prepared
        inner = decoder.base.model
        eps = inner.norm.variance_epsilon
        heads, kv_heads, head_dim = decoder.heads, decoder.kv_heads, decoder.head_dim
        x = F.embedding(g.ids, embed)
        cos, sin = inner.rotary_emb(x, g.positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        attend = g.mask[:, None, None, :]
        where = g.column.view(1)
        half = head_dim // 2
        for i, (norm1, qkv, o_proj, norm2, gate_up, down) in enumerate(layers):
            out = F.linear(rms_norm_fp32(x, norm1, eps), qkv).view(rows, 1, heads + 2 * kv_heads, head_dim)
            qk = out[:, :, : heads + kv_heads]
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], out[:, :, heads + kv_heads :]
            keys, values = self.pool_k[i][:columns, :rows], self.pool_v[i][:columns, :rows]
            keys.index_copy_(0, where, k.transpose(0, 1))
            values.index_copy_(0, where, v.transpose(0, 1))
            a = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                keys.permute(1, 2, 0, 3),
                values.permute(1, 2, 0, 3),
                attn_mask=attend,
                scale=decoder.scaling,
                enable_gqa=heads != kv_heads,
            )
            x = x + F.linear(a.transpose(1, 2).reshape(rows, 1, -1), o_proj)
            g_, u = F.linear(rms_norm_fp32(x, norm2, eps), gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g_) * u, down)
        return F.linear(rms_norm_fp32(x[:, -1], norm, eps), head[0]).float()


def load(
    decoder: Decoder | None, device: torch.device, max_rows: int, pool_tokens: int | None = None
) -> GraphStep | None:
    """The CUDA-graph decode step for a model on a GPU (None, with the reason printed: eager)."""
    if decoder is None:
        print("compile: decoding eagerly: decoder.py does not cover this model", file=sys.stderr, flush=True)
        return None
    step = GraphStep(max_rows, capture=device.type == "cuda", pool_tokens=pool_tokens)
    print(
        f"compile: decode steps run as CUDA graphs (recorded per batch and context bucket, up to {max_rows} rows)",
        file=sys.stderr,
        flush=True,
    )
    return step
