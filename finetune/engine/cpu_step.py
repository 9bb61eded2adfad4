"""The engine's decode step compiled ahead of time on CPU (`SERVE_COMPILE=auto|off`).

A decode step of a small model in eager mode spends more time dispatching its ~40 ops a layer than
in the matmuls (measured on the 135M model with int4 weights: 35 ms a token eager, of which the
kernels are 12 ms). This module exports one decoder layer of decoder.Decoder's math, for one new
token per row, as one graph (`torch.export`) and compiles it with AOTInductor into a shared
library: the elementwise work is fused into a few C++ loops, the matmuls stay extern kernels (MKL,
torch's int4 kernel, our int8 op from kernel.py, which the library calls through the dispatcher),
and a layer is one C++ call. The step calls it once per layer (the layers share their shapes, so
one file serves any depth, and compiling takes the same time for 30 layers as for 2); embedding,
final norm and vocabulary projection run eagerly around it (three ops).

* Weights, keys and values are inputs, not constants: merging the setup adapter into the base (in
  place, or as new low-bit copies) changes what the next step reads, and one compiled file serves
  every layer, every adapter and every checkpoint of the same shape. Rows (1..the engine's batch)
  and the cached length are symbolic, so one file serves every batch and context.
* The file is cached under `SERVE_COMPILE_CACHE` (default: the user cache folder), keyed by what
  the generated code depends on (torch version, the math's source, the layer's shapes, dtype and
  weight kind). A first start on a machine compiles it; later starts load it at once. As for
  kernel.py's kernel, the folder must be private to this user, and the package and its unpacked
  copy are loaded only while their SHA-256 is the one recorded when they were made: anything else
  found there is rebuilt, never loaded.
* Unmerged LoRA adapters (per-request `lora_weights`, or the setup adapter beside them) run
  through a second file of the same layer with each row's LoRA terms added (`_LoraLayer`): every
  attached adapter's A and B are stacked per layer once, and each row picks its own by index, so
  rows on different adapters decode in one compiled step, as LoRAX and vLLM batch them. Steps
  where no row has an adapter (none, or the setup adapter merged) use the first file, which rows
  without an adapter match bit for bit (checked at load).
* Prompts are still prefilled eagerly (many rows at once are matmul-bound), and a step runs eagerly
  whenever the compiled math does not cover it: an adapter other than plain LoRA (DoRA, a bias on
  B), a layer left in fp32 among quantized ones, a model decoder.py does not cover. On a CUDA GPU
  the step runs as CUDA graphs instead (cuda_graphs.py), without per-request adapters.
* At load, the compiled step is checked against the eager one on the model itself; a file that
  disagrees is not used (and the reason is printed)."""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..settings import COMPILE_ENV
from ..settings import COMPILE_MODES as MODES
from . import kernel, quant
from .decoder import KV, PEFT_BASE, Decoder, base_linear, kv_geometry, plain_linear

CACHE_ENV = kernel.CACHE_ENV
_EXAMPLE_ROWS, _EXAMPLE_LENGTH = 2, 3  # export traces with sizes above 1 so neither is specialised
# LoRA stacks hold at least 2 slots and rank 2 (sizes of 1 would be specialised too); real adapters'
# ranks are padded up to a multiple of 8, so adapters of rank 4, 8 and 16 load into the same shapes.
_MIN_SLOTS, _MIN_RANK, _RANK_STEP = 2, 2, 8


