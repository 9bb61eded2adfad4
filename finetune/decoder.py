"""The engine's forward pass for Llama-architecture models, written out, with a preallocated KV cache.

transformers' forward costs about 10 ms a token beyond its matmuls on a 2-core CPU at 135M: cache
objects that concatenate every layer's keys each step, mask builders, module hooks and checks. A
small model's decode step is bound by reading its weights; this one does the same math (the
model's own norm, rotary and linear modules, SDPA) with none of that:

* keys and values go into a `KV` buffer allocated ahead (columns [0, length) in use), not a
  concatenation per token;
* q/k/v and gate/up run as one matmul each when the weights are plain (no unmerged LoRA, not
  quantized): the model's weights become views of one fused tensor, so merging an adapter in place
  changes what the fused matmul sees, and nothing is copied;
* otherwise each linear module runs as it would in transformers (PEFT's LoRA layers, per-row
  `adapter_names` through PEFT's own forward hooks, the low-bit copies of quant.py).

Other architectures, and Llama variants this code does not cover, use transformers' forward on the
same `KV` buffer (`hf_forward`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


class KV:
    """Keys and values for `rows` sequences, per layer [rows, kv heads, capacity, head dim], in one
    tensor per kind. Columns [0, length) hold tokens; a row that is shorter is left-padded (its
    mask is False there). The buffer grows by doubling, so appending a token copies nothing."""

    def __init__(
        self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int, like: torch.Tensor
    ):
        shape = (layers, rows, kv_heads, max(capacity, 1), head_dim)
        self.keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.length = 0

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, extra: int) -> None:
        """Room for `extra` more columns."""
        if self.length + extra <= self.capacity:
            return
        capacity = max(2 * self.capacity, self.length + extra, 64)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:3], capacity, old.shape[4]))
            new[:, :, :, : self.length] = old[:, :, :, : self.length]
            setattr(self, name, new)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys/values [rows, kv heads, n, head dim] at column `length`; return the
        layer's keys/values up to and including them. `advance(n)` moves `length` once all layers wrote."""
        n = k.shape[2]
        end = self.length + n
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def rows_of(self, index: list[int], start: int) -> KV:
        """A new KV with these rows and the columns from `start` on (the rest was padding in all of them)."""
        out = KV.__new__(KV)
        idx = torch.tensor(index, device=self.keys.device)
        out.keys = self.keys.index_select(1, idx)[:, :, :, start:].clone()
        out.values = self.values.index_select(1, idx)[:, :, :, start:].clone()
        out.length = self.length - start
        return out

    @staticmethod
    def stack(parts: list[KV]) -> KV:
        """One KV with the rows of `parts`, each right-aligned to the longest (left padding)."""
        length = max(p.length for p in parts)
        out = KV.__new__(KV)
        first = parts[0].keys
        shape = (first.shape[0], sum(p.rows for p in parts), first.shape[2], length, first.shape[4])
        out.keys, out.values = first.new_zeros(shape), first.new_zeros(shape)
        out.length = length
        row = 0
        for p in parts:
            pad = length - p.length
            out.keys[:, row : row + p.rows, :, pad:] = p.keys[:, :, :, : p.length]
            out.values[:, row : row + p.rows, :, pad:] = p.values[:, :, :, : p.length]
            row += p.rows
        return out


