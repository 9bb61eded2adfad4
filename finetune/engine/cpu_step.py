"""The engine's decode step compiled ahead of time on CPU (`SERVE_COMPILE=auto|off`), as it runs:
`CompiledStep` gathers what the compiled layer (cpu_layer.py) reads and calls it once per layer.

A decode step of a small model in eager mode spends more time dispatching its ~40 ops a layer than
in the matmuls; compiled, the elementwise work is fused into a few C++ loops, the matmuls stay extern
kernels (MKL, or our int8 and int4 ops from kernel.py) and a layer is one C++ call. The
layers share their shapes, so one compiled file serves any depth; embedding, final norm and
vocabulary projection run eagerly around it (three ops). Building, caching and loading that file,
and checking it at load, are cpu_compile.py's.

* The weights a call reads are gathered once per set-up of the model (adapters attached, merged,
  disabled or switched; weights replaced), and low-bit copies of modules that read the same input
  are fused where that is exact.
* Unmerged LoRA adapters (per-request `lora_weights`, or the setup adapter beside them) run through
  a second file, cpu_layer.LoraLayer: every attached adapter's A and B are stacked per layer once,
  and each row picks its own by index, so rows on different adapters decode in one compiled step,
  as LoRAX and vLLM batch them. Steps where no row has an adapter (none, or the setup adapter
  merged) use the first file, which rows without an adapter match bit for bit.
* Prompts are prefilled eagerly (many rows at once are matmul-bound), and a step runs eagerly
  whenever the compiled math does not cover it: an adapter other than plain LoRA (DoRA, a bias on
  B), a layer left in fp32 among quantized ones, a model decoder.py does not cover. On a CUDA GPU
  the step runs as CUDA graphs instead (cuda_graphs.py, which gathers its weights through
  `CompiledStep` too), without per-request adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import quant
from .cpu_layer import linear, rms_norm_fp32
from .decoder import KV, PEFT_BASE, Decoder, base_linear, plain_linear

# LoRA stacks hold at least 2 slots and rank 2 (sizes of 1 would be specialised by the export); real
# adapters' ranks are padded up to a multiple of 8, so adapters of rank 4, 8 and 16 load into the same
# shapes.
MIN_SLOTS, MIN_RANK, _RANK_STEP = 2, 2, 8


def _stackable(module: Any, name: str) -> bool:
    """The adapter is plain LoRA on this module, as cpu_layer.LoraLayer computes it: no DoRA or
    other variant, no bias on B, torch's Linear for A and B."""
    return (
        name not in getattr(module, "lora_variant", {})
        and not module.use_dora.get(name, False)
        and type(module.lora_A[name]) is torch.nn.Linear
        and type(module.lora_B[name]) is torch.nn.Linear
        and module.lora_B[name].bias is None
    )


Stacks = list[list[torch.Tensor]]  # per layer: a, b of qkv, o, gate_up, down


def module_groups(decoder: Decoder) -> list[list[list[Any]]]:
    """Each layer's linear modules by input, in the order cpu_layer.LoraLayer takes their stacks."""
    return [[layer.qkv, [layer.o_proj], layer.gate_up, [layer.down]] for layer in decoder.layers()]