def _linear(h: torch.Tensor, weight: tuple[torch.Tensor, ...], kind: str) -> torch.Tensor:
    """quant.py's forward of a base linear layer (fp32, or a low-bit copy)."""
    if kind == "none":
        return F.linear(h, weight[0])
    flat = h.reshape(-1, h.shape[-1])
    out = quant._matmul(kind, flat, weight[0], weight[1])
    return out.view(*h.shape[:-1], -1)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """decoder._rms_norm: in fp32 as transformers' LlamaRMSNorm, cast back after (no-op in fp32)."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


def _linears(h: torch.Tensor, parts: list[tuple[torch.Tensor, ...]], kind: str) -> torch.Tensor:
    """Modules that read the same input: one fused product, or one per part (see _fuse_low_bit)."""
    if len(parts) == 1:
        return _linear(h, parts[0], kind)
    return torch.cat([_linear(h, p, kind) for p in parts], dim=-1)


def _lora(h: torch.Tensor, slot: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each row's LoRA terms for the modules that read h [rows, 1, in], side by side as their fused
    product's columns: `slot` [rows] picks the row's adapter in the stacks a [slots, k, in] (the
    modules' A, one under the other) and b [slots, k, out] (their B x scaling, transposed, block
    diagonal). Slot 0 and padding are zeros: a row without an adapter adds exactly 0. Sums written
    out rather than bmm, so that each row is summed in one order whatever the batch (a request's text
    does not depend on its neighbours' adapters); b's sum runs along k, vectors along out."""
    down = (h[:, 0, None, :] * a[slot]).sum(-1)  # [rows, k]
    return (down[:, :, None] * b[slot]).sum(1).unsqueeze(1)  # [rows, 1, out]


def _plus(y: torch.Tensor, h: torch.Tensor, slot: torch.Tensor | None, pair: Any) -> torch.Tensor:
    """A base product y of input h, plus the rows' LoRA terms when the layer has stacks."""
    return y if slot is None else y + _lora(h, slot, *pair)


