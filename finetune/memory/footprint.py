"""What a model's shape costs in memory: the byte counts behind plan.py, from a config alone.

A `Shape` is read from a transformers config by building the model on the meta device (no weights,
no GPU): one decoder layer's linear modules, the embedding and head sizes. Every count below is
the bytes of tensors that are alive at once, as torch's allocator counts them
(`torch.cuda.max_memory_allocated`); plan.py adds the CUDA context and a margin.

Weights (bitsandbytes quantizes the decoder layers' linear modules only):
  bf16/fp16 2 B and fp32 4 B per parameter; 8-bit 1 B per weight plus an fp32 scale per output row;
  4-bit nf4 0.5 B per weight plus one uint8 absmax per 64-weight block and, double-quantized, one
  fp32 absmax per 256 of those. PEFT's prepare_model_for_kbit_training (modeling.add_lora calls it
  for 8/4-bit) casts every parameter that is not quantized (embeddings, lm_head, norms) to fp32,
  so under 8/4-bit those weights cost 4 B and the hidden states flow in fp32.
LoRA: r x (in + out) parameters per adapted module and layer, kept in fp32 by PEFT, each with an
  fp32 gradient and AdamW's exp_avg and exp_avg_sq: 16 B per trainable parameter. AdamW's foreach
  step on a GPU briefly adds one more fp32 copy (its sqrt(exp_avg_sq) list).
Activations saved for backward, per token and decoder layer (a = bytes of the hidden states):
  * each RMSNorm keeps its input in fp32 (4h) and the reciprocal RMS (4 B);
  * attention keeps rotated q (a x heads x head_dim), rotated k and v (a x kv heads x head_dim), its
    output (a x heads x head_dim, also o_proj's input) and the fp32 log-sum-exp (4 B per head): a
    fused kernel (flash, memory-efficient, cuDNN) stores no seq x seq matrix;
  * the MLP keeps gate's output (SiLU's input), SiLU's output and up's output: 3 x a x intermediate;
  * a frozen base linear keeps nothing (its weight needs no gradient; 8-bit bitsandbytes is the
    exception: it keeps its input);
  * each adapted module: PEFT casts its input to the fp32 LoRA weights and drops out; dropout keeps
    its mask (1 B on a GPU, 4 B on a CPU, where dropout multiplies by a float mask) and lora_A its
    fp32 input, then lora_B keeps lora_A's output (4r). Without dropout an fp32 input is shared
    rather than copied.
  Layer 0 without checkpointing keeps less: its input needs no gradient.
  Gradient checkpointing keeps each layer's input (a x hidden) instead, and recomputes one layer at
  a time in the backward pass.
Logits: only labelled positions are projected (losses.TokenLoss); the plan assumes every token is
  labelled. At the start of the backward pass three fp32 [tokens, vocab] tensors are alive (the
  log-softmax output, its incoming gradient and the outgoing one): 12 x vocab B per token.
Backward working set of one layer: the gradients in flight while a layer's backward runs. The MLP's
  backward holds three gradients of the intermediate width at once in the activations' dtype (down's
  input, SiLU's and up's outputs); with LoRA on the MLP its fp32 branch gradients take part of
  that place (LAYER_WORK_LORA_MLP, calibrated against measured steps); two fp32 gradients of the
  hidden width. bitsandbytes adds the largest linear's weight dequantized for its backward matmul
  (bf16 for 4-bit, fp32 for 8-bit), and 8-bit quantizes its input on the fly (KBIT8_WORK).
The peak is the static part (weights, LoRA state) plus the largest of: the saved activations plus
  logits (backward starts), the saved activations plus one layer's recomputation and working set,
  the optimizer step's copy.

Serving (server.py, scheduler.py, cuda_graphs.py) holds the weights in the serving dtype, the adapters of
the LRU cache (fp32), the prompt-prefix cache and the engine's KV cache: 2 x layers x kv heads x
head_dim x dtype bytes per token slot, the budget counting rows x padded length. The batch's cache
grows by doubling, so it may hold twice the budget. Beside it, a request joining the batch is
stacked into a new cache (up to the budget once more); on a GPU the CUDA-graph step's pool takes
that place: at most the budget (a step whose pool would be larger decodes eagerly, its cache
doubling beside the pool). Each captured (rows, columns) bucket has a private memory pool holding
that step's intermediates, rounded to the allocator's 2 MiB (small) and 20 MiB (large) segments.
A prefill chunk's working set comes on top."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from ..engine.cuda_graphs import MIN_COLUMNS

# The decoder layer's linear modules by the input they read: modules of one group share it.
INPUT_GROUPS = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_act",
}
REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# A layer's backward working set (module docstring), per token: bytes per element of the intermediate
# width when LoRA adapts the MLP, by the bytes of the hidden states (without it: 3 x those bytes),
# and fp32 gradients of the hidden width. Calibrated against measured CPU steps (tests/test_plan.py).
LAYER_WORK_LORA_MLP = {2: 10, 4: 7}
LAYER_WORK_FP32_HIDDEN = 2
KBIT8_WORK = 8  # bytes per element of the widest linear input: 8-bit's fp16 and int8 copies, its output
SMALL_SEGMENT = 2 << 20  # the CUDA caching allocator's segment for allocations up to 1 MiB
LARGE_SEGMENT = 20 << 20  # ... and for allocations from 1 MiB to 10 MiB


class PlanError(ConfigError):
    """The planner cannot read the model or a setting; the message names the flag or field."""


@dataclass(frozen=True)
class Shape:
    """What the memory of a Llama-family decoder depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    linears: tuple[tuple[str, int, int], ...]  # one decoder layer's linear modules: (name, in, out)
    params: int
    embed_params: int
    head_params: int  # 0 when lm_head is tied to the embeddings

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears)

    @property
    def kv_elements_per_token(self) -> int:
        """Keys and values of every layer for one token slot (times the dtype's bytes: the KV bytes)."""
        return 2 * self.layers * self.kv_heads * self.head_dim

    @staticmethod
    def from_config(config: Any) -> Shape:
        missing = [f for f in REQUIRED_FIELDS if getattr(config, f, None) is None]
        if missing:
            raise PlanError(
                f"the model config lacks {', '.join(missing)}: the planner needs a decoder's shape"
            )
        return _shape(json.dumps(config.to_dict(), sort_keys=True, default=str))


