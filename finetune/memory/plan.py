"""Will LoRA training or serving fit on this GPU, and with which settings? (`python -m finetune plan`:
memory/cli.py)

From a model's config.json alone (no weights, no GPU) the planner estimates the peak memory of a
LoRA training step and of the server (the byte counts and their reasons are in footprint.py), adds
the CUDA context and a safety margin, and compares the sum with the GPU's memory.

`auto` settings take the fastest that fit, in this order: the compute dtype without gradient
checkpointing; with it; 4-bit (QLoRA) with it. When none fits, the plan says what the smallest
needs and points at multi-GPU training (torchrun with FSDP: the base weights, LoRA weights and
optimizer state divided among the GPUs). With world_size > 1 the strategy is DDP when the whole
model fits each GPU, else FSDP. Explicit settings are honoured; their plan may then not fit, and
its reason says by how much.

    plan = plan_training(config, gpu_memory="24GiB", micro_batch_size=4, cutoff_len=256, lora_r=8,
                         lora_target_modules=["all-linear"])
    plan.fits, plan.settings["gradient_checkpointing"], plan.table()"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import DataConfig, LoraSettings, TrainConfig, field_default, parse_list
from . import footprint as fp
from .footprint import PlanError, Shape

GIB = 1 << 30
MARGIN = 0.10  # of the estimated tensors: allocator fragmentation, what the estimate misses
CUDA_CONTEXT = 768 << 20  # the CUDA context, kernels and cuBLAS workspaces, outside torch's allocator counts
NCCL_BUFFERS = 512 << 20  # NCCL's communicator buffers per GPU under torchrun
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
UNITS |= {"t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
UNITS |= {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
QUANTIZATIONS = ("auto", "none", "8bit", "4bit")
DTYPES = ("auto", "bfloat16", "float16", "float32")
STRATEGIES = ("auto", "ddp", "fsdp")
DEFAULT_MICRO_BATCH = field_default(TrainConfig, "micro_batch_size")
DEFAULT_CUTOFF = field_default(DataConfig, "cutoff_len")
DEFAULT_R = field_default(LoraSettings, "lora_r")
DEFAULT_TARGETS = tuple(field_default(LoraSettings, "lora_target_modules"))
DEFAULT_DROPOUT = field_default(LoraSettings, "lora_dropout")


def parse_memory(value: int | str | None, flag: str = "--gpu_memory") -> int | None:
    """Bytes from an int or a string such as "24GiB", "24GB", "80G", "81920MiB" (GB = 10^9 B,
    GiB = 2^30 B; a card sold as 24 GB has 24 GiB). None stays None: no limit."""
    if value is None or isinstance(value, int):
        if isinstance(value, int) and value <= 0:
            raise PlanError(f"{flag} {value}: use a positive size such as 24GiB")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"{flag} {value!r}: not a memory size; write it like 24GiB, 24GB, 80G or 81920MiB")
    return int(float(match.group(1)) * UNITS[unit])


def load_config(source: Any) -> Any:
    """A transformers config from a config object, a model folder, a config.json path or a hub id."""
    if not isinstance(source, str | Path):
        return source
    from transformers import AutoConfig

    path = Path(source).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if file.is_file():
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PlanError(f"--base_model {source}: {file} is not readable JSON ({exc})") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise PlanError(
                f"--base_model {source}: {file} has no model_type; it is not a transformers config"
            )
        missing = [f for f in fp.REQUIRED_FIELDS if f not in raw]
        if missing:
            raise PlanError(f"--base_model {source}: {file} lacks {', '.join(missing)}")
        try:
            return AutoConfig.for_model(**raw)
        except (ValueError, KeyError) as exc:
            raise PlanError(f"--base_model {source}: {exc}") from None
    if path.is_dir() or path.suffix == ".json" or str(source).startswith((".", "/", "~")):
        raise PlanError(f"--base_model {source}: no such model folder or config.json")
    try:  # a hub id: AutoConfig fetches its config.json
        return AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise PlanError(
            f"--base_model {source}: not a local folder, and its config could not be fetched ({exc})"
        ) from None


@dataclass
class Plan:
    """A verdict with its numbers: `peak_bytes` is the estimated peak of torch's allocated tensors
    (what torch.cuda.max_memory_allocated reports); `required_bytes` adds the CUDA context and the
    margin and is what must be free; `parts` adds up to `required_bytes`."""

    kind: str
    fits: bool
    peak_bytes: int
    required_bytes: int
    gpu_memory: int | None
    parts: dict[str, int]
    settings: dict[str, Any]
    reason: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The plan as aligned text: settings, parts in GiB, the verdict."""
        width = max(len(k) for k in [*self.parts, "required", "gpu memory"]) + 2
        shown = {k: ",".join(v) if isinstance(v, list) else v for k, v in self.settings.items()}
        lines = [f"{self.kind}: " + ", ".join(f"{k} {v}" for k, v in shown.items())]
        lines += [f"  {k:<{width}}{v / GIB:>9.2f} GiB" for k, v in self.parts.items()]
        lines.append(f"  {'-' * (width + 13)}")
        lines.append(f"  {'required':<{width}}{self.required_bytes / GIB:>9.2f} GiB")
        memory = "no limit" if self.gpu_memory is None else f"{self.gpu_memory / GIB:.2f} GiB"
        lines.append(f"  {'gpu memory':<{width}}{memory:>13}")
        lines.append(f"  {'fits' if self.fits else 'does not fit'}: {self.reason}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _overhead(tensors: int, device: str, world_size: int) -> dict[str, int]:
    """What a GPU needs beside the tensors: the margin and the CUDA context (NCCL's too under torchrun)."""
    out = {"margin": int(tensors * MARGIN)}
    if device == "cuda":
        out["cuda_context"] = CUDA_CONTEXT + (NCCL_BUFFERS if world_size > 1 else 0)
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


# -- training ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One setting the planner weighs: how the base is stored and whether activations are recomputed."""

    quantization: str  # none | 8bit | 4bit
    checkpointing: bool

    def describe(self, dtype: str) -> str:
        base = {"none": dtype, "8bit": "8-bit", "4bit": "4-bit (QLoRA)"}[self.quantization]
        return f"{base} {'with' if self.checkpointing else 'without'} gradient checkpointing"


def candidates(quantization: str, checkpointing: str | bool) -> list[Candidate]:
    """The settings `auto` tries, fastest first; explicit settings narrow the list."""
    if quantization == "auto" and checkpointing == "auto":
        return [Candidate("none", False), Candidate("none", True), Candidate("4bit", True)]
    if quantization == "auto":
        return [Candidate("none", bool(checkpointing)), Candidate("4bit", bool(checkpointing))]
    if checkpointing == "auto":
        return [Candidate(quantization, False), Candidate(quantization, True)]
    return [Candidate(quantization, bool(checkpointing))]


@dataclass(frozen=True)
class TrainingAsk:
    """What stays fixed while the planner weighs settings: the model, the GPU, the data and the LoRA."""

    shape: Shape
    memory: int | None
    dtype: str
    device: str
    micro_batch_size: int
    cutoff_len: int
    lora_r: int
    targets: tuple[str, ...]
    dropout: float
    world_size: int
    strategy: str  # single (one GPU), ddp or fsdp

    def plan(self, c: Candidate) -> Plan:
        step = fp.Step(
            tokens=self.micro_batch_size * self.cutoff_len,
            act_bytes=4 if c.quantization != "none" else fp.DTYPE_BYTES[self.dtype],
            r=self.lora_r,
            targets=self.targets,
            dropout=self.dropout,
            mask_bytes=1 if self.device == "cuda" else 4,
            quantization=c.quantization,
        )
        parts = fp.training_parts(
            self.shape, c.checkpointing, fp.DTYPE_BYTES[self.dtype], step, self.world_size, self.strategy
        )
        peak = sum(parts.values())
        parts |= _overhead(peak, self.device, self.world_size)
        required = sum(parts.values())
        settings = {
            "dtype": self.dtype,
            "quantization": c.quantization,
            "gradient_checkpointing": c.checkpointing,
            "micro_batch_size": self.micro_batch_size,
            "cutoff_len": self.cutoff_len,
            "lora_r": self.lora_r,
            "lora_target_modules": list(self.targets),
            "world_size": self.world_size,
            "strategy": self.strategy,
        }
        fits = self.memory is None or required <= self.memory
        return Plan("training", fits, peak, required, self.memory, parts, settings, "")

    def search(self, quantization: str, checkpointing: str | bool) -> Plan:
        """The first candidate that fits, its reason naming the faster ones that did not; else the
        last (smallest) one, not fitting."""
        skipped: list[str] = []
        for c in candidates(quantization, checkpointing):
            plan = self.plan(c)
            what = c.describe(self.dtype)
            if plan.fits:
                limit = "no memory limit" if self.memory is None else f"{_gib(self.memory)} given"
                plan.reason = "; ".join([f"{what} needs {_gib(plan.required_bytes)} ({limit})", *skipped])
                return plan
            skipped.append(f"{what} would need {_gib(plan.required_bytes)}")
        assert self.memory is not None
        over = plan.required_bytes - self.memory
        plan.reason = (
            f"{what} needs {_gib(plan.required_bytes)}, {_gib(over)} more than the {_gib(self.memory)} given"
        )
        return plan


def chosen(plan: Plan) -> Candidate:
    return Candidate(plan.settings["quantization"], plan.settings["gradient_checkpointing"])


def _way_out(ask: TrainingAsk, plan: Plan, auto: bool) -> str:
    """What would fit instead of a plan that does not: the auto settings (after explicit ones), a
    micro-batch of one, FSDP over several GPUs."""
    if not auto:
        alternative = ask.search("auto", "auto")
        if alternative.fits:
            return f". With quantization and gradient_checkpointing auto it fits: {chosen(alternative).describe(ask.dtype)}"
    out = ""
    if auto:
        where = "on one GPU" if ask.world_size == 1 else f"on {ask.world_size} GPUs"
        out = f". Nothing fits {where}: the smallest setting is {chosen(plan).describe(ask.dtype)}"
    if ask.micro_batch_size > 1:
        one = replace(ask, micro_batch_size=1).plan(chosen(plan))
        verdict = "fits" if one.fits else "does not fit either"
        out += (
            f". micro_batch_size 1 (batch_size kept through gradient accumulation) needs "
            f"{_gib(one.required_bytes)} and {verdict}"
        )
    for n in (2, 4, 8):
        if n <= ask.world_size:
            continue
        sharded = replace(ask, world_size=n, strategy="fsdp").search("auto", "auto")
        if sharded.fits or n == 8:
            verdict = "fits" if sharded.fits else "still does not fit"
            return out + (
                f". Multi-GPU: on {n} GPUs under torchrun (torchrun --nproc_per_node {n}; plan it with "
                f"--world_size {n}), FSDP sharding the model: {chosen(sharded).describe(ask.dtype)} {verdict}, "
                f"{_gib(sharded.required_bytes)} per GPU"
            )
    return out


def _search_strategies(ask: TrainingAsk, quantization: str, checkpointing: str | bool) -> Plan:
    """Over several GPUs with strategy auto: DDP when the whole model fits each GPU (it only
    all-reduces LoRA gradients), else FSDP (it gathers every layer's weights twice a step)."""
    ddp = replace(ask, strategy="ddp").search(quantization, checkpointing)
    if ddp.fits or quantization == "8bit":  # 8-bit cannot be sharded (distributed.check_strategy)
        return ddp
    fsdp = replace(ask, strategy="fsdp").search(quantization, checkpointing)
    fsdp.reason += f"; whole on each GPU (ddp) it would need {_gib(ddp.required_bytes)}"
    return fsdp


def _targets(shape: Shape, names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """LoRA target names as a tuple ("q_proj,v_proj" too), checked against the model's layers."""
    targets = tuple(parse_list(names) if isinstance(names, str) else names)
    fp.adapted(shape, list(targets))  # unknown names fail before any arithmetic
    return targets


def _check_args(values: dict[str, Any], dtype: str, quantization: str, checkpointing: Any) -> None:
    """The flags a training or serving plan takes, each named as the command spells it."""
    for name, value in values.items():
        if type(value) is not int or value < 1:
            raise PlanError(f"--{name} {value!r}: use a whole number >= 1")
    if dtype not in DTYPES:
        raise PlanError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if quantization not in QUANTIZATIONS:
        raise PlanError(f"--quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    if checkpointing not in ("auto", True, False):
        raise PlanError(f"--gradient_checkpointing {checkpointing!r}: use auto, true or false")


def plan_training(
    config: Any,
    *,
    gpu_memory: int | str | None = None,
    micro_batch_size: int = DEFAULT_MICRO_BATCH,
    cutoff_len: int = DEFAULT_CUTOFF,
    lora_r: int = DEFAULT_R,
    lora_target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    lora_dropout: float = DEFAULT_DROPOUT,
    dtype: str = "auto",
    quantization: str = "auto",
    gradient_checkpointing: str | bool = "auto",
    world_size: int = 1,
    strategy: str = "auto",
    device: str = "cuda",
) -> Plan:
    """Will a LoRA training step fit in `gpu_memory` (bytes or "24GiB"; None: no limit)?

    `config`: a transformers config, a model folder, a config.json path or a hub id. `auto`
    quantization and gradient_checkpointing pick the fastest setting that fits (module docstring);
    dtype auto is bfloat16 on a GPU (a GPU without bf16 trains in float32), float32 on a CPU.
    world_size > 1 plans torchrun's processes, one GPU each: `strategy` ddp (the whole model on each),
    fsdp (sharded) or auto (ddp when it fits, else fsdp). `device="cpu"` plans a CPU run (float dropout masks,
    no CUDA context) with the weights in `dtype` (the CPU trainer's bf16 autocast is not modelled)."""
    memory = parse_memory(gpu_memory)
    sizes = {
        "micro_batch_size": micro_batch_size,
        "cutoff_len": cutoff_len,
        "lora_r": lora_r,
        "world_size": world_size,
    }
    _check_args(sizes, dtype, quantization, gradient_checkpointing)
    _check_strategy(strategy, quantization, world_size)
    shape = Shape.from_config(load_config(config))
    targets = _targets(shape, lora_target_modules)
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    ask = TrainingAsk(
        shape,
        memory,
        dtype,
        device,
        micro_batch_size,
        cutoff_len,
        lora_r,
        targets,
        lora_dropout,
        world_size,
        "single" if world_size == 1 else strategy,
    )
    return _training_plan(ask, quantization, gradient_checkpointing)


def _check_strategy(strategy: str, quantization: str, world_size: int) -> None:
    if strategy not in STRATEGIES:
        raise PlanError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and quantization == "8bit" and world_size > 1:
        raise PlanError("--quantization 8bit cannot be sharded with --strategy fsdp; use 4bit, or ddp")


def _training_plan(ask: TrainingAsk, quantization: str, checkpointing: str | bool) -> Plan:
    """The plan for `ask`, over the strategies when it leaves them to auto; one that does not fit
    says what would, and an FSDP one what it divides."""
    if ask.strategy == "auto":
        plan = _search_strategies(ask, quantization, checkpointing)
    else:
        plan = ask.search(quantization, checkpointing)
    if not plan.fits:
        plan.reason += _way_out(
            replace(ask, strategy=plan.settings["strategy"]),
            plan,
            auto=quantization == "auto" and checkpointing == "auto",
        )
    if plan.settings["strategy"] == "fsdp":
        plan.notes.append(
            f"strategy fsdp: base weights, LoRA weights and optimizer state divided among {ask.world_size} GPUs"
        )
    return plan


# -- serving ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingAsk:
    """A server's shape: the model, the GPU and the engine's limits (footprint.Server)."""

    shape: Shape
    memory: int | None
    dtype: str
    device: str
    server: fp.Server

    def plan(self) -> Plan:
        srv = self.server
        parts, graphs = fp.serving_parts(self.shape, srv)
        peak = sum(parts.values())
        parts |= _overhead(peak, self.device, 1)
        required = sum(parts.values())
        longest = min(srv.max_tokens, self.shape.context)
        settings = {
            "dtype": self.dtype,
            "quantization": srv.quantization,
            "max_rows": srv.max_rows,
            "max_tokens": srv.max_tokens,
            "longest_row": longest,
            "cuda_graphs": srv.graphs,
            "graphs_captured": graphs,
            "adapters": srv.adapters,
            "strategy": "single",
        }
        fits = self.memory is None or required <= self.memory
        plan = Plan("serving", fits, peak, required, self.memory, parts, settings, "")
        if self.memory is None or fits:
            limit = "no memory limit" if self.memory is None else f"{_gib(self.memory)} given"
            plan.reason = f"needs {_gib(required)} ({limit})"
        else:
            plan.reason = f"needs {_gib(required)}, {_gib(required - self.memory)} more than the {_gib(self.memory)} given"
        return plan

    def but(self, **changes: Any) -> ServingAsk:
        return replace(self, server=replace(self.server, **changes))


def plan_for_config(
    cfg: TrainConfig, base_path: str, device_type: str, gpu_memory: int | None, world_size: int
) -> Plan:
    """The plan a training run starts with: cfg's settings (auto where unset) against the GPU's total
    memory (the plan counts the CUDA context itself), or no limit on a CPU."""
    checkpointing = "auto" if cfg.gradient_checkpointing is None else cfg.gradient_checkpointing
    return plan_training(
        base_path,
        gpu_memory=gpu_memory if device_type == "cuda" else None,
        micro_batch_size=cfg.micro_batch_size,
        cutoff_len=cfg.data.cutoff_len,
        lora_r=cfg.lora.lora_r,
        lora_target_modules=cfg.lora.lora_target_modules,
        lora_dropout=cfg.lora.lora_dropout,
        dtype=cfg.dtype,
        quantization=cfg.quantization if device_type == "cuda" or cfg.quantization != "auto" else "none",
        gradient_checkpointing=checkpointing,
        world_size=world_size,
        device="cuda" if device_type == "cuda" else "cpu",
    )


def _serving_way_out(ask: ServingAsk, plan: Plan) -> str:
    """Server settings that would fit instead: fewer rows, a smaller KV budget, no CUDA graphs."""
    from ..settings import COMPILE_ENV, KV_TOKENS_ENV, MAX_BATCH_ENV

    tips = []
    rows = ask.server.max_rows // 2
    while rows >= 1 and not ask.but(max_rows=rows).plan().fits:
        rows //= 2
    if rows >= 1:
        tips.append(f"{MAX_BATCH_ENV}={rows} fits")
    if plan.settings["cuda_graphs"] and ask.but(graphs=False).plan().fits:
        tips.append(f"{COMPILE_ENV}=off (no CUDA graphs) fits")
    tokens = ask.server.max_tokens // 2
    while tokens >= 64 and not ask.but(max_tokens=tokens).plan().fits:
        tokens //= 2
    if tokens >= 64:
        tips.append(f"{KV_TOKENS_ENV}={tokens} fits")
    return (
        ": " + "; ".join(tips)
        if tips
        else ": even one row and a small KV budget do not fit; quantize or take a bigger GPU"
    )


def plan_serving(
    config: Any,
    *,
    gpu_memory: int | str | None = None,
    max_rows: int | None = None,
    max_tokens: int | None = None,
    quantization: str = "auto",
    dtype: str = "auto",
    adapters: int = 4,
    lora_r: int = DEFAULT_R,
    lora_target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    cuda_graphs: bool = True,
    device: str = "cuda",
) -> Plan:
    """Will the server (serving.ModelServer) fit in `gpu_memory`?

    `max_rows`: requests decoded together (MAX_BATCH_SIZE; default the engine's). `max_tokens`: the
    KV cache budget in token slots, rows x padded length (KV_CACHE_TOKENS); default what the server
    takes itself, a quarter of the memory left after the weights, at most max_rows full contexts. The
    longest row is min(max_tokens, the model's context). `quantization`: auto and none keep the
    weights in `dtype` (auto: bfloat16 on a GPU); 8bit / 4bit plan a bitsandbytes base (SERVE_QUANT
    bnb8 / bnb4). `adapters`: LoRA adapters held at once (ADAPTER_CACHE_SIZE) of rank `lora_r`."""
    from ..engine.scheduler import EngineLimits

    memory = parse_memory(gpu_memory)
    limits = EngineLimits()
    max_rows = limits.max_batch if max_rows is None else max_rows
    sizes = {"serve_rows": max_rows, "serve_tokens": max_tokens or 1, "lora_r": lora_r}
    _check_args(sizes, dtype, quantization, "auto")
    shape = Shape.from_config(load_config(config))
    targets = _targets(shape, lora_target_modules)
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    quantization = "none" if quantization == "auto" else quantization
    if max_tokens is None:
        max_tokens = _default_kv_tokens(shape, memory, dtype, quantization, device, max_rows)
    server = fp.Server(
        dtype_bytes=fp.DTYPE_BYTES[dtype],
        quantization=quantization,
        max_rows=max_rows,
        max_tokens=max_tokens,
        adapters=adapters,
        lora_r=lora_r,
        targets=targets,
        prefill_chunk=limits.prefill_chunk,
        prefix_tokens=limits.prefix_tokens,
        # Graphs cover plain torch Linear layers only (cuda_graphs.py): a bitsandbytes base decodes eagerly.
        graphs=cuda_graphs and device == "cuda" and quantization == "none",
    )
    ask = ServingAsk(shape, memory, dtype, device, server)
    plan = ask.plan()
    if not plan.fits:
        plan.reason += _serving_way_out(ask, plan)
    return plan


def _default_kv_tokens(
    shape: Shape, memory: int | None, dtype: str, quantization: str, device: str, max_rows: int
) -> int:
    """The KV cache budget a server takes itself (serving.engine_limits): its share of the memory
    left after the weights, at most max_rows full contexts."""
    from ..engine.scheduler import KV_MEMORY_SHARE

    per_token = shape.kv_elements_per_token * fp.DTYPE_BYTES[dtype]
    full = max_rows * shape.context
    if memory is None:
        return full
    weights = fp.weight_bytes(shape, fp.DTYPE_BYTES[dtype], quantization, kbit_fp32=False)
    free = max(memory - weights - (CUDA_CONTEXT if device == "cuda" else 0), 0)
    return max(1, min(int(free * KV_MEMORY_SHARE) // per_token, full))


def largest_kv_budget(
    config: Any, *, gpu_memory: int | str, max_rows: int | None = None, **options: Any
) -> int:
    """The largest KV budget (KV_CACHE_TOKENS, token slots) with which plan_serving fits, 0 when
    not even 64 slots do: what a server can take on this GPU with every allowance of its plan.
    `options` are plan_serving's (quantization, dtype, adapters, cuda_graphs, ...)."""
    low, high = 0, 1 << 24  # beyond any context a server holds
    while high - low > 1:  # fits(low) or low == 0, not fits(high)
        middle = (low + high) // 2
        plan = plan_serving(config, gpu_memory=gpu_memory, max_rows=max_rows, max_tokens=middle, **options)
        low, high = (middle, high) if plan.fits else (low, middle)
    return low if low >= 64 else 0


def serving_quantization(
    config: Any, *, gpu_memory: int | str, max_rows: int | None = None, min_tokens: int = 4096, **options: Any
) -> str:
    """SERVE_QUANT=auto on a GPU: none while the base in its dtype leaves a KV budget of at least
    `min_tokens` slots (capped at the model's context), else bnb8, else bnb4; a model that fits
    none of them raises PlanError with the 4-bit plan's reason. `options` as plan_serving's."""
    config = load_config(config)
    need = min(min_tokens, Shape.from_config(config).context)
    for quantization, mode in (("none", "none"), ("8bit", "bnb8"), ("4bit", "bnb4")):
        if quantization != "none":
            options["cuda_graphs"] = False  # a bitsandbytes base decodes eagerly (server.py)
        budget = largest_kv_budget(
            config, gpu_memory=gpu_memory, max_rows=max_rows, quantization=quantization, **options
        )
        if budget >= need:
            return mode
    plan = plan_serving(
        config, gpu_memory=gpu_memory, max_rows=max_rows, max_tokens=need, quantization="4bit", **options
    )
    raise PlanError(
        f"this GPU cannot serve the model even in 4-bit with a {need}-token KV cache: {plan.reason}"
    )