class _Layer(torch.nn.Module):
    """One layer of decoder.Decoder._forward for one new token per row, as a pure function of its
    inputs: returns the hidden state and the layer's new key and value (the caller appends them)."""

    def __init__(
        self, heads: int, kv_heads: int, head_dim: int, eps: float, scaling: float, kind: str
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.eps, self.scaling, self.kind = eps, scaling, kind

    def forward(
        self,
        x: torch.Tensor,  # [rows, 1, width]
        cos: torch.Tensor,  # [rows, 1, 1, head dim]
        sin: torch.Tensor,
        mask: torch.Tensor,  # [rows, length + 1], False on left padding
        norm1: torch.Tensor,
        qkv: list[tuple[torch.Tensor, ...]],
        o_proj: tuple[torch.Tensor, ...],
        norm2: torch.Tensor,
        gate_up: list[tuple[torch.Tensor, ...]],
        down: tuple[torch.Tensor, ...],
        past_k: torch.Tensor,  # [length, rows, kv heads, head dim]
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = (norm1, qkv, o_proj, norm2, gate_up, down)
        return self.math(x, cos, sin, mask, weights, past_k, past_v, None, [None] * 4)

    def math(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        weights: tuple[Any, ...],
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        slot: torch.Tensor | None,
        lora: list[Any],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads, kv_heads, head_dim, eps, kind = self.heads, self.kv_heads, self.head_dim, self.eps, self.kind
        norm1, qkv, o_proj, norm2, gate_up, down = weights
        rows = x.shape[0]
        h = rms_norm_fp32(x, norm1, eps)
        out = _plus(_linears(h, qkv, kind), h, slot, lora[0]).view(rows, 1, heads + 2 * kv_heads, head_dim)
        qk = out[:, :, : heads + kv_heads]
        half = head_dim // 2
        qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
        q, k, v = qk[:, :, :heads], qk[:, :, heads:], out[:, :, heads + kv_heads :]
        # [rows, kv heads, length + 1, head dim] views of the time-major cache plus the new token
        all_k = torch.cat([past_k, k.transpose(0, 1)]).permute(1, 2, 0, 3)
        all_v = torch.cat([past_v, v.transpose(0, 1)]).permute(1, 2, 0, 3)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            all_k,
            all_v,
            attn_mask=mask[:, None, None, :],
            scale=self.scaling,
            enable_gqa=heads != kv_heads,
        )
        a = a.transpose(1, 2).reshape(rows, 1, -1)
        x = x + _plus(_linear(a, o_proj, kind), a, slot, lora[1])
        h = rms_norm_fp32(x, norm2, eps)
        g, u = _plus(_linears(h, gate_up, kind), h, slot, lora[2]).chunk(2, dim=-1)
        m = F.silu(g) * u
        return x + _plus(_linear(m, down, kind), m, slot, lora[3]), k[:, 0], v[:, 0]


class _LoraLayer(_Layer):
    """_Layer with each row's adapter added to every linear module's output (`_lora`), as PEFT's
    layers add theirs to the base layer's: a second compiled file, used for steps with adapters."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        slot: torch.Tensor,  # [rows], each row's adapter in the stacks (0: none)
        norm1: torch.Tensor,
        qkv: list[tuple[torch.Tensor, ...]],
        o_proj: tuple[torch.Tensor, ...],
        norm2: torch.Tensor,
        gate_up: list[tuple[torch.Tensor, ...]],
        down: tuple[torch.Tensor, ...],
        lora: list[tuple[torch.Tensor, torch.Tensor]],  # (a, b) stacks of qkv, o, gate_up, down
        past_k: torch.Tensor,
        past_v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = (norm1, qkv, o_proj, norm2, gate_up, down)
        return self.math(x, cos, sin, mask, weights, past_k, past_v, slot, lora)


def _stackable(module: Any, name: str) -> bool:
    """The adapter is plain LoRA on this module, as `_lora` computes it: no DoRA or other variant,
    no bias on B, torch's Linear for A and B."""
    return (
        name not in getattr(module, "lora_variant", {})
        and not module.use_dora.get(name, False)
        and type(module.lora_A[name]) is torch.nn.Linear
        and type(module.lora_B[name]) is torch.nn.Linear
        and module.lora_B[name].bias is None
    )


Stacks = list[list[torch.Tensor]]  # per layer: a, b of qkv, o, gate_up, down


def _groups(decoder: Decoder) -> list[list[list[Any]]]:
    """Each layer's linear modules by input, in the order `_Layer` takes their stacks."""
    return [[layer.qkv, [layer.o_proj], layer.gate_up, [layer.down]] for layer in decoder.layers()]


def _stack(
    group: list[Any], adapters: dict[str, int], slots: int, rank: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The (a, b) stacks `_lora` takes for one group of modules: module g's A of adapter i in
    a[i, g*rank:][:r], its B x scaling, transposed, in b[i, g*rank:][:r, its columns]."""
    bases = [base_linear(m) for m in group]
    a = torch.zeros(slots, len(group) * rank, bases[0].in_features, dtype=dtype)
    b = torch.zeros(slots, len(group) * rank, sum(base.out_features for base in bases), dtype=dtype)
    column = 0
    for g, (m, base) in enumerate(zip(group, bases, strict=True)):
        for name, i in adapters.items():
            if m is not base and name in m.lora_A:
                r = m.lora_A[name].out_features
                a[i, g * rank : g * rank + r] = m.lora_A[name].weight.detach()
                b[i, g * rank : g * rank + r, column : column + base.out_features] = (
                    m.lora_B[name].weight.detach() * m.scaling[name]
                ).T
        column += base.out_features
    return [a, b]


def _lora_stacks(decoder: Decoder, dtype: torch.dtype) -> tuple[dict[str, int], Stacks]:
    """Every attached adapter that `_lora` can compute, by slot (from 1; 0 is no adapter), and each
    layer's stacks, every adapter's rank padded to the same multiple of _RANK_STEP."""
    modules = [m for layer in decoder.layers() for m in layer.linears if m is not base_linear(m)]
    names = {n for m in modules for n in m.lora_A}
    names -= {n for m in modules for n in m.lora_A if not _stackable(m, n)}
    adapters = {n: i + 1 for i, n in enumerate(sorted(names))}
    rank = max([m.lora_A[n].out_features for m in modules for n in adapters if n in m.lora_A] or [1])
    rank = -(-rank // _RANK_STEP) * _RANK_STEP
    slots = max(len(adapters) + 1, _MIN_SLOTS)
    stacks = [
        [t for group in groups for t in _stack(group, adapters, slots, rank, dtype)]
        for groups in _groups(decoder)
    ]
    return adapters, stacks


def _kind(module: Any) -> str:
    return getattr(base_linear(module), "qkind", "none")


def _copy(module: Any) -> tuple[torch.Tensor, ...]:
    """What a base linear layer's forward multiplies with now."""
    base = base_linear(module)
    return (base.qweight, base.qscales) if hasattr(base, "qkind") else (base.weight,)


# The CPU int4 layout packs rows in blocks: concatenating two packed copies is the packed
# concatenation only when every part but the last fills whole blocks (measured: 32-row parts fuse
# exactly, 16- and 48-row ones do not; 64 leaves a margin for other CPUs' layouts).
_INT4_ROW_BLOCK = 64


def _fuse_low_bit(kind: str, copies: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """One low-bit copy for modules that read the same input where that is exact: rows are
    quantized independently (int8 scales [rows], int4 scales [groups, rows, 2]), so the fused
    product is the concatenation of theirs. Otherwise the parts, multiplied one by one."""
    if kind == "int4" and any(c[0].shape[0] % _INT4_ROW_BLOCK for c in copies[:-1]):
        return copies
    weights = torch.cat([c[0] for c in copies])
    scales = torch.cat([c[1] for c in copies], dim=0 if kind == "int8" else 1)
    return [(weights, scales)]


class CompiledStep:
    """The compiled decode step of one model, with the weights it reads gathered for each call.
    `runner` takes the layer's inputs as one flat list (the loaded package's `boxed_run`: its
    `__call__` would parse the input and output specs again on every call); `lora_runner` (None:
    steps with adapters run eagerly) is the _LoraLayer file's, for steps where some row has an
    adapter. Rows without one give the same bits through either (checked at load), so a request's
    text does not depend on whether its neighbours have adapters."""

    def __init__(self, runner: Any, kind: str, head_kind: str, path: Path | None) -> None:
        self.runner, self.kind, self.head_kind, self.path = runner, kind, head_kind, path
        self.lora_runner: Any = None
        self._fused: dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]] = {}
        self._layers: list[Any] | None = None  # the decoder's layer list the lists below were made for
        self._bases: list[Any] = []
        self._loras: list[Any] = []  # the LoRA modules; PEFT merges, disables and activates model-wide
        self._key: tuple[Any, ...] | None = None
        self._inputs: tuple[Any, ...] | None = None
        self._plain = False
        self._stacks: tuple[Any, dict[str, int], Stacks] | None = None  # for this list of layers

    # -- what a call reads ------------------------------------------------------------------
    def _group(self, decoder_group: Any, modules: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        if self.kind == "none":
            return [(decoder_group._fuse([base_linear(m).weight for m in modules]),)]
        copies = [_copy(m) for m in modules]
        key = tuple(c[0].data_ptr() for c in copies)
        fused = self._fused.get(key)
        if fused is None:
            if len(self._fused) >= 4 * len(self._bases):  # base and merged copies; the rest is stale
                self._fused.clear()
            fused = self._fused[key] = _fuse_low_bit(self.kind, copies)
        return fused

    def covers(self, decoder: Decoder) -> bool:
        """The compiled math is the model's math right now without LoRA stacks: every linear layer
        plain (no LoRA adding to it) and `covers_base`."""
        return self.covers_base(decoder) and all(
            plain_linear(m) for layer in decoder.layers() if layer.lora for m in layer.linears
        )

    def covers_base(self, decoder: Decoder) -> bool:
        """Every base linear layer (under LoRA or not) is bias-free and of the kind the step was
        compiled for."""
        for layer in decoder.layers():
            for m in layer.linears:
                if base_linear(m).bias is not None or _kind(m) != self.kind:
                    return False
        head = decoder.base.lm_head
        return head.bias is None and _kind(head) == self.head_kind

    def layer_weights(self, decoder: Decoder) -> list[tuple[Any, ...]]:
        """Each layer's (norm1, qkv parts, o, norm2, gate_up parts, down), as _Layer takes them."""
        out = []
        for layer, (qkv, gate_up) in zip(decoder.layers(), decoder.groups, strict=True):
            out.append(
                (
                    layer.norm1.weight,
                    self._group(qkv, layer.qkv),
                    _copy(layer.o_proj),
                    layer.norm2.weight,
                    self._group(gate_up, layer.gate_up),
                    _copy(layer.down),
                )
            )
        return out

    def inputs(self, decoder: Decoder) -> tuple[Any, ...]:
        """Embedding, each layer's weights flattened in the order the compiled call takes them,
        final norm and head."""
        import torch.utils._pytree as pytree

        inner = decoder.base.model
        layers = [pytree.tree_leaves(w) for w in self.layer_weights(decoder)]
        return inner.embed_tokens.weight, layers, inner.norm.weight, _copy(decoder.base.lm_head)

    def _state(self, decoder: Decoder) -> tuple[Any, ...]:
        layers = decoder.layers()
        if layers is not self._layers:
            modules = [m for layer in layers for m in layer.linears]
            self._layers, self._key = layers, None
            self._bases = [base_linear(m) for m in modules] + [decoder.base.lm_head]
            self._loras = [m for m in modules if m is not base_linear(m)]
        lora = self._loras[0] if self._loras else None
        adapters = (
            None
            if lora is None
            else (tuple(lora.merged_adapters), lora.disable_adapters, tuple(lora.active_adapters))
        )
        copies = tuple(b.__dict__.get("qweight", b.weight).data_ptr() for b in self._bases)
        return adapters, copies

    def prepared(self, decoder: Decoder) -> tuple[Any, ...] | None:
        """`inputs` when `covers`, else None (the CUDA graphs' step has no LoRA terms)."""
        inputs = self._prepare(decoder)
        return inputs if self._plain else None

    def _prepare(self, decoder: Decoder) -> tuple[Any, ...] | None:
        """`inputs` when `covers_base`, else None; `_plain` says whether `covers` holds too. Both are
        looked at again only when the model's set-up changed (adapters attached, merged, disabled
        or switched; weights replaced or swapped for other low-bit copies): a few hundred attribute
        reads tell that, the full check takes ms."""
        key = self._state(decoder)
        if key != self._key:
            self._inputs = self.inputs(decoder) if self.covers_base(decoder) else None
            self._plain = self._inputs is not None and self.covers(decoder)
            self._key = self._state(decoder)  # inputs() may have fused weights anew: their pointers
        return self._inputs

    def _route(
        self, decoder: Decoder, rows: int, adapter_names: list[str] | None
    ) -> tuple[torch.Tensor | None, Stacks] | None:
        """Each row's slot and the LoRA stacks of this step (empty: no row has an adapter): the rows'
        adapters from PEFT's `adapter_names`, else the one active unmerged adapter for all rows. None
        when PEFT's forward would do something else (merged and unmerged adapters at once, several
        active adapters, an adapter `_lora` cannot compute) or there is no LoRA file."""
        if adapter_names is None and self._plain:
            return None, []
        modules = self._loras  # as of the `_prepare` that ran just before, for the same layers
        if not modules or self.lora_runner is None or any(m.merged for m in modules):
            return None
        if adapter_names is None:
            active = modules[0].active_adapters
            if modules[0].disable_adapters or len(active) != 1:
                return None
            adapter_names = list(active) * rows
        layers = decoder.layers()
        if self._stacks is None or self._stacks[0] is not layers:
            dtype = decoder.base.model.embed_tokens.weight.dtype
            self._stacks = (layers, *_lora_stacks(decoder, dtype))
        _, slots, stacks = self._stacks
        if any(n != PEFT_BASE and n not in slots for n in adapter_names):
            return None
        index = [slots.get(n, 0) for n in adapter_names]
        return (torch.tensor(index), stacks) if any(index) else (None, [])

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
        """Logits [rows, vocab] for one new token per row, appended to `kv` as Decoder.forward does
        (with PEFT's per-row `adapter_names`, as there); None when the compiled math does not cover
        the model as it is set up now."""
        # Prompt chunks (quant.prefill()) stay eager: a 1-token last chunk must leave the cache
        # that prefilling the prompt in one chunk leaves.
        decode = ids.shape[1] == 1 and kv.length >= 1 and not quant.eager_only()
        prepared = self._prepare(decoder) if decode else None
        if prepared is None:
            return None
        rows = ids.shape[0]
        routed = self._route(decoder, rows, adapter_names)
        if routed is None:
            return None
        slot, stacks = routed
        run = self.runner if slot is None else self.lora_runner
        inner = decoder.base.model
        cos, sin = inner.rotary_emb(inner.norm.weight, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        if mask is None:
            mask = torch.ones(rows, kv.length + 1, dtype=torch.bool, device=ids.device)
        embed, layers, norm, head = prepared
        x = F.embedding(ids, embed)
        kv.reserve(1)
        for i, weights in enumerate(layers):
            past_k, past_v = kv.prefix(i)
            if slot is None:
                x, k, v = run([x, cos, sin, mask, *weights, past_k, past_v])
            else:
                x, k, v = run([x, cos, sin, mask, slot, *weights, *stacks[i], past_k, past_v])
            kv.append(i, k, v)
        kv.advance(1)
        return _linear(
            rms_norm_fp32(x[:, -1], norm, inner.norm.variance_epsilon), head, self.head_kind
        ).float()


def _math_source() -> str:
    """A digest of the code the compiled file is made from (its math, not the rest of this module)."""
    parts = [
        inspect.getsource(f)
        for f in (
            _Layer,
            _LoraLayer,
            _plus,
            rms_norm_fp32,
            _linear,
            _linears,
            _lora,
            _fuse_low_bit,
            quant._matmul,
        )
    ]
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]


def _signature(decoder: Decoder, kind: str, max_rows: int) -> dict[str, Any]:
    """What the compiled layer depends on (not the depth, the vocabulary or the head's kind)."""
    config = decoder.model.config
    _, kv_heads, head_dim = kv_geometry(config)
    inner = decoder.base.model
    return {
        "torch": torch.__version__,
        "source": _math_source(),
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "heads": decoder.heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "eps": inner.norm.variance_epsilon,
        "scaling": decoder.scaling,
        "kind": kind,
        "int8_kernel": quant.int8_kernel() if kind == "int8" else None,
        "dtype": str(inner.embed_tokens.weight.dtype),
        "max_length": getattr(config, "max_position_embeddings", 4096),
        "max_rows": max_rows,
    }


def _module(decoder: Decoder, kind: str, lora: bool) -> _Layer:
    """The layer math to export (or to run eagerly as the reference at load)."""
    inner = decoder.base.model
    layer = _LoraLayer if lora else _Layer
    eps = inner.norm.variance_epsilon
    return layer(decoder.heads, decoder.kv_heads, decoder.head_dim, eps, decoder.scaling, kind)


def _example(
    decoder: Decoder, step: CompiledStep, lora: bool, slot: list[int] | None = None
) -> tuple[Any, ...]:
    """Inputs of the export trace: a random hidden state and cache, the first layer's real weights;
    for _LoraLayer, stacks of 3 slots (1 and 2 random) and rank 4 per module, rows on `slot`
    (default 1, 2)."""
    rows, length = _EXAMPLE_ROWS, _EXAMPLE_LENGTH
    _, kv_heads, head_dim = kv_geometry(decoder.model.config)
    inner = decoder.base.model
    dtype = inner.embed_tokens.weight.dtype
    seeded = torch.Generator().manual_seed(0)  # the same draws each call, and no global RNG touched
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, generator=seeded)  # noqa: E731
    cos, sin = inner.rotary_emb(inner.norm.weight, torch.full((rows, 1), length))
    x = randn(rows, 1, decoder.model.config.hidden_size)
    past_k = randn(length, rows, kv_heads, head_dim)
    past_v = randn(length, rows, kv_heads, head_dim)
    mask = torch.ones(rows, length + 1, dtype=torch.bool)
    weights = step.layer_weights(decoder)[0]
    if not lora:
        return (x, cos.unsqueeze(2), sin.unsqueeze(2), mask, *weights, past_k, past_v)
    stacks = []
    for group in _groups(decoder)[0]:
        bases = [base_linear(m) for m in group]
        k, out = 4 * len(group), sum(base.out_features for base in bases)
        a, b = randn(3, k, bases[0].in_features), randn(3, k, out)
        a[0], b[0] = 0, 0  # slot 0: no adapter
        stacks.append((a, b))
    index = torch.tensor(slot or list(range(1, rows + 1)))
    return (x, cos.unsqueeze(2), sin.unsqueeze(2), mask, index, *weights, stacks, past_k, past_v)


def _compile(decoder: Decoder, signature: dict[str, Any], step: CompiledStep, path: Path, lora: bool) -> None:
    import torch.utils._pytree as pytree

    module = _module(decoder, signature["kind"], lora)
    example = _example(decoder, step, lora)
    rows = torch.export.Dim("rows", min=1, max=signature["max_rows"])
    length = torch.export.Dim("length", min=1, max=signature["max_length"])
    fixed = lambda tree: pytree.tree_map(lambda _: None, tree)  # noqa: E731
    cache = {0: length, 1: rows}
    head = ({0: rows}, {0: rows}, {0: rows}, {0: rows, 1: length + 1})
    if lora:
        slots = torch.export.Dim("slots", min=_MIN_SLOTS)
        ranks = [torch.export.Dim(f"rank{i}", min=_MIN_RANK) for i in range(len(example[11]))]  # k per group
        stacks = [({0: slots, 1: k}, {0: slots, 1: k}) for k in ranks]
        shapes = (*head, {0: rows}, *map(fixed, example[5:11]), stacks, cache, cache)
    else:
        shapes = (*head, *map(fixed, example[4:10]), cache, cache)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            torch._inductor.aoti_compile_and_package(program, package_path=str(built))
            kernel.publish(built, path)  # recorded, then in place whole: no half-written file is seen


def _load_runner(path: Path) -> Any:
    """The package's `boxed_run`. torch's C++ loader directly: `torch._inductor.aoti_load_package`
    wraps the same loader but imports the compiler first, 1.3 s of a 1.4 s warm load (measured).
    It loads an unpacked copy beside the package: given the package, the loader extracts it into a
    new temporary folder on every start and removes it only when the loader is destroyed, which a
    serving process's loaders are not before exit (one folder left in /tmp per start)."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(_unpacked(path)), "model", False, 1, -1)
    return loader.boxed_run


def _unpacked(path: Path) -> Path:
    """The package's files in a folder named after its bytes (a package rebuilt, say after a
    planted one, gets a new folder), unpacked once per machine, whole or not at all, and recorded
    (kernel.publish). The loader runs the library in it: a folder there that is not what was
    recorded (planted, or a file in it altered) is unpacked anew from the package, never loaded."""
    package = kernel.verified(path)
    if package is None:  # _build checked it: only this user's processes can have changed it since
        raise RuntimeError(f"{path.name} changed in the cache while loading")
    folder = path.parent / f"{path.stem}.{package[:16]}"
    if kernel.verified(folder) is not None:
        return folder
    kernel.distrust(folder, "unpacking the package anew into")
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tops = {Path(name).parts[0] for name in archive.namelist()}
        if len(tops) != 1:
            raise ValueError(f"{path.name}: not one compiled package ({len(tops)} top-level entries)")
        archive.extractall(tmp)
        kernel.publish(Path(tmp) / tops.pop(), folder)
    if kernel.verified(folder) is None:
        raise RuntimeError(f"{folder.name} changed in the cache while loading")
    return folder


def _tolerance(step: CompiledStep) -> float:
    # Kernels that round activations (to bf16, or ours to int8 per group) turn the last bit fused
    # loops may round differently into a rounding step: measured 0.39 of 33 on the 135M model with
    # ours on AVX2 when it rounded to int16; the int8 rounding passes the same check.
    rounds = quant.rounds_activations(step.kind) or quant.rounds_activations(step.head_kind)
    return 5e-2 if rounds else 1e-3


def _differs(got: torch.Tensor, want: torch.Tensor, step: CompiledStep) -> bool:
    return bool((got - want).abs().max() > _tolerance(step) * want.abs().max().clamp(min=1e-6))


@torch.no_grad()
def _agrees(decoder: Decoder, step: CompiledStep) -> str | None:
    """Why the compiled step cannot be trusted on this model (None: it agrees with the eager one)."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    results = []
    for compiled in (False, True):
        kv = KV(8)
        with quant.prefill():
            decoder.forward(ids, torch.arange(5)[None], kv)
        new = torch.tensor([[6]])
        pos = torch.tensor([[5]])
        results.append(
            step.forward(decoder, new, pos, kv, None) if compiled else decoder.forward(new, pos, kv)
        )
    eager, got = results
    if got is None:
        return "the compiled step does not cover this model"
    if _differs(got, eager, step):
        return f"its logits differ from the eager step's by {float((got - eager).abs().max()):.3g}"
    return None


@torch.no_grad()
def _lora_agrees(decoder: Decoder, step: CompiledStep, runner: Any) -> str | None:
    """Why the LoRA file cannot be used (None: it can). One layer with random adapters against the
    same math run eagerly (tests check that math against PEFT's); and rows without an adapter must
    give the plain file's bits, or their text would depend on their neighbours'."""
    import torch.utils._pytree as pytree

    example = _example(decoder, step, lora=True)
    eager, got = _module(decoder, step.kind, lora=True)(*example)[0], runner(pytree.tree_leaves(example))[0]
    if _differs(got, eager, step):
        return f"its LoRA terms differ from the eager math's by {float((got - eager).abs().max()):.3g}"
    bare = _example(decoder, step, lora=True, slot=[0] * _EXAMPLE_ROWS)
    plain = _example(decoder, step, lora=False)
    with_slots, without = runner(pytree.tree_leaves(bare)), step.runner(pytree.tree_leaves(plain))
    if not all(torch.equal(a, b) for a, b in zip(with_slots, without, strict=True)):
        return "rows without an adapter get other bits than from the plain file"
    return None


def _build(decoder: Decoder, signature: dict[str, Any], step: CompiledStep, lora: bool) -> Any:
    """The runner of the cached file for this signature, compiled first if it is not there yet, or
    not what was recorded when it was compiled (kernel.verified)."""
    key = hashlib.sha256(json.dumps({**signature, "lora": lora}, sort_keys=True).encode()).hexdigest()[:20]
    path = kernel.cache_dir() / f"decode-{'lora-' if lora else ''}{key}.pt2"
    if kernel.verified(path) is None:
        kernel.distrust(path, "compiling")
        what = "the decode step with per-request adapters" if lora else "the decode step"
        print(
            f"compile: building {what} for this model shape ({signature['kind']}); a first start on "
            f"a machine takes seconds to a minute; cached in {path.parent}",
            file=sys.stderr,
            flush=True,
        )
        _compile(decoder, signature, step, path, lora)
    if not lora:
        step.path = path
    return _load_runner(path)


def load(
    decoder: Decoder | None, device: torch.device, max_rows: int, mode: str = "auto", adapters: bool = True
) -> Any:
    """The compiled decode step for this model on a CPU (compiling it on a first start), or None
    with the reason printed: the engine then decodes eagerly. With `adapters` (a
    server that takes per-request adapters), steps with unmerged adapters get a second file; without
    it (not asked for, failed or disagreed) they decode eagerly."""
    if mode not in MODES:
        raise ValueError(f"{COMPILE_ENV}={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or decoder is None:
        return None
    if device.type != "cpu":
        # CUDA graphs serve GPUs (fast_paths.load_step picks them).
        return _skip("the compiled step is built for CPUs; this model runs on " + device.type)
    kinds = {_kind(m) for layer in decoder.layers() for m in layer.linears}
    if len(kinds) != 1:
        return _skip("some linear layers are quantized and others are not")
    kind, head_kind = kinds.pop(), _kind(decoder.base.lm_head)
    if kind == "none" and decoder.base.model.embed_tokens.weight.dtype != torch.float32:
        # Measured: the compiled bf16 layer's logits did not match the eager step's at load.
        return _skip("the compiled step covers fp32 and low-bit weights, not " + str(decoder.model.dtype))
    signature = _signature(decoder, kind, max(max_rows, _EXAMPLE_ROWS))
    step = CompiledStep(None, kind, head_kind, None)
    started = time.perf_counter()
    try:
        step.runner = _build(decoder, signature, step, lora=False)
        reason = _agrees(decoder, step)
    except Exception as exc:  # a missing C++ compiler, an export gap in a new torch: decode eagerly
        return _skip(f"compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    if reason:
        return _skip(f"{step.path.name} is not used: {reason}")
    try:
        runner = _build(decoder, signature, step, lora=True) if adapters else None
        lora_reason = _lora_agrees(decoder, step, runner) if adapters else None
    except Exception as exc:
        lora_reason = f"compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if lora_reason:
        print(
            f"compile: steps with unmerged adapters decode eagerly: {lora_reason}",
            file=sys.stderr,
            flush=True,
        )
    else:
        step.lora_runner = runner
    print(
        f"compile: decode step ready in {time.perf_counter() - started:.1f} s ({step.path})",
        file=sys.stderr,
        flush=True,
    )
    return step


def _skip(reason: str) -> None:
    print(f"compile: decoding eagerly: {reason}", file=sys.stderr, flush=True)
    return None
