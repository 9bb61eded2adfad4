"""The decoder layer that the CPU decode step compiles ahead of time (cpu_compile.py) and runs
(cpu_step.py): one layer of decoder.Decoder's math for one new token per row, as a pure function of
its inputs.

Weights, keys and values are inputs, not constants, so one compiled file serves every layer, adapter
and checkpoint of the same shape. `Layer` is the plain math; `LoraLayer` adds each row's LoRA terms
picked by slot from stacked adapters, so rows on different adapters decode in one call. The code here
is what the compiled file is made from: `math_source` digests it into the file's cache key, so a
change here rebuilds the file, and a change anywhere else does not."""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from . import attention, quant


def linear(h: torch.Tensor, weight: tuple[torch.Tensor, ...], kind: str) -> torch.Tensor:
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
    """Modules that read the same input: one fused product, or one per part (quant.fuse_low_bit)."""
    if len(parts) == 1:
        return linear(h, parts[0], kind)
    return torch.cat([linear(h, p, kind) for p in parts], dim=-1)


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


class Layer(torch.nn.Module):
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
        q, k, v = qk[:, :, :heads], qk[:, 0, heads:], out[:, 0, heads + kv_heads :]
        a = attention.decode(q, past_k, past_v, k, v, mask, self.scaling)
        x = x + _plus(linear(a, o_proj, kind), a, slot, lora[1])
        h = rms_norm_fp32(x, norm2, eps)
        g, u = _plus(_linears(h, gate_up, kind), h, slot, lora[2]).chunk(2, dim=-1)
        m = F.silu(g) * u
        return x + _plus(linear(m, down, kind), m, slot, lora[3]), k, v


class LoraLayer(Layer):
    """Layer with each row's adapter added to every linear module's output (`_lora`), as PEFT's
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


def math_source() -> str:
    """A digest of the code the compiled file is made from: the math here and quant.py's products."""
    parts = [
        inspect.getsource(f)
        for f in (
            Layer,
            LoraLayer,
            _plus,
            rms_norm_fp32,
            linear,
            _linears,
            _lora,
            quant.fuse_low_bit,
            quant._matmul,
            attention.decode,
            attention.batch_invariant,
        )
    ]
    return hashlib.sha256("".join(parts).encode()).hexdigest()[:16]
