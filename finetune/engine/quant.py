"""Weight-only quantized decoding on CPU (`SERVE_QUANT=int8|int4`; `pick_quantization` reads the
setting, whose bnb8|bnb4 load the base through bitsandbytes instead): every linear layer of the
base gets a low-bit copy of its weight that a CPU kernel multiplies with the activations, through
our own kernels (`kernel.py`): int8 (a scale per 64 weights; fp32 activations, rounded to int8 per
group off AVX-512 CPUs, where the copies are packed in lanes of 8 rows: `int8_lanes`) and int4 (a
bf16 scale and offset per 32 weights, activations rounded to int8 per group; the vocabulary
projection stays int8, `HEAD_KIND`). Where ours cannot be built
they fall back to torch's `aten._weight_int8pack_mm` (one scale per row) and
`aten._weight_int4pack_mm_for_cpu`, with bf16 activations. Decoding a small model on a CPU is bound
by reading the weights, and these read about a quarter (int8) or a sixth (int4) of fp32's bytes.
Prompts (`prefill()`) go through our kernels too off AVX-512; on AVX-512 and on torch's kernels
they prefill through the fp32 weight.

The fp32 weight stays: merging and unmerging an adapter changes it exactly as without
quantization, and the low-bit copies follow (`use_merged`/`use_base`); tied embeddings share it;
layers on torch's kernels prefill with it; `fp32_weights()` measures against it. LoRA layers stay
in fp32 on top of their quantized base layer."""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..model.loading import ModelError
from ..settings import BNB_MODES, DTYPE_ENV, QUANT_ENV, QUANT_MODES
from . import kernel

INT4_GROUP = 32
INT8_GROUP = 64
_local = threading.local()


@contextmanager
def _flag(name: str) -> Iterator[None]:
    """This thread's flag `name` set inside the block, as it was after (blocks nest)."""
    before = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, before)


@contextmanager
def prefill() -> Iterator[None]:
    """Forward passes in this block prefill a prompt (the engine's prompt chunks): they run eagerly,
    never through the compiled decode step, and each layer's matmul is the one it decodes with
    where `prefills_quantized` says so (our int8 kernel off AVX-512, which computes each row the
    same way at any row count), else its fp32 weight (torch's int4 and int8 kernels round
    activations to bf16 and are slower than the fp32 matmul on many rows; on AVX-512 the fp32 GEMM
    keeps up with ours at short prompts and beats it at long ones). Either way the choice depends on
    the layer and the CPU, never on the row count: a prompt prefilled in one chunk or in several must
    leave the same cache, and a request decoded in a batch of 8 must give what it gives alone."""
    with _flag("prefill"):
        yield


def in_prefill() -> bool:
    return getattr(_local, "prefill", False)


@contextmanager
def fp32_weights() -> Iterator[None]:
    """Forward passes in this block use the fp32 weights, whatever the kind: fp32's own numbers,
    for measuring what the low-bit copies change (tests, bench/quant_worker.py)."""
    with _flag("fp32"):
        yield


def in_fp32_block() -> bool:
    return getattr(_local, "fp32", False)


def eager_only() -> bool:
    """A prompt's prefill or an fp32 block: the compiled decode step (low-bit, one row a request)
    does not run it."""
    return in_prefill() or in_fp32_block()


def prefills_quantized(kind: str) -> bool:
    """Prompts of a layer of this kind go through its low-bit kernel, not its fp32 weight: our int8
    kernel's, which computes every row the same way at any row count and runs a prompt's rows as
    a blocked GEMM (kernels/int8_linear.cpp) with integer products, off AVX-512. On AVX-512 the
    fp32 GEMM is as fast at a short prompt's rows and faster at long ones (bench/kernels.py), so
    prompts keep the fp32 weight there. The ISA is fixed for the process: the choice still never
    depends on the row count."""
    return kind in ("int8", "int4") and int8_kernel() == "finetune" and kernel.isa() != "avx512"


