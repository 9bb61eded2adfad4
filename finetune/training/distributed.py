"""Distributed set-up: this process's place among the training processes (torchrun's RANK,
LOCAL_RANK and WORLD_SIZE: facts torchrun gives each process, read here, not settings), where it
computes, and how the model is spread over the processes.

Two strategies, TRAIN_STRATEGY (TrainSettings.strategy: ddp, fsdp, or auto: the memory plan's
choice, ddp while the whole model fits each GPU):

* ddp: every process holds the whole model; DistributedDataParallel averages the gradients.
* fsdp: FSDP2 (`fully_shard`) keeps 1/world_size of every weight per process, frozen base and
  trainable LoRA alike, and gathers a decoder layer's weights only while it runs. A model too big
  for one GPU trains on several.

Under fsdp the LoRA weights are DTensor shards, so whatever reads or writes them whole (adapter,
checkpoint, the best evaluation's copy) goes through `whole_lora`, `lora_state` and
`load_lora_state` here, on every process at once: each gather is a collective."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError
from ..model.loading import ModelError, Precision
from ..settings import STRATEGIES, STRATEGY_ENV

AUTO_STRATEGY = "ddp"  # where no memory plan decides (one process, or a plan without a strategy)


@dataclass
class Dist:
    """This process's place among the training processes (one, without torch.distributed)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)


SHUTDOWN_WAIT_S = 60  # for the other ranks to end their teardown; then leave anyway


def shutdown() -> None:
    """End this process's part in the process group, all ranks together: a rank that leaves while
    another is still in gloo's teardown can make that one abort ("terminate called without an
    active exception", exit -6) after a run that finished, so torchrun reports it failed. A barrier
    before the teardown was not enough (seen once more after an early stop under FSDP): each rank
    also waits, after its own teardown, until every rank has finished theirs, counting on the
    rendezvous store, which lives outside the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    from torch.distributed import distributed_c10d

    store, world = distributed_c10d._get_default_store(), dist.get_world_size()
    key = f"finetune/shutdown/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    dist.barrier()
    dist.destroy_process_group()
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    try:
        store.add(key, 1)
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except RuntimeError:  # the store went with a rank that had seen them all finish (DistStoreError)
        pass


@dataclass
class Placement:
    """Where this process computes, among how many, in which precision, and how the model is
    spread over the processes (`strategy`, which matters only with more than one)."""

    device: torch.device
    dist: Dist
    precision: Precision
    autocast: Callable[[], Any]
    strategy: str = AUTO_STRATEGY
    memory: Any = None  # the memory plan (plan.Plan) the run's settings came from

    @property
    def sharded(self) -> bool:
        """Whether the weights are FSDP shards, so that reading them whole takes every process."""
        return self.strategy == "fsdp" and self.dist.world_size > 1


def check_strategy(strategy: str, quantization: str) -> None:
    """Settings a strategy cannot train, refused before any model loads."""
    if strategy == "fsdp" and quantization == "8bit":
        raise ConfigError(
            f"quantization 8bit cannot be sharded ({STRATEGY_ENV}=fsdp): bitsandbytes keeps the LLM.int8 "
            "scales on the weight tensor, which FSDP replaces with a gathered one; use quantization 4bit, "
            f"or {STRATEGY_ENV}=ddp"
        )


def wrap_for_training(loss_fn: torch.nn.Module, place: Placement, strategy: str) -> torch.nn.Module:
    """The module the training steps call. `loss_fn` holds the model as `.model` (TokenLoss) or is
    the model. One process: as it is. ddp: inside DistributedDataParallel. fsdp: the model it holds
    is sharded in place (`shard_model`) and `loss_fn` comes back as it was. `place.strategy` must
    be the same one: the trainer reads it (Placement.sharded) to gather sharded weights."""
    if place.dist.world_size == 1:
        return loss_fn
    if strategy != place.strategy:
        raise ValueError(f"strategy {strategy!r} differs from the placement's {place.strategy!r}")
    if strategy == "ddp":
        return DistributedDataParallel(
            loss_fn, device_ids=[place.device.index] if place.device.type == "cuda" else None
        )
    if strategy == "fsdp":
        shard_model(getattr(loss_fn, "model", loss_fn), place)
        return loss_fn
    raise ValueError(f"unknown training strategy {strategy!r}; expected one of {STRATEGIES}")


def mixed_precision(place: Placement) -> Any:
    """bf16 weights gathered for compute and fp32 gradient reduction on a bf16 GPU; elsewhere (gloo
    on CPUs) no casting: the weights are gathered and reduced as they are stored."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if place.device.type == "cuda" and place.precision.compute == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, place: Placement) -> None:
    """FSDP2 over a (PEFT) causal LM: one unit per decoder layer (its frozen base weights and its
    LoRA weights together), one for the weights outside the layers (embeddings, final norm, head:
    tied ones must share a unit), then the root."""
    from torch.distributed.fsdp import fully_shard

    policy = mixed_precision(place)
    check_quantized(model, policy.param_dtype)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    rest = outside_layers(model, set(layers))
    if rest:
        fully_shard(rest, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # FSDP2 takes as its root the first unit whose forward runs. The loss calls the decoder and the
    # head directly, past the root's forward: one token through the whole model makes the root the
    # root. The RNG is put back after it, as dropout draws from it.
    cuda = [place.device.index or 0] if place.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=place.device), use_cache=False)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks a transformers model names as never to be split across devices."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ModelError(
            f"{type(base).__name__} names no decoder layer class to shard (_no_split_modules); "
            f"train it with {STRATEGY_ENV}=ddp"
        )
    return layers


