"""The engine's decode step compiled ahead of time on CPU (`SERVE_COMPILE=auto|off`).

A decode step of a small model in eager mode spends more time dispatching its ~40 ops a layer than
in the matmuls (measured on the 135M model with int4 weights: 35 ms a token eager, of which the
kernels are 12 ms). This module exports one decoder layer of decoder.Decoder's math, for one new
token per row, as one graph (`torch.export`) and compiles it with AOTInductor into a shared
library: the elementwise work is fused into a few C++ loops, the matmuls stay extern kernels (MKL,
torch's int4 kernel, our int8 op from native.py, which the library calls through the dispatcher),
and a layer is one C++ call. The step calls it once per layer (the layers share their shapes, so
one file serves any depth, and compiling takes the same time for 30 layers as for 2); embedding,
final norm and vocabulary projection run eagerly around it (three ops).

* Weights, keys and values are inputs, not constants: merging the setup adapter into the base (in
  place, or as new low-bit copies) changes what the next step reads, and one compiled file serves
  every layer, every adapter and every checkpoint of the same shape. Rows (1..the engine's batch)
  and the cached length are symbolic, so one file serves every batch and context.
* The file is cached under `SERVE_COMPILE_CACHE` (default: the user cache folder), keyed by what
  the generated code depends on (torch version, the math's source, the layer's shapes, dtype and
  weight kind). A first start on a machine compiles it; later starts load it at once.
* Prompts are still prefilled eagerly (many rows at once are matmul-bound), and a step runs eagerly
  whenever the compiled math does not cover it: an unmerged LoRA adapter (per-request adapters),
  a layer left in fp32 among quantized ones, a model decoder.py does not cover. On a CUDA GPU the
  step runs as CUDA graphs instead (cudagraph.py).
* At load, the compiled step is checked against the eager one on the model itself; a file that
  disagrees is not used (and the reason is printed)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import native, quant
from .decoder import KV, Decoder, _base_linear, _plain, kv_geometry

COMPILE_ENV = "SERVE_COMPILE"
CACHE_ENV = native.CACHE_ENV
MODES = ("auto", "off")
_EXAMPLE_ROWS, _EXAMPLE_LENGTH = 2, 3  # export traces with sizes above 1 so neither is specialised


def _linear(h: torch.Tensor, weight: tuple[torch.Tensor, ...], kind: str) -> torch.Tensor:
    """quant.py's forward of a base linear layer (fp32, or a low-bit copy)."""
    if kind == "none":
        return F.linear(h, weight[0])
    flat = h.reshape(-1, h.shape[-1])
    out = quant._matmul(kind, flat, weight[0], weight[1])
    return out.view(*h.shape[:-1], -1)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """decoder._rms_norm: in fp32 as transformers' LlamaRMSNorm, cast back after (no-op in fp32)."""
    return F.rms_norm(x.float(), weight.shape, weight.float(), eps).to(x.dtype)


def _linears(h: torch.Tensor, parts: list[tuple[torch.Tensor, ...]], kind: str) -> torch.Tensor:
    """Modules that read the same input: one fused product, or one per part (see _fuse_low_bit)."""
    if len(parts) == 1:
        return _linear(h, parts[0], kind)
    return torch.cat([_linear(h, p, kind) for p in parts], dim=-1)


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
        heads, kv_heads, head_dim, eps, kind = self.heads, self.kv_heads, self.head_dim, self.eps, self.kind
        rows = x.shape[0]
        h = _norm(x, norm1, eps)
        out = _linears(h, qkv, kind).view(rows, 1, heads + 2 * kv_heads, head_dim)
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
        x = x + _linear(a.transpose(1, 2).reshape(rows, 1, -1), o_proj, kind)
        h = _norm(x, norm2, eps)
        g, u = _linears(h, gate_up, kind).chunk(2, dim=-1)
        return x + _linear(F.silu(g) * u, down, kind), k[:, 0], v[:, 0]


def _kind(module: Any) -> str:
    return getattr(_base_linear(module), "qkind", "none")