def supported(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def pick_quantization(mode: str, device: torch.device, weights: torch.dtype) -> str:
    """SERVE_QUANT: how the base's linear layers are quantized for serving.

    auto (the default): int8 where quantized decoding runs (a CPU with fp32 weights), else none.
    int8 decodes a stream ~2.3x as fast as fp32 (both compiled) at -0.4 % held-out loss, and a
    request's greedy text stays the same in a batch as alone (our kernel computes each row the same
    way in any batch, prompts included; docs/performance.md). int8 and int4 (this module) keep the
    fp32 weights beside their low-bit copies: they save time, not memory.

    bnb8 / bnb4: the base is loaded through bitsandbytes instead, as training's `quantization`
    8bit / 4bit loads it (LLM.int8(); nf4 with double quantization), on a CPU or a CUDA GPU: the
    linear weights take a quarter / an eighth of fp32's memory and nothing else is kept. The cost:
    adapters, the setup adapter included, run unmerged beside the base's layers (bitsandbytes layers
    cannot take an adapter into their weights and give the loaded ones back exactly), and decoding
    runs eagerly (no compiled step, no CUDA graphs). bnb8 quantizes each batch's activations
    together (LLM.int8()'s outlier columns are found over the whole batch), so a request's text
    may depend on what it is batched with; bnb4 on a CPU with AVX512-BF16 computes in bfloat16."""
    if mode not in QUANT_MODES:
        raise ModelError(f"{QUANT_ENV}={mode!r}: use one of {', '.join(QUANT_MODES)}")
    if mode in BNB_MODES:
        return mode  # load_base says why when bitsandbytes or the device cannot run it
    runs = supported(device) and weights == torch.float32
    if mode == "auto":
        return "int8" if runs else "none"
    if mode != "none" and not runs:
        raise ModelError(
            f"{QUANT_ENV}={mode} needs a CPU and float32 weights (got {device.type}, {weights}); "
            f"use {QUANT_ENV}=none, or {DTYPE_ENV}=float32 on a CPU"
        )
    return mode


def describe_quantization(mode: str) -> str:
    if mode in BNB_MODES:
        return f"bitsandbytes {BNB_MODES[mode]} base"
    return "not quantized" if mode == "none" else f"{mode} decoding"


def _int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] int8 codes and their scales. Symmetric: the largest weight of a group maps to 127. Our kernel takes fp32 scales per 64
    weights (or 32 or 16, whichever divides the width; held-out loss -0.4 % against +0.9 % with one
    scale per row, measured), torch's one bf16 scale per row; rounding with the bf16 value itself
    keeps every weight within half a step."""
    weight = weight.detach().float()
    rows, cols = weight.shape
    ours = int8_kernel() == "finetune"
    group = next(g for g in (INT8_GROUP, INT8_GROUP // 2, INT8_GROUP // 4, cols) if cols % g == 0)
    blocks = weight.reshape(rows, -1, group if ours else cols)
    scales = blocks.abs().amax(dim=-1).clamp(min=1e-12) / 127
    if not ours:
        scales = scales.squeeze(1).to(torch.bfloat16)
    q = torch.round(blocks / scales.float().reshape(rows, -1, 1)).clamp(-128, 127).to(torch.int8)
    return q.reshape(rows, cols).contiguous(), scales.contiguous()


def _quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's copy: `_int8_codes`, packed in lanes where `int8_lanes` (whole blocks of 8 rows)."""
    q, scales = _int8_codes(weight)
    return _pack_int8_lanes(q, scales) if int8_lanes() and q.shape[0] % 8 == 0 else (q, scales)


def int8_lanes() -> bool:
    """int8 copies are packed in lanes (int8_lanes_linear): our kernel, off AVX-512, where it
    multiplies activations rounded to int8 with 8 rows of weights at a time. On AVX-512 it widens
    the weights to fp32 a row at a time, from the plain [out, in] layout."""
    return int8_kernel() == "finetune" and kernel.isa() != "avx512"


