"""The engine's forward pass for Llama-architecture models, written out, with a preallocated KV cache.

The same math as transformers' forward (the model's own rotary and linear modules, its norms as one
fused op, SDPA; decode steps of an fp32 model on a CPU attend through attention.py's kernel, which
keeps a row's bits whatever its batch) without its per-step cache concatenation, mask builders and
checks. Measured
against transformers' forward on the same engine (docs/performance.md): 1.03-1.21x at a short context, 1.25x
at 1,800 tokens in fp32; the matmul kernels are most of a decode step either way.

* keys and values go into a `KV` buffer allocated ahead (columns [0, length) in use), not a
  concatenation per token;
* q/k/v and gate/up run as one matmul each when the weights are plain (no unmerged LoRA): the
  model's weights become views of one fused tensor, so merging an adapter in place changes what the
  fused matmul sees, and nothing is copied; quantized ones multiply one fused low-bit copy (quant.py,
  shared with the compiled step);
* otherwise each linear module runs as it would in transformers (PEFT's LoRA layers, per-row
  `adapter_names` through PEFT's own forward hooks, the low-bit copies of quant.py).

Other architectures, and Llama variants this code does not cover, use transformers' forward on the
same `KV` buffer (`hf_forward`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import attention, quant

PEFT_BASE = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch (`adapter_names`)


class KV:
    """Keys and values for some rows of sequences, per layer. Stored time-major, [capacity, rows,
    kv heads, head dim], so that the tokens so far (`prefix`) are one contiguous block: the compiled
    decode step (cpu_step.py) reads them without a copy, and its input layout never depends on the
    capacity. `write` hands out the [rows, kv heads, length, head dim] view attention expects.
    Columns [0, length) hold tokens; a row that is shorter is left-padded (its mask is False there).
    A layer's buffer is allocated when its first keys arrive (their shape and dtype: no model
    config needed), and grows by doubling, so appending a token copies nothing."""

    def __init__(self, capacity: int) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = max(capacity, 1)
        self.length = 0

    @property
    def rows(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def reserve(self, extra: int) -> None:
        """Room for `extra` more columns."""
        if self.length + extra <= self.capacity:
            return
        self.capacity = max(2 * self.capacity, self.length + extra, 64)
        for kind in (self.keys, self.values):
            for i, old in enumerate(kind):
                kind[i] = old.new_zeros((self.capacity, *old.shape[1:]))
                kind[i][: self.length] = old[: self.length]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values [rows, kv heads, n, head dim] at column `length`; return the
        layer's keys/values up to and including them. `advance(n)` moves `length` once all layers wrote."""
        if layer == len(self.keys):
            self.keys.append(k.new_zeros((self.capacity, k.shape[0], k.shape[1], k.shape[3])))
            self.values.append(v.new_zeros((self.capacity, v.shape[0], v.shape[1], v.shape[3])))
        end = self.length + k.shape[2]
        self.keys[layer][self.length : end] = k.permute(2, 0, 1, 3)
        self.values[layer][self.length : end] = v.permute(2, 0, 1, 3)
        return self.keys[layer][:end].permute(1, 2, 0, 3), self.values[layer][:end].permute(1, 2, 0, 3)

    def prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys/values so far, contiguous [length, rows, kv heads, head dim]."""
        return self.keys[layer][: self.length], self.values[layer][: self.length]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one new column [rows, kv heads, head dim] per row at `length` (then `advance(1)`)."""
        self.keys[layer][self.length] = k
        self.values[layer][self.length] = v

    def advance(self, n: int) -> None:
        self.length += n

    def rows_of(self, index: list[int], start: int) -> KV:
        """A new KV with these rows and the columns from `start` on (the rest was padding in all of them)."""
        out = KV(self.capacity - start)
        idx = torch.tensor(index, device=self.keys[0].device)
        out.keys = [t[start:].index_select(1, idx) for t in self.keys]
        out.values = [t[start:].index_select(1, idx) for t in self.values]
        out.length = self.length - start
        return out

    @staticmethod
    def from_prefix(keys: list[torch.Tensor], values: list[torch.Tensor], capacity: int) -> KV:
        """A KV whose first columns are copies of these [n, rows, kv heads, head dim] per layer."""
        out = KV(capacity)
        n = keys[0].shape[0]
        for src, dst in ((keys, out.keys), (values, out.values)):
            for t in src:
                buf = t.new_zeros((out.capacity, *t.shape[1:]))
                buf[:n] = t
                dst.append(buf)
        out.length = n
        return out

    @staticmethod
    def stack(parts: list[KV]) -> KV:
        """One KV with the rows of `parts`, each right-aligned to the longest (left padding)."""
        out = KV(max(p.length for p in parts))
        out.length = out.capacity
        for kind in ("keys", "values"):
            for layer in zip(*(getattr(p, kind) for p in parts), strict=True):
                rows = sum(t.shape[1] for t in layer)
                merged = layer[0].new_zeros((out.length, rows, *layer[0].shape[2:]))
                row = 0
                for p, t in zip(parts, layer, strict=True):
                    merged[out.length - p.length :, row : row + t.shape[1]] = t[: p.length]
                    row += t.shape[1]
                getattr(out, kind).append(merged)
        return out


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder's KV cache."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def unsupported(model: Any) -> str | None:
    """Why `Decoder` cannot run this model (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} is not llama"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "activation or tensor-parallel split differs from Llama's"
    inner = _base(model).model
    if not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers or rotary embedding where Llama has them"
    attn = inner.layers[0].self_attn
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
        return "attention modules differ from Llama's"
    return None


def _base(model: Any) -> Any:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def base_linear(module: Any) -> Any:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def plain_linear(module: Any) -> bool:
    """No LoRA adds to this module's base layer now: merged into the weight, disabled, or none of its
    adapters active."""
    if module is base_linear(module):
        return True
    if module.merged:  # PEFT unmerges a merged layer whose adapters were disabled: not plain
        return not module.disable_adapters
    return module.disable_adapters or not any(a in module.lora_A for a in module.active_adapters)


class _Group:
    """Linear modules of one layer that read the same input (q/k/v, gate/up): one fused matmul while
    they are plain, else each module in turn. The modules are passed each call, not kept: PEFT
    replaces a layer's linear modules when it attaches an adapter that targets them."""

    def __init__(self) -> None:
        self.fused: torch.Tensor | None = None
        self.ptrs: list[int] = []
        self.sizes: list[int] = []

    def _fuse(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """The base weights as views of one tensor. Whoever replaces a weight's `.data` (rather than
        changing it in place) breaks the view; that is checked each call and fused again."""
        if self.fused is None or [w.data_ptr() for w in weights] != self.ptrs:
            with torch.inference_mode(False):  # the weights must stay usable for training afterwards
                fused = torch.cat([w.detach() for w in weights])
                self.sizes, row = [w.shape[0] for w in weights], 0
                for w, n in zip(weights, self.sizes, strict=True):
                    w.data = fused[row : row + n]
                    row += n
            self.fused, self.ptrs = fused, [w.data_ptr() for w in weights]
        return self.fused

    def product(self, x: torch.Tensor, modules: list[Any], lora: bool) -> torch.Tensor | None:
        """All modules' outputs side by side from one product, where that is what each computes now:
        no LoRA adds to them (checked only when the layer has LoRA modules at all), no bias, and
        either every base weight fp32/bf16 (one fused weight) or every one on its low-bit copy
        (quant.fused_matmul); None otherwise."""
        if lora and not all(plain_linear(m) for m in modules):
            return None
        bases = [base_linear(m) for m in modules]
        if any(type(b) is not torch.nn.Linear or b.bias is not None for b in bases):
            return None
        if any(hasattr(b, "qkind") for b in bases):
            return quant.fused_matmul(x, bases)
        return F.linear(x, self._fuse([b.weight for b in bases]))


@dataclass
class _Layer:
    """One decoder layer's modules, looked up once per set of adapters."""

    norm1: Any
    qkv: list[Any]
    o_proj: Any
    norm2: Any
    gate_up: list[Any]
    down: Any
    lora: bool  # some linear module is a LoRA layer: check each pass whether it is plain

    @property
    def linears(self) -> tuple[Any, ...]:
        return (*self.qkv, self.o_proj, *self.gate_up, self.down)


class Decoder:
    """`forward` for a Llama-architecture causal LM (or a PeftModel around one) over a `KV`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = _base(model)
        self.groups = [(_Group(), _Group()) for _ in self.base.model.layers]
        self.heads = model.config.num_attention_heads
        _, self.kv_heads, self.head_dim = kv_geometry(model.config)
        self.scaling = self.base.model.layers[0].self_attn.scaling
        self._adapters: tuple[str, ...] | None = None
        self._layers: list[_Layer] = []

    def layers(self) -> list[_Layer]:
        """The modules, looked up again whenever the set of adapters changed: PEFT puts LoRA modules
        in place of the linear ones it targets when it attaches an adapter."""
        adapters = tuple(getattr(self.model, "peft_config", None) or ())
        if adapters != self._adapters or not self._layers:
            self._layers = []
            for layer in self.base.model.layers:
                a, mlp = layer.self_attn, layer.mlp
                linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
                self._layers.append(
                    _Layer(
                        layer.input_layernorm,
                        linears[:3],
                        a.o_proj,
                        layer.post_attention_layernorm,
                        linears[4:6],
                        mlp.down_proj,
                        lora=any(m is not base_linear(m) for m in linears),
                    )
                )
            self._adapters = adapters
        return self._layers

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KV,
        mask: torch.Tensor | None = None,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor:
        """Logits [rows, vocab] at each row's last position, for `ids` [rows, n] at `positions`
        [rows, n] after what `kv` holds; `mask` [rows, kv.length + n] is False on left padding (None:
        no padding). The new keys/values are appended to `kv`."""
        kv.reserve(ids.shape[1])
        if adapter_names is None:
            return self._forward(ids, positions, kv, mask, plain=True)
        # PEFT routes each row to its adapter through its own forward hooks, as PeftModel.forward does.
        first = torch.utils.hooks.RemovableHandle.next_id
        try:
            with self.model._enable_peft_forward_hooks(adapter_names=adapter_names):
                return self._forward(ids, positions, kv, mask, plain=False)
        except BaseException:
            # PEFT removes those hooks only after a clean exit: an error inside the pass left them on
            # every LoRA layer, and every later pass then failed (measured: a DoRA adapter in a
            # mixed batch). Hooks take increasing ids, so those registered since `first` are its.
            for module in self.model.modules():
                for hooks in (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs):
                    for key in [k for k in hooks if k >= first]:
                        hooks.pop(key, None)
            raise

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor | None, plain: bool
    ) -> torch.Tensor:
        rows, n = ids.shape
        inner = self.base.model
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [rows, n, 1, head dim]: one per head
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        # One new token per row after a prompt: the decode steps' attention, as the compiled step's
        # (a prompt's 1-token last chunk stays with SDPA, as its other chunks).
        decode = n == 1 and kv.length >= 1 and not quant.eager_only()
        decode = decode and attention.batch_invariant(x)
        if decode and mask is None:  # no padding: every column, for every layer
            mask = torch.ones(rows, kv.length + 1, dtype=torch.bool, device=x.device)
        # A prompt's mask (its rows' tokens, causally) is the same for every layer: made once.
        prompt_mask = None if decode else _attention_mask(mask, kv.length, n, x.device)
        for i, (layer, (qkv, gate_up)) in enumerate(zip(self.layers(), self.groups, strict=True)):
            h = _rms_norm(x, layer.norm1)
            out = qkv.product(h, layer.qkv, layer.lora) if plain else None
            if out is not None:
                # One matmul for q, k and v, and one rotary for q and k together.
                out = out.view(rows, n, heads + 2 * kv_heads, head_dim)
                qk = _rotary(out[:, :, : heads + kv_heads], cos, sin)
                q, k, v = qk[:, :, :heads], qk[:, :, heads:], out[:, :, heads + kv_heads :]
            else:
                q, k, v = (m(h) for m in layer.qkv)
                q = _rotary(q.view(rows, n, heads, head_dim), cos, sin)
                k = _rotary(k.view(rows, n, kv_heads, head_dim), cos, sin)
                v = v.view(rows, n, kv_heads, head_dim)
            if decode:
                past_k, past_v = kv.prefix(i)
                kv.write(i, k.transpose(1, 2), v.transpose(1, 2))
                o = attention.decode(q, past_k, past_v, k[:, 0], v[:, 0], mask, self.scaling)
            else:
                keys, values = kv.write(i, k.transpose(1, 2), v.transpose(1, 2))
                o = self._attend(q, keys, values, prompt_mask)
            x = x + layer.o_proj(o)
            h = _rms_norm(x, layer.norm2)
            out = gate_up.product(h, layer.gate_up, layer.lora) if plain else None
            if out is not None:
                g, u = out.chunk(2, dim=-1)
            else:
                g, u = (m(h) for m in layer.gate_up)
            x = x + layer.down(F.silu(g) * u)
        kv.advance(n)
        return self.base.lm_head(_rms_norm(x[:, -1], inner.norm)).float()

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of q [rows, n, heads, head dim] over keys/values [rows, kv heads, length, head dim]
        with `_attention_mask`'s mask; returns [rows, n, heads x head dim]."""
        # SDPA for one query too. Two hand-written matmuls were tried; their last bits differ from
        # SDPA's, and int8's bf16 activations turned that into different greedy text on one of the
        # int8 = fp32 test prompts.
        rows, n = q.shape[:2]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=mask,
            scale=self.scaling,
            enable_gqa=self.heads != self.kv_heads,
        )
        return o.transpose(1, 2).reshape(rows, n, -1)


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' LlamaRMSNorm as one fused op (computed in fp32 as there, cast back after)."""
    return F.rms_norm(x.float(), norm.weight.shape, norm.weight.float(), norm.variance_epsilon).to(x.dtype)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def hf_forward(model: Any, kv: KV, extra: dict[str, Any], **kwargs: Any) -> torch.Tensor:
    """transformers' own forward over `kv` (for models `Decoder` does not cover): logits [rows, vocab]
    at the last position."""
    from transformers.cache_utils import Cache, DynamicLayer

    class Layer(DynamicLayer):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.index, self.is_initialized, self.length = index, True, kv.length

        def update(
            self, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            self.length += k.shape[2]  # what this layer holds now, as DynamicLayer counts
            return kv.write(self.index, k, v)

        def get_seq_length(self) -> int:
            return self.length

    n = kwargs["input_ids"].shape[1]
    kv.reserve(n)
    layers = getattr(model.config, "num_hidden_layers", None) or max(len(kv.keys), 1)
    cache = Cache(layers=[Layer(i) for i in range(layers)])
    out = model(use_cache=True, logits_to_keep=1, cache=cache, **kwargs, **extra)
    kv.advance(n)
    return out.logits[:, -1, :].float()


def _attention_mask(
    mask: torch.Tensor | None, past: int, n: int, device: torch.device
) -> torch.Tensor | None:
    """[rows, 1, n, past + n] True where a query may attend: its row's tokens, causally. None when
    there is nothing to hide (one new token per row and no padding)."""
    if mask is None and n == 1:
        return None
    causal = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
    if mask is None:
        return causal[None, None]
    return causal[None, None] & mask[:, None, None, :]