def _copy(module: Any) -> tuple[torch.Tensor, ...]:
    """What a base linear layer's forward multiplies with now."""
    base = _base_linear(module)
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
    `__call__` would parse the input and output specs again on every call)."""

    def __init__(self, runner: Any, kind: str, head_kind: str, path: Path) -> None:
        self.runner, self.kind, self.head_kind, self.path = runner, kind, head_kind, path
        self._fused: dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]] = {}
        self._layers: list[Any] | None = None  # the decoder's layer list the lists below were made for
        self._bases: list[Any] = []
        self._lora: Any = None  # one LoRA module: PEFT merges, disables and activates model-wide
        self._key: tuple[Any, ...] | None = None
        self._inputs: tuple[Any, ...] | None = None

    # -- what a call reads ------------------------------------------------------------------
    def _group(self, decoder_group: Any, modules: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        if self.kind == "none":
            return [(decoder_group._fuse([_base_linear(m).weight for m in modules]),)]
        copies = [_copy(m) for m in modules]
        key = tuple(c[0].data_ptr() for c in copies)
        fused = self._fused.get(key)
        if fused is None:
            if len(self._fused) >= 4 * len(self._bases):  # base and merged copies; the rest is stale
                self._fused.clear()
            fused = self._fused[key] = _fuse_low_bit(self.kind, copies)
        return fused

    def covers(self, decoder: Decoder) -> bool:
        """The compiled math is the model's math right now: every linear layer plain (no LoRA adding
        to it), bias-free, and of the kind the step was compiled for."""
        for layer in decoder.layers():
            for m in layer.linears:
                base = _base_linear(m)
                if base.bias is not None or _kind(m) != self.kind or (layer.lora and not _plain(m)):
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
            self._bases = [_base_linear(m) for m in modules] + [decoder.base.lm_head]
            self._lora = next((m for m in modules if m is not _base_linear(m)), None)
        lora = self._lora
        adapters = (
            None
            if lora is None
            else (tuple(lora.merged_adapters), lora.disable_adapters, tuple(lora.active_adapters))
        )
        copies = tuple(b.__dict__.get("qweight", b.weight).data_ptr() for b in self._bases)
        return adapters, copies

    def prepared(self, decoder: Decoder) -> tuple[Any, ...] | None:
        """`inputs` when `covers`, else None. Both are looked at again only when the model's set-up
        changed (adapters attached, merged, disabled or switched; weights replaced or swapped for
        other low-bit copies): a few hundred attribute reads tell that, the full check takes ms."""
        key = self._state(decoder)
        if key != self._key:
            self._inputs = self.inputs(decoder) if self.covers(decoder) else None
            self._key = self._state(decoder)  # inputs() may have fused weights anew: their pointers
        return self._inputs

    # -- one step ---------------------------------------------------------------------------
    def forward(
        self, decoder: Decoder, ids: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Logits [rows, vocab] for one new token per row, appended to `kv` as Decoder.forward does;
        None when the compiled math does not cover the model as it is set up now."""
        # Prompt chunks (in the fp32 block) stay eager: a 1-token last chunk must leave the cache
        # that prefilling the prompt in one chunk leaves.
        decode = ids.shape[1] == 1 and kv.length >= 1 and not quant.in_fp32_block()
        prepared = self.prepared(decoder) if decode else None
        if prepared is None:
            return None
        rows = ids.shape[0]
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
            x, k, v = self.runner([x, cos, sin, mask, *weights, past_k, past_v])
            kv.append(i, k, v)
        kv.advance(1)
        return _linear(_norm(x[:, -1], norm, inner.norm.variance_epsilon), head, self.head_kind).float()


def _math_source() -> str:
    """A digest of the code the compiled file is made from (its math, not the rest of this module)."""
    parts = [inspect.getsource(f) for f in (_Layer, _norm, _linear, _linears, _fuse_low_bit, quant._matmul)]
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


def _example(decoder: Decoder, step: CompiledStep, signature: dict[str, Any]) -> tuple[Any, ...]:
    """Inputs of the export trace: a random hidden state and cache, the first layer's real weights."""
    rows, length = _EXAMPLE_ROWS, _EXAMPLE_LENGTH
    kv_heads, head_dim = signature["kv_heads"], signature["head_dim"]
    inner = decoder.base.model
    dtype = inner.embed_tokens.weight.dtype
    cos, sin = inner.rotary_emb(inner.norm.weight, torch.full((rows, 1), length))
    x = torch.randn(rows, 1, signature["hidden"], dtype=dtype)
    past_k = torch.randn(length, rows, kv_heads, head_dim, dtype=dtype)
    past_v = torch.randn(length, rows, kv_heads, head_dim, dtype=dtype)
    mask = torch.ones(rows, length + 1, dtype=torch.bool)
    return (x, cos.unsqueeze(2), sin.unsqueeze(2), mask, *step.layer_weights(decoder)[0], past_k, past_v)