@functools.lru_cache(maxsize=16)
def _shape(config_json: str) -> Shape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_json)
    config = AutoConfig.for_model(**raw)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        raise PlanError(
            f"model_type {raw.get('model_type')!r} has no causal LM in transformers: {exc}"
        ) from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        raise PlanError(
            f"model_type {raw.get('model_type')!r} is not a Llama-family decoder (no model.layers)"
        )
    linears = tuple(
        (name.rsplit(".", 1)[-1], m.in_features, m.out_features)
        for name, m in layers[0].named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed
    heads = config.num_attention_heads
    return Shape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        context=int(getattr(config, "max_position_embeddings", 2048) or 2048),
        linears=linears,
        params=sum(p.numel() for p in model.parameters()),
        embed_params=embed.numel(),
        head_params=0 if tied or head is None else head.weight.numel(),
    )


# -- weights ----------------------------------------------------------------------------------------


def quantized_linear_bytes(n_in: int, n_out: int, quantization: str) -> int:
    """One linear module's weight as bitsandbytes stores it."""
    n = n_in * n_out
    if quantization == "8bit":
        return n + 4 * n_out  # int8 weight (CB) + fp32 scale per row (SCB)
    if quantization == "4bit":
        blocks = -(-n // 64)
        # packed nf4, a uint8 absmax per block, an fp32 absmax per 256 of those and their code, nf4's
        # code, the offset
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4
    raise ValueError(quantization)


def weight_bytes(shape: Shape, dtype_bytes: int, quantization: str, kbit_fp32: bool = True) -> int:
    """The base model's weights. Under 8/4-bit the parameters that are not quantized cost 4 B when
    `kbit_fp32` (training: PEFT's kbit preparation casts them), else the compute dtype's bytes."""
    if quantization == "none":
        return shape.params * dtype_bytes
    linear = shape.layers * sum(quantized_linear_bytes(i, o, quantization) for _, i, o in shape.linears)
    rest = shape.params - shape.linear_params
    return linear + rest * (4 if kbit_fp32 else dtype_bytes)


def layer_weight_bytes(shape: Shape, dtype_bytes: int, quantization: str) -> int:
    """One decoder layer's linear weights as stored (what FSDP gathers per layer)."""
    if quantization == "none":
        return sum(i * o for _, i, o in shape.linears) * dtype_bytes
    return sum(quantized_linear_bytes(i, o, quantization) for _, i, o in shape.linears)


def adapted(shape: Shape, targets: list[str]) -> list[tuple[str, int, int]]:
    """The layer's linear modules a LoRA with these target names adapts ("all-linear": every one)."""
    if targets == ["all-linear"]:
        return list(shape.linears)
    names = {n for n, _, _ in shape.linears}
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise PlanError(
            f"--lora_target_modules {','.join(unknown)}: not a linear module of this model's layers; "
            f"use all-linear or some of {','.join(sorted(names))}"
        )
    return [m for m in shape.linears if m[0] in targets]


def lora_params(shape: Shape, r: int, targets: list[str]) -> int:
    return shape.layers * sum(r * (i + o) for _, i, o in adapted(shape, targets))


# -- activations ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """What shapes a training step's activations: the data, the LoRA and the precision."""

    tokens: int  # micro_batch_size x cutoff_len
    act_bytes: int  # bytes of the hidden states: the compute dtype's, 4 under 8/4-bit (fp32 flow)
    r: int
    targets: tuple[str, ...]
    dropout: float
    mask_bytes: int  # a dropout mask element: 1 (bool, CUDA) or 4 (a float mask, CPU)
    quantization: str  # none | 8bit | 4bit


def layer_saved_per_token(shape: Shape, step: Step) -> int:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    a, h, i = step.act_bytes, shape.hidden, shape.intermediate
    norms = 2 * (4 * h + 4)
    attention = a * (2 * shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim) + 4 * shape.heads
    mlp = 3 * a * i
    return norms + attention + mlp + _linear_saved_per_token(shape, step)


def _linear_saved_per_token(shape: Shape, step: Step) -> int:
    """What the base linear modules and the LoRA branches keep, group by group."""
    mods = {n for n, _, _ in adapted(shape, list(step.targets))}
    saves_input = step.quantization == "8bit"  # bitsandbytes' int8 matmul keeps its input
    fp32_flow = step.act_bytes == 4
    total = 0
    features: dict[str, int] = {}
    for name, n_in, _ in shape.linears:
        group = INPUT_GROUPS.get(name, name)
        features[group] = n_in
        if name not in mods:
            continue
        total += 4 * step.r  # lora_A's output, kept by lora_B
        if step.dropout > 0:
            total += (step.mask_bytes + 4) * n_in  # the mask and the dropped-out fp32 input
        elif not fp32_flow:
            total += 4 * n_in  # the fp32 copy of the input
    for group, n_in in features.items():
        # An input tensor kept once per group: by 8-bit's matmul, or by lora_A without dropout in an fp32
        # flow. Attention's output is already counted (the kernel keeps it).
        shared = saves_input or (
            fp32_flow and step.dropout == 0 and any(INPUT_GROUPS.get(n, n) == group for n in mods)
        )
        if shared and group != "attn_out":
            total += 4 * n_in if fp32_flow else step.act_bytes * n_in
    return total


def first_layer_discount_per_token(shape: Shape, step: Step) -> int:
    """What layer 0 does not keep when its input needs no gradient (no checkpointing): its first
    norm's input, the dropout masks of the modules reading it, 8-bit's kept input."""
    h = shape.hidden
    n_attn_in = sum(1 for n, _, _ in adapted(shape, list(step.targets)) if INPUT_GROUPS.get(n) == "attn_in")
    masks = n_attn_in * step.mask_bytes * h if step.dropout > 0 else 0
    return 4 * h + 4 + masks + (4 * h if step.quantization == "8bit" else 0)


def layer_work_per_token(shape: Shape, step: Step) -> int:
    """The gradients in flight while one layer's backward runs, per token."""
    mlp_adapted = any(
        INPUT_GROUPS.get(n, "").startswith("mlp") for n, _, _ in adapted(shape, list(step.targets))
    )
    per_intermediate = LAYER_WORK_LORA_MLP[step.act_bytes] if mlp_adapted else 3 * step.act_bytes
    return per_intermediate * shape.intermediate + LAYER_WORK_FP32_HIDDEN * 4 * shape.hidden


def kbit_work(shape: Shape, quantization: str, tokens: int) -> int:
    """bitsandbytes' own transients in a layer's backward: the largest linear's weight dequantized
    (bf16 for 4-bit, fp32 for 8-bit); 8-bit also quantizes its input on the fly (an fp16 and an
    int8 copy of the widest input, and its fp32 output: KBIT8_WORK per element, calibrated on CPU)."""
    largest = max(i * o for _, i, o in shape.linears)
    if quantization == "4bit":
        return 2 * largest
    if quantization == "8bit":
        return 4 * largest + KBIT8_WORK * tokens * max(i for _, i, _ in shape.linears)
    return 0


def final_saved_per_token(shape: Shape) -> int:
    """The final norm's fp32 input and reciprocal RMS, and the loss's int64 indices of labelled rows."""
    return 4 * shape.hidden + 4 + 16


def logits_per_token(shape: Shape) -> int:
    return 12 * shape.vocab


def training_parts(
    shape: Shape,
    checkpointing: bool,
    dtype_bytes: int,
    s: Step,
    world_size: int = 1,
    strategy: str = "single",
) -> dict[str, int]:
    """The tensors of one training step at its peak on one GPU, by part (their sum is the peak).
    ddp: every GPU holds the whole model, and DistributedDataParallel's buckets a copy of the LoRA
    gradients. fsdp: FSDP2 keeps 1/world_size of every weight and of the LoRA state per GPU, and
    gathers a decoder layer's weights while it runs (the next one prefetched) and the weights outside
    the layers (embeddings, head) together."""
    n = s.tokens
    shard = world_size if strategy == "fsdp" else 1
    weights = weight_bytes(shape, dtype_bytes, s.quantization) // shard
    p = lora_params(shape, s.r, list(s.targets)) // shard
    layer = layer_saved_per_token(shape, s) * n
    final = final_saved_per_token(shape) * n
    if checkpointing:  # the layers' inputs; one layer recomputed at a time
        saved = shape.layers * s.act_bytes * shape.hidden * n + final
        layer_phase = saved + layer
    else:
        saved = shape.layers * layer - first_layer_discount_per_token(shape, s) * n + final
        layer_phase = saved
    layer_phase += layer_work_per_token(shape, s) * n + kbit_work(shape, s.quantization, n)
    logits = logits_per_token(shape) * n
    optimizer_phase = 4 * p  # AdamW's foreach copy, once the activations are gone
    parts = {
        "base_weights": weights,
        "lora_weights": 4 * p,
        "lora_grads": 4 * p,
        "optimizer_state": 8 * p,
        "activations": saved,
        "logits": logits,
        "backward_extra": max(0, layer_phase - saved - logits, optimizer_phase - saved - logits),
    }
    if strategy == "ddp":
        parts["ddp_buckets"] = 4 * p
    if strategy == "fsdp":
        outside = (shape.embed_params + shape.head_params) * (4 if s.quantization != "none" else dtype_bytes)
        parts["fsdp_gathered"] = 2 * layer_weight_bytes(shape, dtype_bytes, s.quantization) + outside
    return parts


# -- serving ----------------------------------------------------------------------------------------


def bucket(n: int, floor: int = 1) -> int:
    """cudagraph._bucket: the power of two >= max(n, floor)."""
    return 1 << (max(n, floor) - 1).bit_length()


def pool_bytes(live: list[int]) -> int:
    """A CUDA graph's private pool for a step whose largest simultaneous allocations are `live`:
    allocations up to 1 MiB share 2 MiB segments, larger ones up to 10 MiB 20 MiB segments, the
    rest their own rounded size."""
    small = sum(n for n in live if n <= 1 << 20)
    large = [n for n in live if n > 1 << 20]
    mid = sum(n for n in large if n <= 10 << 20)
    big = sum(-(-n // SMALL_SEGMENT) * SMALL_SEGMENT for n in large if n > 10 << 20)
    return (
        max(1, math.ceil(small / SMALL_SEGMENT)) * SMALL_SEGMENT
        + math.ceil(mid / LARGE_SEGMENT) * LARGE_SEGMENT
        + big
    )


def decode_step_live(shape: Shape, rows: int, columns: int, b: int) -> list[int]:
    """The tensors one decode step (cudagraph.GraphStep._step) has alive at its widest point (the
    MLP of a layer), with the step's logits: the allocations its graph's pool must hold."""
    h, i, d = shape.hidden, shape.intermediate, shape.head_dim
    qkv = rows * (shape.heads + 2 * shape.kv_heads) * d * b
    return [
        rows * h * b,  # the residual stream
        rows * h * 4,  # the fp32 norm's working copy
        rows * h * b,  # the norm's output
        qkv,  # q, k, v of this layer (rotated copy of q and k)
        rows * shape.heads * d * b,  # attention output
        rows * columns * b,  # the boolean mask as an additive float mask
        rows * 2 * i * b,  # gate and up
        rows * i * b,  # silu(gate) * up
        rows * shape.vocab * b,  # logits in the weights' dtype
        rows * shape.vocab * 4,  # ... and as fp32, the graph's output
    ]


def graph_buckets(max_rows: int, longest: int, budget: int) -> list[tuple[int, int]]:
    """The (rows, columns) buckets a server captures: rows 1, 2, 4, ... up to max_rows, columns 64,
    128, ... up to the longest row's, whose pool rows x columns stays within the KV budget."""
    rows = sorted({min(bucket(n), max_rows) for n in range(1, max_rows + 1)})
    columns = []
    c = MIN_COLUMNS
    while c < bucket(longest, MIN_COLUMNS):  # a row of `longest` tokens decodes its last at length - 1
        columns.append(c)
        c *= 2
    columns.append(c)
    return [(r, c) for r in rows for c in columns if r * c <= budget]


def prefill_work(shape: Shape, chunk: int, longest: int, b: int) -> int:
    """One prefill chunk's working set: the widest layer intermediates for `chunk` tokens, its
    attention mask over the context as an additive float mask, and the last position's logits."""
    h, i = shape.hidden, shape.intermediate
    per_token = (3 * i + (shape.heads + 2 * shape.kv_heads) * shape.head_dim + 3 * h) * b + 4 * h
    return chunk * per_token + chunk * longest * b + shape.vocab * (b + 4)


@dataclass(frozen=True)
class Server:
    """What shapes a server's memory besides the model: the engine's limits and the precision."""

    dtype_bytes: int
    quantization: str  # none | 8bit | 4bit (bitsandbytes)
    max_rows: int  # requests decoded together
    max_tokens: int  # the engine's KV budget in token slots, rows x padded length
    adapters: int  # LoRA adapters held at once
    lora_r: int
    targets: tuple[str, ...]
    prefill_chunk: int
    prefix_tokens: int  # prompt-prefix KV kept for reuse
    graphs: bool  # the decode step runs as CUDA graphs


def serving_parts(shape: Shape, srv: Server) -> tuple[dict[str, int], int]:
    """The server's tensors at its peak, by part, and how many CUDA graphs it captures."""
    b = srv.dtype_bytes
    per_token = shape.kv_elements_per_token * b
    longest = min(srv.max_tokens, shape.context)
    parts = {
        "base_weights": weight_bytes(shape, b, srv.quantization, kbit_fp32=False),
        "adapters": srv.adapters * 4 * lora_params(shape, srv.lora_r, list(srv.targets)),
    }
    parts["kv_cache"] = 2 * srv.max_tokens * per_token  # grown by doubling
    buckets = graph_buckets(srv.max_rows, longest, srv.max_tokens) if srv.graphs else []
    if buckets:
        pool = max(r * c for r, c in buckets)
        parts["kv_graph_pool"] = pool * per_token
        parts["cuda_graph_pools"] = sum(pool_bytes(decode_step_live(shape, r, c, b)) for r, c in buckets)
    else:
        parts["kv_joining"] = srv.max_tokens * per_token  # a joining request's batch, stacked anew
    parts["prefix_cache"] = srv.prefix_tokens * per_token
    parts["prefill"] = prefill_work(shape, min(srv.prefill_chunk, longest), longest, b)
    return parts, len(buckets)