def _stack(
    group: list[Any], adapters: dict[str, int], slots: int, rank: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    """The (a, b) stacks cpu_layer.LoraLayer takes for one group of modules: module g's A of
    adapter i in a[i, g*rank:][:r], its B x scaling, transposed, in b[i, g*rank:][:r, its columns]."""
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
    """Every attached adapter that cpu_layer.LoraLayer can compute, by slot (from 1; 0 is no
    adapter), and each layer's stacks, every adapter's rank padded to the same multiple of _RANK_STEP."""
    modules = [m for layer in decoder.layers() for m in layer.linears if m is not base_linear(m)]
    names = {n for m in modules for n in m.lora_A}
    names -= {n for m in modules for n in m.lora_A if not _stackable(m, n)}
    adapters = {n: i + 1 for i, n in enumerate(sorted(names))}
    rank = max([m.lora_A[n].out_features for m in modules for n in adapters if n in m.lora_A] or [1])
    rank = -(-rank // _RANK_STEP) * _RANK_STEP
    slots = max(len(adapters) + 1, MIN_SLOTS)
    stacks = [
        [t for group in groups for t in _stack(group, adapters, slots, rank, dtype)]
        for groups in module_groups(decoder)
    ]
    return adapters, stacks


def weight_kind(module: Any) -> str:
    """The kind of weight a linear layer's base multiplies with: "none" (fp32 or bf16), or quant.py's
    low-bit kind."""
    return getattr(base_linear(module), "qkind", "none")


def _copy(module: Any) -> tuple[torch.Tensor, ...]:
    """What a base linear layer's forward multiplies with now."""
    base = base_linear(module)
    return (base.qweight, base.qscales) if hasattr(base, "qkind") else (base.weight,)


def _weight_pointer(module: torch.nn.Module) -> int:
    """Where a linear module's fp32 or bf16 weight lives, read without Module.__getattr__ (each step
    reads it for every module without a low-bit copy)."""
    weight = module._parameters.get("weight")
    return (module.weight if weight is None else weight).data_ptr()


class CompiledStep:
    """The compiled decode step of one model, with the weights it reads gathered for each call.
    `runner` takes the layer's inputs as one flat list (the loaded package's `boxed_run`: its
    `__call__` would parse the input and output specs again on every call); `lora_runner` (None:
    steps with adapters run eagerly) is the LoraLayer file's, for steps where some row has an
    adapter. Rows without one give the same bits through either (checked at load), so a request's
    text does not depend on whether its neighbours have adapters."""

    def __init__(self, runner: Any, kind: str, head_kind: str, path: Path | None) -> None:
        self.runner, self.kind, self.head_kind, self.path = runner, kind, head_kind, path
        self.lora_runner: Any = None
        self._layers: list[Any] | None = None  # the decoder's layer list the lists below were made for
        self._bases: list[Any] = []
        self._loras: list[Any] = []  # the LoRA modules; PEFT merges, disables and activates model-wide
        self._key: tuple[Any, ...] | None = None
        self._version = -1  # quant.copies_version() that _plain_bases was made at
        self._plain_bases: list[Any] = []  # of _bases, those without a low-bit copy
        self._inputs: tuple[Any, ...] | None = None
        self._plain = False
        self._stacks: tuple[Any, dict[str, int], Stacks] | None = None  # for this list of layers

    # -- what a call reads ------------------------------------------------------------------
    def _group(self, decoder_group: Any, modules: list[Any]) -> list[tuple[torch.Tensor, ...]]:
        if self.kind == "none":
            return [(decoder_group._fuse([base_linear(m).weight for m in modules]),)]
        return quant.fused_copies([base_linear(m) for m in modules])

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
                if base_linear(m).bias is not None or weight_kind(m) != self.kind:
                    return False
        head = decoder.base.lm_head
        return head.bias is None and weight_kind(head) == self.head_kind

    def layer_weights(self, decoder: Decoder) -> list[tuple[Any, ...]]:
        """Each layer's (norm1, qkv parts, o, norm2, gate_up parts, down), as Layer takes them."""
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
            self._layers, self._key, self._version = layers, None, -1
            self._bases = [base_linear(m) for m in modules] + [decoder.base.lm_head]
            self._loras = [m for m in modules if m is not base_linear(m)]
        lora = self._loras[0] if self._loras else None
        adapters = (
            None
            if lora is None
            else (tuple(lora.merged_adapters), lora.disable_adapters, tuple(lora.active_adapters))
        )
        version = quant.copies_version()
        if version != self._version:  # which modules multiply with a low-bit copy, and which not
            self._version = version
            self._plain_bases = [b for b in self._bases if "qweight" not in b.__dict__]
        return adapters, version, tuple(map(_weight_pointer, self._plain_bases))

    def prepared(self, decoder: Decoder) -> tuple[Any, ...] | None:
        """`inputs` when `covers`, else None (the CUDA graphs' step has no LoRA terms)."""
        inputs = self._prepare(decoder)
        return inputs if self._plain else None

    def _prepare(self, decoder: Decoder) -> tuple[Any, ...] | None:
        """`inputs` when `covers_base`, else None; `_plain` says whether `covers` holds too. Both are
        looked at again only when the model's set-up changed (adapters attached, merged, disabled
        or switched; fp32 weights replaced, or modules given other low-bit copies, which
        quant.copies_version() counts): the full check takes ms, this one microseconds."""
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
        active adapters, an adapter cpu_layer.LoraLayer cannot compute) or there is no LoRA file."""
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
        return linear(
            rms_norm_fp32(x[:, -1], norm, inner.norm.variance_epsilon), head, self.head_kind
        ).float()