def _compile(decoder: Decoder, signature: dict[str, Any], step: CompiledStep, path: Path) -> None:
    import torch.utils._pytree as pytree

    module = _Layer(
        signature["heads"],
        signature["kv_heads"],
        signature["head_dim"],
        signature["eps"],
        signature["scaling"],
        signature["kind"],
    )
    example = _example(decoder, step, signature)
    rows = torch.export.Dim("rows", min=1, max=signature["max_rows"])
    length = torch.export.Dim("length", min=1, max=signature["max_length"])
    fixed = lambda tree: pytree.tree_map(lambda _: None, tree)  # noqa: E731
    cache = {0: length, 1: rows}
    shapes = (
        {0: rows},
        {0: rows},
        {0: rows},
        {0: rows, 1: length + 1},
        *map(fixed, example[4:10]),
        cache,
        cache,
    )
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            torch._inductor.aoti_compile_and_package(program, package_path=str(built))
            os.replace(built, path)  # whole or not at all: a concurrent start sees no half-written file


def _load_runner(path: Path) -> Any:
    """The package's `boxed_run`. torch's C++ loader directly: `torch._inductor.aoti_load_package`
    wraps the same loader but imports the compiler first, 1.3 s of a 1.4 s warm load (measured)."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    return loader.boxed_run


@torch.no_grad()
def _agrees(decoder: Decoder, step: CompiledStep) -> str | None:
    """Why the compiled step cannot be trusted on this model (None: it agrees with the eager one)."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    results = []
    for compiled in (False, True):
        kv = KV(8)
        with quant.fp32_weights():
            decoder.forward(ids, torch.arange(5)[None], kv)
        new = torch.tensor([[6]])
        pos = torch.tensor([[5]])
        results.append(
            step.forward(decoder, new, pos, kv, None) if compiled else decoder.forward(new, pos, kv)
        )
    eager, got = results
    if got is None:
        return "the compiled step does not cover this model"
    scale = eager.abs().max().clamp(min=1e-6)
    fp32 = not (quant.rounds_activations(step.kind) or quant.rounds_activations(step.head_kind))
    # Kernels that round activations (to bf16 or int16) turn the last bit fused loops may round
    # differently into a rounding step: measured 0.39 of 33 on the 135M model with ours on AVX2.
    tolerance = 1e-3 if fp32 else 5e-2
    if (got - eager).abs().max() > tolerance * scale:
        return f"its logits differ from the eager step's by {float((got - eager).abs().max()):.3g}"
    return None


def load(decoder: Decoder | None, device: torch.device, max_rows: int, mode: str = "auto") -> Any:
    """The compiled decode step for this model (compiling it on a first start; CUDA graphs on a
    GPU), or None with the reason printed: the engine then decodes eagerly."""
    if mode not in MODES:
        raise ValueError(f"{COMPILE_ENV}={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or decoder is None:
        return None
    if device.type == "cuda":
        from . import cudagraph

        return cudagraph.load(decoder, device, max_rows)
    if device.type != "cpu":
        return _skip("the compiled step is built for CPUs and CUDA GPUs; this model runs on " + device.type)
    kinds = {_kind(m) for layer in decoder.layers() for m in layer.linears}
    if len(kinds) != 1:
        return _skip("some linear layers are quantized and others are not")
    kind, head_kind = kinds.pop(), _kind(decoder.base.lm_head)
    if kind == "none" and decoder.base.model.embed_tokens.weight.dtype != torch.float32:
        # Measured: the compiled bf16 layer's logits did not match the eager step's at load.
        return _skip("the compiled step covers fp32 and low-bit weights, not " + str(decoder.model.dtype))
    signature = _signature(decoder, kind, max(max_rows, _EXAMPLE_ROWS))
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:20]
    path = native.cache_dir() / f"decode-{key}.pt2"
    step = CompiledStep(None, kind, head_kind, path)
    started = time.perf_counter()
    try:
        if not path.is_file():
            print(
                f"compile: building the decode step for this model shape ({kind}); a first start on "
                f"a machine takes seconds to a minute; cached in {path.parent}",
                file=sys.stderr,
                flush=True,
            )
            _compile(decoder, signature, step, path)
        step.runner = _load_runner(path)
        reason = _agrees(decoder, step)
    except Exception as exc:  # a missing C++ compiler, an export gap in a new torch: decode eagerly
        return _skip(f"compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    if reason:
        return _skip(f"{path.name} is not used: {reason}")
    print(
        f"compile: decode step ready in {time.perf_counter() - started:.1f} s ({path})",
        file=sys.stderr,
        flush=True,
    )
    return step


def _skip(reason: str) -> None:
    print(f"compile: decoding eagerly: {reason}", file=sys.stderr, flush=True)
    return None