def _pack_int8_lanes(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels/int8_linear.cpp's lane order: blocks of 8 rows, each [in / 4][8 rows x 4 bytes], and
    their scales [groups][8 rows]: [out / 8, in / 4, 32] and [out / 8, groups, 8] (three dimensions:
    a copy says which layout it is in)."""
    rows, cols = q.shape
    w = q.reshape(rows // 8, 8, cols // 4, 4).permute(0, 2, 1, 3).reshape(rows // 8, cols // 4, 32)
    s = scales.reshape(rows // 8, 8, -1).permute(0, 2, 1)
    return w.contiguous(), s.contiguous()


def _int4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group of 32: codes 0..15, scale and offset with w ~ code * scale + offset (the bf16
    values the kernel will use, so rounding sees what it will compute with). From the group's range:
    a least-squares refit of scale and offset (4 rounds) was measured and not kept, its held-out
    loss no better (GSM8K +0.29 % against +0.21 %, the demo's +0.66 % against +0.89 %)."""
    weight = weight.detach().float()
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // INT4_GROUP, INT4_GROUP)
    low = groups.amin(dim=-1, keepdim=True)
    scale = ((groups.amax(dim=-1, keepdim=True) - low) / 15).clamp(min=1e-12)
    scale, low = scale.to(torch.bfloat16).float(), low.to(torch.bfloat16).float()
    codes = torch.round((groups - low) / scale).clamp(0, 15)
    return codes, scale, low


def _pack_int4(
    codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our kernel's layout (kernels/int4_linear.cpp): blocks of 8 rows; each group of a block is 4
    vectors of 32 bytes, row j's 4 bytes at lane j of each (byte t of vector v: code 4v + t in the
    low nibble, 16 + 4v + t in the high one), then the 8 rows' scales and 8 offsets in bf16."""
    rows, groups, _ = codes.shape
    c = codes.to(torch.uint8)
    nibbles = (c[..., :16] | (c[..., 16:] << 4)).reshape(rows // 8, 8, groups, 4, 4)  # [., j, g, v, t]
    w = nibbles.permute(0, 2, 3, 1, 4).reshape(rows // 8, groups * 128)
    pairs = torch.stack([scale.reshape(rows, groups), low.reshape(rows, groups)])  # [2, rows, groups]
    s = pairs.reshape(2, rows // 8, 8, groups).permute(1, 3, 0, 2).reshape(rows // 8, groups * 16)
    return w.contiguous(), s.to(torch.bfloat16).contiguous()


def _quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scale, low = _int4_codes(weight)
    if int8_kernel() == "finetune":
        return _pack_int4(codes, scale, low)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes.to(torch.int32).reshape(weight.shape), 1
    )
    # The kernel computes (code - 8) * scale + zero, so zero = low + 8 * scale; [groups, rows, 2].
    zeros = low + 8 * scale
    scales_and_zeros = torch.stack([scale.squeeze(-1).T, zeros.squeeze(-1).T], dim=-1)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous()


def _dequantize(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """What the kernel's copy of `weight` stands for, for checking it."""
    if kind == "int8":
        q, scales = _int8_codes(weight)
        rows = q.shape[0]
        return (
            q.float().reshape(rows, scales.numel() // rows, -1) * scales.float().reshape(rows, -1, 1)
        ).reshape(q.shape)
    codes, scale, low = _int4_codes(weight)
    return (codes * scale + low).reshape(weight.shape)


QUANTIZE = {"int8": _quantize_int8, "int4": _quantize_int4}


def int8_kernel() -> str:
    """Which kernels int8 and int4 decoding run: "finetune" (ours, built on first use) or "aten"
    (torch's)."""
    return "finetune" if kernel.available() else "aten"


def bf16_activations(kind: str) -> bool:
    """The kind's kernel rounds activations to bf16 (torch's kernels do; ours and fp32 do not)."""
    return kind in ("int8", "int4") and int8_kernel() == "aten"


def rounds_activations(kind: str) -> bool:
    """The kind's kernel rounds activations before multiplying: torch's to bf16, ours to int8 per
    group except on AVX-512 (kernels/int8_linear.cpp). A last-bit change in x may then move a
    product by a rounding step, not by an ulp. Our int4 kernel rounds them to int8 on every CPU."""
    if kind == "int8" and int8_kernel() == "finetune":
        return kernel.isa() != "avx512"
    if kind == "int4" and int8_kernel() == "finetune":
        return True
    return bf16_activations(kind)


def _matmul(kind: str, x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [rows, in] fp32 times a low-bit copy: [rows, out] fp32. torch's kernels take bf16
    activations (with fp32 ones, `_weight_int8pack_mm` was measured 15x slower)."""
    if kind == "int8" and int8_kernel() == "finetune":
        if q.dim() == 3:  # packed in lanes
            return torch.ops.finetune.int8_lanes_linear(x, q, scales)
        return torch.ops.finetune.int8_linear(x, q, scales)
    if kind == "int4" and int8_kernel() == "finetune":
        return torch.ops.finetune.int4_linear(x, q, scales)
    if kind == "int8":
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scales).to(x.dtype)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), q, INT4_GROUP, scales).to(x.dtype)


# torch's CPU int4 layout packs rows in blocks: concatenating two packed copies is the packed
# concatenation only when every part but the last fills whole blocks (measured: 32-row parts fuse
# exactly, 16- and 48-row ones do not; 64 leaves a margin for other CPUs' layouts). Ours is in
# blocks of 8 rows, and its layers are whole blocks (kernel_fits).
_INT4_ROW_BLOCK = 64


def fuse_low_bit(kind: str, copies: list[tuple[torch.Tensor, ...]]) -> list[tuple[torch.Tensor, ...]]:
    """One low-bit copy for modules that read the same input where that is exact: rows are
    quantized independently (scales by row or block of rows; torch's int4 scales [groups, rows, 2]),
    so the fused product is the concatenation of theirs (int8's lanes: of whole blocks of 8 rows).
    Otherwise the parts, multiplied one by one."""
    torchs_int4 = kind == "int4" and int8_kernel() != "finetune"
    if torchs_int4 and any(c[0].shape[0] % _INT4_ROW_BLOCK for c in copies[:-1]):
        return copies
    if len({c[0].dim() for c in copies}) > 1:  # int8 in lanes beside a part of [out, in] (out % 8)
        return copies
    weights = torch.cat([c[0] for c in copies])
    scales = torch.cat([c[1] for c in copies], dim=1 if torchs_int4 else 0)
    return [(weights, scales)]


# Bumped whenever a module's low-bit copy (qweight, qscales) is set to another tensor: quantize,
# use_merged / use_base when they switch, fused_copies when it makes views. The compiled step reads
# it each step to tell whether the copies it holds are still the ones the modules use, instead of
# reading 200-odd modules' pointers (0.3-0.5 ms of a 6-7 ms step, mostly cache misses).
_copies_version = 0


def copies_version() -> int:
    return _copies_version


def _set_copy(layer: torch.nn.Module, copy: tuple[torch.Tensor, torch.Tensor]) -> None:
    global _copies_version
    if getattr(layer, "qweight", None) is not copy[0] or layer.qscales is not copy[1]:
        layer.qweight, layer.qscales = copy
        _copies_version += 1


def fused_copies(layers: list[torch.nn.Linear]) -> list[tuple[torch.Tensor, ...]]:
    """`fuse_low_bit` of the low-bit copies the layers (q/k/v, or gate/up) use now, made once and kept
    on the first layer, one per set of copies (the base's, and the setup adapter's merged in): the
    eager forward and the compiled step share it, and switching costs no second fusing. Where the
    fused copy is one tensor pair, each layer's copy becomes a view of its rows: kept once, not twice
    (the 135M model's qkv and gate/up copies are 70 MB in int8)."""
    key = tuple(layer.qweight.data_ptr() for layer in layers)
    kept: dict[tuple[int, ...], list[tuple[torch.Tensor, ...]]] = layers[0].__dict__.setdefault("q_fused", {})
    if key in kept:
        return kept[key]
    fused = fuse_low_bit(layers[0].qkind, [(layer.qweight, layer.qscales) for layer in layers])
    if len(fused) == 1 and fused[0][1].shape[0] == sum(layer.qscales.shape[0] for layer in layers):
        (weights, scales), row, scale_row = fused[0], 0, 0
        for layer in layers:
            n, ns = layer.qweight.shape[0], layer.qscales.shape[0]
            views = (weights[row : row + n], scales[scale_row : scale_row + ns])
            which = "q_base" if layer.qweight is layer.q_base[0] else "q_merged"
            setattr(layer, which, views)
            _set_copy(layer, views)
            row, scale_row = row + n, scale_row + ns
        key = tuple(layer.qweight.data_ptr() for layer in layers)
    if len(kept) >= 2:  # the base's and the merged copies; anything older is stale
        kept.clear()
    kept[key] = fused
    return fused


def fused_matmul(x: torch.Tensor, layers: list[torch.nn.Linear]) -> torch.Tensor | None:
    """x times the layers' low-bit copies in one product (their outputs side by side), where each
    layer's own forward would use its low-bit copy now, they share a kind and have no bias; else
    None. The same bits as the layers one by one: each output of our kernels is computed alone."""
    kind = getattr(layers[0], "qkind", None)
    if kind is None or any(getattr(m, "qkind", None) != kind or m.bias is not None for m in layers):
        return None
    if not _on_copy(kind):
        return None
    flat = x.reshape(-1, x.shape[-1])
    parts = [_matmul(kind, flat, *copy) for copy in fused_copies(layers)]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out.view(*x.shape[:-1], -1)


def _on_copy(kind: str) -> bool:
    """A layer of this kind multiplies with its low-bit copy here and now, not its fp32 weight."""
    return not (in_fp32_block() or (in_prefill() and not prefills_quantized(kind)))


def _quantized_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if not _on_copy(self.qkind):
        out = F.linear(flat, self.weight, self.bias)
    else:
        out = _matmul(self.qkind, flat, self.qweight, self.qscales)
        if self.bias is not None:
            out = out + self.bias
    return out.view(*x.shape[:-1], -1)


def kernel_fits(layer: torch.nn.Linear, kind: str) -> bool:
    """Our int8 kernel takes input widths in multiples of 16. torch's kernels are private and
    their limits documented nowhere. Measured with torch 2.13: its int8 kernel with an input width
    that is not a multiple of 16 gives wrong numbers (40) or crashes the process (36); int4 needs
    outputs in multiples of 16 and inputs in whole groups (ours: outputs in blocks of 8). Those layers,
    and any whose product disagrees with the dequantized weight on a test row, stay fp32."""
    if kind == "int8" and layer.in_features % 16:
        return False
    ours = int8_kernel() == "finetune"
    if kind == "int4" and (layer.out_features % (8 if ours else 16) or layer.in_features % INT4_GROUP):
        return False
    q, scales = QUANTIZE[kind](layer.weight)
    x = torch.linspace(-1, 1, layer.in_features)[None].to(torch.bfloat16).float()
    got = _matmul(kind, x, q, scales)
    want = x @ _dequantize(kind, layer.weight).T
    return bool((got - want).abs().max() <= 0.02 * want.abs().max().clamp(min=1e-6))


def base_linears(model: Any) -> list[torch.nn.Linear]:
    """The model's own linear layers (the vocabulary projection included), not LoRA's A/B."""
    return [
        m
        for name, m in model.named_modules()
        if type(m) is torch.nn.Linear and not any(part.startswith("lora_") for part in name.split("."))
    ]


# The vocabulary projection's kind where it is not the layers': int4's is int8. Held-out loss on
# 100 GSM8K answers (bench/quant_quality.py --heldout): +1.94 % against fp32 with every layer int4,
# +0.21 % with this one int8 (int8 everywhere: +0.38 %). It reads a fifth of the 135M model's
# weights, and a logit's error goes straight into the token's choice.
HEAD_KIND = {"int4": "int8"}


def quantize(model: Any, kind: str) -> int:
    """Give every base linear layer a low-bit copy and the forward that uses it; returns the count.
    Plain attributes, not buffers: the copies never reach a state dict or a saved adapter."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    checked: dict[tuple[int, int, str], bool] = {}
    layers = []
    for layer in base_linears(model):
        own = HEAD_KIND.get(kind, kind) if layer is head else kind
        shape = (layer.out_features, layer.in_features, own)
        if shape not in checked:
            checked[shape] = kernel_fits(layer, own)
        if checked[shape]:
            layers.append((layer, own))
    for layer, own in layers:
        layer.qkind = own
        layer.q_base = QUANTIZE[own](layer.weight)
        _set_copy(layer, layer.q_base)
        layer.forward = types.MethodType(_quantized_linear, layer)
    return len(layers)


def use_merged(layers: list[torch.nn.Linear]) -> None:
    """The fp32 weights of `layers` now hold the setup adapter merged in: decode with low-bit copies
    of those. The setup adapter never changes, so they are quantized once and kept, and switching
    back and forth costs a pointer swap, not a second quantization."""
    for layer in layers:
        if hasattr(layer, "q_base"):
            if not hasattr(layer, "q_merged"):
                layer.q_merged = QUANTIZE[layer.qkind](layer.weight)
            _set_copy(layer, layer.q_merged)


def use_base(layers: list[torch.nn.Linear]) -> None:
    """The fp32 weights of `layers` are the base's again."""
    for layer in layers:
        if hasattr(layer, "q_base"):
            _set_copy(layer, layer.q_base)


def quantized_bytes(model: Any) -> int:
    """Bytes the low-bit copies take (both sets once the setup adapter has been merged)."""
    total = 0
    for m in base_linears(model):
        for copy in (getattr(m, "q_base", None), getattr(m, "q_merged", None)):
            if copy is not None:
                total += sum(t.numel() * t.element_size() for t in copy)
    return total