def outside_layers(module: torch.nn.Module, layers: set[torch.nn.Module]) -> list[torch.nn.Module]:
    """The largest submodules holding weights that no decoder layer holds."""
    found = []
    for child in module.children():
        if child in layers:
            continue
        if not any(m in layers for m in child.modules()):
            if next(child.parameters(), None) is not None:
                found.append(child)
            continue
        if next(child.parameters(recurse=False), None) is not None:
            found.append(child)
        found += outside_layers(child, layers)
    return found


def check_quantized(model: torch.nn.Module, param_dtype: torch.dtype | None) -> None:
    """bitsandbytes weights FSDP can shard. 4-bit: packed bytes in a storage dtype, with their
    quantization state kept on the layer too (bitsandbytes puts it back on the gathered weight).
    FSDP casts floating-point weights to the gathering dtype, which would turn the bytes into
    numbers: the storage must be that dtype (bnb_4bit_quant_storage = the compute dtype) or an
    integer type (the default uint8), which FSDP never casts. 8-bit: see check_strategy."""
    for name, param in model.named_parameters():
        if type(param).__name__ == "Int8Params":
            check_strategy("fsdp", "8bit")
        if getattr(param, "quant_state", None) is None or param_dtype is None:
            continue
        if param.dtype.is_floating_point and param.dtype != param_dtype:
            raise ModelError(
                f"{name} holds 4-bit weights stored as {param.dtype}, which FSDP would cast to "
                f"{param_dtype}; load the model with bnb_4bit_quant_storage={param_dtype} (the compute "
                f"dtype) or train with {STRATEGY_ENV}=ddp"
            )


def skip_grad_sync(loss_fn: torch.nn.Module) -> AbstractContextManager[Any]:
    """For a micro-batch before the step's last: gradients accumulate on each process and are
    reduced once, with the last one's."""
    if isinstance(loss_fn, DistributedDataParallel):
        return loss_fn.no_sync()
    root = getattr(loss_fn, "model", loss_fn)
    if _is_fsdp(root):
        return _fsdp_no_sync(root)
    return nullcontext()


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def _fsdp_no_sync(root: Any) -> Iterator[None]:
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def clip_grad_norm(parameters: Any, max_norm: float) -> float:
    """Clip the gradients to `max_norm` (0: leave them) and return their norm over every process.
    Under FSDP the gradients are shards and torch's norm a DTensor: the float is the full norm."""
    params = list(parameters)
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


@contextmanager
def whole_lora(model: torch.nn.Module) -> Iterator[None]:
    """Inside: every sharded trainable (LoRA) weight registered whole on each process, so that PEFT
    saves the adapter as it does without FSDP; the frozen base stays sharded. Every process must
    enter (the gathers are collectives); nothing may run the model or load weights inside. Without
    FSDP, nothing changes."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor) and param.requires_grad:
                module.register_parameter(name, torch.nn.Parameter(param.full_tensor(), requires_grad=False))
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, shard in swapped:
            module.register_parameter(name, shard)


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights as PEFT names them, whole, copied to the CPU (under FSDP on every
    process, which every process must call: each weight is gathered from its shards)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().to("cpu", copy=True)
        for k, v in get_peft_model_state_dict(model).items()
    }


@torch.no_grad()
def load_lora_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Whole adapter weights (as `lora_state` gives them) into the model, sharded or not: each
    process copies its own slice into its shard, so no data moves."""
    from peft.utils import get_peft_model_state_dict

    # PEFT's names for the parameters themselves (keep_vars), not for copies of them. Not through
    # load_state_dict: FSDP's hook after it re-reads every shard, which a plain copy leaves alone.
    targets = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True))
    if targets.keys() != state.keys():
        missing, extra = sorted(targets.keys() - state.keys()), sorted(state.keys() - targets.keys())
        raise ModelError(
            f"the saved adapter weights do not fit this model: missing {missing[:3]}, unexpected "
            f"{extra[:3]}; resume only from a checkpoint of this run"
        )
    params = {id(p) for p in model.parameters()}
    for key, target in targets.items():
        assert id(target) in params, f"{key} is not a parameter of the model"
        value = state[key].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)


def optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
) -> dict[str, Any]:
    """What optimizer.state_dict() gives in one process, whatever the strategy: parameters by
    position, whole tensors. Sharded: gathered onto the CPU of process 0 (the others get {}), which
    every process must call; so an FSDP checkpoint resumes on one process and the reverse."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]],
    }


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool
) -> None:
    """optimizer.load_state_dict for the state `optimizer_state` gives; sharded, each process keeps
    its shard of every whole tensor (each one has read the checkpoint)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _trainable_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order its state dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def same_as_main(flag: bool, place: Placement) -> bool:
    """Process 0's value on every process: a choice that leads into a collective (a gather, an
    FSDP forward) must be made alike everywhere."""
    if place.dist.world_size == 1:
        return flag
    value = torch.tensor([int(flag)], device=place.device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


def all_ranks(obj: Any, dist: Dist) -> list[Any]:
    """Every process's `obj` (picklable), by rank, on every process."""
    if dist.world_size == 1:
        return [obj]
    out: list[Any] = [None] * dist.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def figures_as_main(entry: dict[str, float], place: Placement) -> dict[str, float]:
    """Process 0's evaluation figures on every process (see same_as_main); the step stays as is."""
    if place.dist.world_size == 1:
        return entry
    keys = sorted(k for k in entry if k != "step")
    values = torch.tensor([float(entry[k]) for k in keys], dtype=torch.float64, device=place.device)
    torch.distributed.broadcast(values, src=0)
    return {**entry, **dict(zip(keys, values.tolist(), strict=True))}