def unsupported(model: Any) -> str | None:
    """Why `Decoder` cannot run this model (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} is not llama"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "activation or tensor-parallel split differs from Llama's"
    inner = _inner(model)
    if not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers or rotary embedding where Llama has them"
    attn = inner.layers[0].self_attn
    if not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
        return "attention modules differ from Llama's"
    return None


def _inner(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _base_linear(module: Any) -> Any:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _plain(module: Any) -> bool:
    """No LoRA adds to this module's base layer now: merged into the weight, disabled, or none of its
    adapters active."""
    if module is _base_linear(module):
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

    def fits(self, modules: list[Any]) -> bool:
        """Plain F.linear modules (no bias, not quantized) whose LoRA, if any, the caller checked."""
        for m in modules:
            base = _base_linear(m)
            if type(base) is not torch.nn.Linear or base.bias is not None or hasattr(base, "qkind"):
                return False
        return True

    def matmul(self, x: torch.Tensor, modules: list[Any]) -> torch.Tensor:
        return F.linear(x, self._fuse([_base_linear(m).weight for m in modules]))


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


class Decoder:
    """`forward` for a Llama-architecture causal LM (or a PeftModel around one) over a `KV`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.groups = [(_Group(), _Group()) for _ in self.base.model.layers]
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        attn = self.base.model.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
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
                        lora=any(m is not _base_linear(m) for m in linears),
                    )
                )
            self._adapters = adapters
        return self._layers

    def new_kv(self, rows: int, capacity: int) -> KV:
        like = self.base.model.embed_tokens.weight
        return KV(len(self.groups), rows, self.kv_heads, self.head_dim, capacity, like)

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
        with self.model._enable_peft_forward_hooks(adapter_names=adapter_names):
            return self._forward(ids, positions, kv, mask, plain=False)

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, kv: KV, mask: torch.Tensor | None, plain: bool
    ) -> torch.Tensor:
        rows, n = ids.shape
        inner = self.base.model
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # [rows, n, 1, head dim]: one per head
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        for i, (layer, (qkv, gate_up)) in enumerate(zip(self.layers(), self.groups, strict=True)):
            h = _rms_norm(x, layer.norm1)
            if plain and not (layer.lora and not all(_plain(m) for m in layer.qkv)) and qkv.fits(layer.qkv):
                # One matmul for q, k and v, and one rotary for q and k together.
                out = qkv.matmul(h, layer.qkv).view(rows, n, heads + 2 * kv_heads, head_dim)
                qk = _rotary(out[:, :, : heads + kv_heads], cos, sin)
                q, k, v = qk[:, :, :heads], qk[:, :, heads:], out[:, :, heads + kv_heads :]
            else:
                q, k, v = (m(h) for m in layer.qkv)
                q = _rotary(q.view(rows, n, heads, head_dim), cos, sin)
                k = _rotary(k.view(rows, n, kv_heads, head_dim), cos, sin)
                v = v.view(rows, n, kv_heads, head_dim)
            keys, values = kv.write(i, k.transpose(1, 2), v.transpose(1, 2))
            o = self._attend(q, keys, values, mask, kv.length)
            x = x + layer.o_proj(o)
            h = _rms_norm(x, layer.norm2)
            if (
                plain
                and not (layer.lora and not all(_plain(m) for m in layer.gate_up))
                and gate_up.fits(layer.gate_up)
            ):
                g, u = gate_up.matmul(h, layer.gate_up).chunk(2, dim=-1)
            else:
                g, u = (m(h) for m in layer.gate_up)
            x = x + layer.down(F.silu(g) * u)
        kv.advance(n)
        return self.base.lm_head(_rms_norm(x[:, -1], inner.norm)).float()

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, past: int
    ) -> torch.Tensor:
        """Attention of q [rows, n, heads, head dim] over keys/values [rows, kv heads, length, head dim];
        returns [rows, n, heads x head dim]."""
        # SDPA for one query too. Two hand-written matmuls were tried; their last bits differ from
        # SDPA's, and int8's bf16 activations turned that into different greedy text on one of the
        # int8 = fp32 test prompts.
        rows, n = q.shape[:2]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys,
            values,
            attn_mask=_attention_mask(mask, past, n, q.device),
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
            self.index, self.is_initialized = index, True

        def update(
            self, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return kv.write(self.index, k, v)

        def get_seq_length(self) -> int:
            return kv.length

    n = kwargs["input_ids"].shape[1]
    kv.reserve(n)
    cache = Cache(layers=[Layer(i) for i in range(kv.keys.shape[0])])
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
