"""The training loop: dataset file -> verified LoRA adapter folder with a training card.

Our own loop rather than HF Trainer: it packs examples without padding, normalises the loss by
the number of trained tokens across gradient accumulation and ranks, runs bf16 autocast on CPUs
that have it, and checkpoints everything needed to resume bit-for-bit (model, optimizer, schedule,
RNG; the data order is a pure function of seed and step)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__, prompts
from .artifacts import save_adapter
from .batching import iter_collated, micro_batches
from .config import TrainConfig
from .encoding import IGNORE_INDEX, Encoded, encode_example
from .modeling import (
    ModelError,
    base_identity,
    load_for_training,
    load_tokenizer,
    pick_device,
    pick_precision,
)
from .records import Record, dataset_fingerprint, read_records, split_records
from .weights import resolve_base_model

CHECKPOINT_PREFIX = "checkpoint-"
AUTO_EPOCHS = 3  # num_epochs=auto: alpaca-lora's three passes for datasets large enough
MAX_AUTO_EPOCHS = 20  # min_steps never makes a run go over the data more often than this


def plan_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, str]:
    """Optimizer steps for the run and a line saying where the number came from. Only num_epochs=auto
    is adjusted to the data: an explicit epoch or step count is exact."""
    if cfg.max_steps:
        return cfg.max_steps, f"max_steps={cfg.max_steps}"
    if cfg.num_epochs is not None:
        return max(1, math.ceil(cfg.num_epochs * steps_per_epoch)), f"num_epochs={cfg.num_epochs:g}"
    steps = math.ceil(AUTO_EPOCHS * steps_per_epoch)
    if steps >= cfg.min_steps:
        return steps, f"num_epochs=auto: {AUTO_EPOCHS} epochs of {steps_per_epoch} steps"
    # A few dozen records give a handful of steps per epoch: too few to learn anything.
    steps = min(cfg.min_steps, math.ceil(MAX_AUTO_EPOCHS * steps_per_epoch))
    return steps, (
        f"num_epochs=auto: {AUTO_EPOCHS} epochs would be {math.ceil(AUTO_EPOCHS * steps_per_epoch)} steps, "
        f"raised to min_steps={cfg.min_steps} (at most {MAX_AUTO_EPOCHS} epochs): "
        f"{steps / steps_per_epoch:.1f} epochs"
    )


class TrainingStopped(Exception):
    """Training was asked to stop (SIGTERM); the last checkpoint holds the progress."""


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainResult:
    adapter_dir: Path
    card: dict[str, Any]
    model: Any = None
    tokenizer: Any = None


@dataclass
class History:
    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    base_val_loss: float | None = None


def init_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=world)


def checkpoint_root(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.parent / f"{out.name}-checkpoints"


RUN_FILE = "run.json"
# Settings that do not change what a step computes: a resumed run may differ in these.
_OUTSIDE_FINGERPRINT = {
    "output_dir",
    "resume_from_checkpoint",
    "save_steps",
    "logging_steps",
    "wandb_project",
    "wandb_run_name",
    "wandb_watch",
    "wandb_log_model",
}


def run_fingerprint(cfg: TrainConfig, data_bytes: bytes) -> dict[str, Any]:
    """What a checkpoint belongs to: the dataset's hash and every setting that shapes the run."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OUTSIDE_FINGERPRINT}
    return {
        "data": dataset_fingerprint(data_bytes),
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def _fingerprint_problem(path: Path, expected: dict[str, Any]) -> str | None:
    run_file = path / RUN_FILE
    if not run_file.is_file():
        return (
            f"{path} does not say which run it belongs to (no {RUN_FILE}); it was not written by this trainer"
        )
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    changed = []
    if saved.get("data") != expected["data"]:
        changed.append("the training data")
    old, new = saved.get("settings", {}), expected["settings"]
    changed += [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return None
    return (
        f"{path} belongs to another run: {', '.join(changed)} changed since it was written. Resume with "
        "the same data and settings, or start a fresh run without --resume_from_checkpoint (old "
        "checkpoints are then moved aside)"
    )


def move_aside_old_checkpoints(output_dir: str | Path) -> Path | None:
    """A fresh run must not share a folder with an older run's checkpoints: pruning would keep the
    older, higher-numbered ones and `--resume_from_checkpoint latest` would pick them."""
    root = checkpoint_root(output_dir)
    if not any(root.glob(f"{CHECKPOINT_PREFIX}*")):
        return None
    aside = root.with_name(f"{root.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    root.rename(aside)
    return aside


def find_checkpoint(cfg: TrainConfig, fingerprint: dict[str, Any]) -> Path | None:
    spec = cfg.resume_from_checkpoint
    if not spec:
        return None
    if spec in {"latest", "true", "True"}:
        found = sorted(checkpoint_root(cfg.output_dir).glob(f"{CHECKPOINT_PREFIX}*"))
        if not found:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_root(cfg.output_dir)} to resume from")
        path = found[-1]
    else:
        path = Path(spec)
    state = path / "trainer_state.pt"
    if not state.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer_state.pt)")
    # A checkpoint folder may have been copied from elsewhere: refuse a bad one before any model
    # loads (weights_only never runs pickled code; the state is LoRA-sized, so reading it twice is cheap).
    try:
        torch.load(state, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{state} was not loaded: it is corrupt or holds pickled objects, which are never unpickled "
            f"({type(exc).__name__}); resume only from a checkpoint this trainer wrote"
        ) from exc
    problem = _fingerprint_problem(path, fingerprint)
    if problem:
        raise ModelError(problem)
    return path


def check_output_writable(output_dir: str | Path, need_bytes: int = 64 << 20) -> None:
    """Fail before any model loads if the adapter could not be written at the end."""
    # A file where the adapter or its checkpoints go would be moved aside by the final rename, or
    # fail the first checkpoint only after training has run.
    for path in (Path(output_dir), checkpoint_root(output_dir)):
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file, not a folder; move it or choose another --output_dir")
    parent = Path(output_dir).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PermissionError(
            f"cannot write to {parent}: {exc.strerror}; choose another --output_dir"
        ) from exc
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OSError(
            f"only {free >> 20} MiB free under {parent}; at least {need_bytes >> 20} MiB are needed"
        )


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def encode_records(
    records: list[Record], tokenizer: Any, template: prompts.PromptTemplate, cfg: TrainConfig
) -> list[Encoded]:
    d = cfg.data
    out = []
    for record in records:
        prompt, response = prompts.split_record(record, template, tokenizer)
        out.append(
            encode_example(prompt, response, tokenizer, d.cutoff_len, d.train_on_inputs, d.add_eos_token)
        )
    return out


# Causal LMs whose logits are exactly lm_head(final hidden state): for these the loss projects only
# the positions that carry a label (others, e.g. Gemma's soft-capping, take the full forward).
LABELED_ONLY_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3"})


def _right_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


class TokenLoss(torch.nn.Module):
    """Summed cross-entropy over trained tokens (labels shift inside), as a module so that DDP wraps
    the whole computation.

    The vocabulary projection runs only at positions that have a label: the prompt and padding
    never need logits (with train_on_inputs=False that is about half the rows of a 49k-wide
    projection). Exact, like token_loss_sum's dropping of a right-padded batch's mask."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
        self.head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        self.labeled_only = (
            getattr(lm.config, "model_type", None) in LABELED_ONLY_MODEL_TYPES
            and self.decoder is not None
            and self.head is not None
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
        targets = labels[:, 1:]
        if self.labeled_only:
            hidden = self.decoder(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
            keep = targets != IGNORE_INDEX
            logits = self.head(hidden[:, :-1][keep])
            targets = targets[keep]
        else:
            logits = self.model(input_ids=input_ids, use_cache=False, **inputs).logits[:, :-1]
            logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device, autocast: Any
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens and their count. `model` is a causal LM (plain or
    PEFT) or a TokenLoss, possibly inside DDP."""
    from torch.nn.parallel import DistributedDataParallel

    loss_fn = model if isinstance(model, TokenLoss | DistributedDataParallel) else TokenLoss(model)
    # Counted and checked on the host, before the copy: no device sync per micro-batch. A
    # right-padded batch needs no mask: under a causal mask no real token can see a pad to its
    # right, and without one SDPA takes its causal kernel instead of a masked one.
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if "attention_mask" in batch and _right_padded(batch["attention_mask"]):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast():
        loss = loss_fn(**batch)
    return loss, n


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    autocast: Any,
    dist: Dist,
) -> float:
    """Mean loss per trained token over the validation split (all ranks together)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensor
    order = [
        list(range(i, min(i + cfg.micro_batch_size, len(examples))))
        for i in range(0, len(examples), cfg.micro_batch_size)
    ]
    for batch in iter_collated(examples, order[dist.rank :: dist.world_size], pad_id, cfg.data.packing):
        loss, n = token_loss_sum(model, batch, device, autocast)
        total[0] += loss.detach()
        total[1] += n
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train()
    loss_sum, count = total.tolist()
    return loss_sum / count if count > 0 else float("nan")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    history: History,
    fingerprint: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Atomic: written to a temporary folder, then renamed; older checkpoints pruned after."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        model.save_pretrained(tmp / "adapter")
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "history": dataclasses.asdict(history),
            },
            tmp / "trainer_state.pt",
        )
        (tmp / RUN_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> tuple[int, History]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter" / "adapter_model.safetensors"))
    # weights_only: a checkpoint folder may have been copied from elsewhere; never unpickle code.
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    history = History(**state["history"])
    return int(state["step"]), history


class _StopFlag:
    """SIGTERM sets a flag; the loop checkpoints at the end of the step and stops cleanly."""

    def __init__(self) -> None:
        self.set = False
        self.previous: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self.previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def log_line(text: str) -> None:
    print(text, flush=True)


def train(
    cfg: TrainConfig,
    on_step: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] = log_line,
) -> TrainResult:
    started = time.time()
    records = read_records(cfg.data.data_path)  # bad data fails here, before any model loads
    data_bytes = Path(cfg.data.data_path).read_bytes()
    train_records, val_records = split_records(records, cfg.data.val_set_size, cfg.seed)
    check_output_writable(cfg.output_dir)
    template = prompts.load_template(cfg.data.prompt_template_name)
    fingerprint = run_fingerprint(cfg, data_bytes)
    checkpoint = find_checkpoint(cfg, fingerprint)

    device = pick_device()
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if checkpoint is None and dist.main:
        aside = move_aside_old_checkpoints(cfg.output_dir)
        if aside is not None:
            log_line(f"a fresh run: the checkpoints of an earlier run were moved to {aside}")
    if cfg.quantization != "none" and device.type != "cuda":
        raise ModelError(
            f"quantization {cfg.quantization} needs a CUDA GPU (bitsandbytes); use quantization none on CPU"
        )
    precision = pick_precision(cfg.dtype, device, training=True)
    if precision.compute == torch.float16 and cfg.quantization == "none":
        raise ValueError("dtype float16 training is unstable without loss scaling; use bfloat16 or float32")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=precision.compute)) if precision.autocast else nullcontext
    )

    base_path = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base_path)
    train_examples = encode_records(train_records, tokenizer, template, cfg)
    val_examples = encode_records(val_records, tokenizer, template, cfg)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = load_for_training(
        base_path, device, precision, cfg.lora, cfg.gradient_checkpointing, cfg.quantization
    )
    identity = base_identity(model.get_base_model(), base_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    ddp_model: Any = TokenLoss(model)
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(
            ddp_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    per_pass = cfg.micro_batch_size * dist.world_size
    accum = max(1, cfg.batch_size // per_pass)
    micro_per_epoch = len(
        micro_batches(
            train_examples,
            cfg.micro_batch_size,
            cfg.seed,
            0,
            cfg.data.group_by_length,
            dist.rank,
            dist.world_size,
        )
    )
    if micro_per_epoch == 0:
        raise ValueError(
            f"{len(train_examples)} training records are too few for {dist.world_size} processes "
            f"x micro_batch_size {cfg.micro_batch_size}"
        )
    steps_per_epoch = max(1, micro_per_epoch // accum)
    total_steps, steps_reason = plan_steps(cfg, steps_per_epoch)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    history = History()
    start_step = 0
    if checkpoint is not None:
        start_step, history = load_checkpoint(checkpoint, model, optimizer, scheduler)

    if dist.main:
        log(
            f"base {base_path} | {total_params / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable "
            f"({100 * trainable / total_params:.2f}%) | device {device} weights {precision.weights} compute {precision.compute}"
        )
        log(
            f"data {cfg.data.data_path}: {len(train_examples)} train / {len(val_examples)} val, "
            f"{sum(e.truncated for e in train_examples)} truncated to {cfg.data.cutoff_len} tokens"
        )
        log(
            f"{total_steps} steps x {accum} accumulation x {cfg.micro_batch_size} micro-batch x {dist.world_size} "
            f"process(es) | lr {cfg.learning_rate} {cfg.lr_scheduler} | packing {cfg.data.packing}"
            + (f" | resuming at step {start_step}" if start_step else "")
        )
        log(f"steps: {steps_reason}")

    wandb_run = _wandb(cfg, dist) if cfg.wandb_project else None
    pad_id = tokenizer.pad_token_id
    if val_examples and history.base_val_loss is None:
        with model.disable_adapter():
            history.base_val_loss = evaluate_loss(model, val_examples, cfg, pad_id, device, autocast, dist)
    base_val_loss = history.base_val_loss

    model.train()
    epoch_batches: dict[int, list[list[int]]] = {}

    def batch_at(index: int) -> list[int]:
        epoch, pos = divmod(index, micro_per_epoch)
        if epoch not in epoch_batches:
            epoch_batches.clear()
            epoch_batches[epoch] = micro_batches(
                train_examples,
                cfg.micro_batch_size,
                cfg.seed,
                epoch,
                cfg.data.group_by_length,
                dist.rank,
                dist.world_size,
            )
        return epoch_batches[epoch][pos]

    from tqdm import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc="train",
        disable=not dist.main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    window_tokens, window_start = 0, time.perf_counter()
    total_tokens = 0
    train_seconds = 0.0
    stopped = False
    with _StopFlag() as stop:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            group = [[train_examples[i] for i in batch_at(step * accum + k)] for k in range(accum)]
            batches = [next(iter_collated(b, [list(range(len(b)))], pad_id, cfg.data.packing)) for b in group]
            # Collective tensors live on the device: NCCL cannot reduce CPU tensors.
            n_targets = torch.tensor(
                float(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)),
                dtype=torch.float64,
                device=device,
            )
            if dist.world_size > 1:
                torch.distributed.all_reduce(n_targets)
            step_targets = max(float(n_targets), 1.0)
            # Summed on the device and read once per step: one host sync, not one per micro-batch.
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for k, batch in enumerate(batches):
                # Gradients are all-reduced once per step, on the last micro-batch.
                last = k == accum - 1
                with nullcontext() if last or dist.world_size == 1 else ddp_model.no_sync():
                    loss_sum, _ = token_loss_sum(ddp_model, batch, device, autocast)
                    # Normalise by trained tokens over the whole step (all micro-batches, all
                    # ranks); DDP averages over ranks, so scale back up by world size.
                    loss = loss_sum * dist.world_size / step_targets
                    loss.backward()
                step_loss += loss_sum.detach()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # Non-padding tokens processed (packed rows have no padding).
            local_tokens = sum(
                int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                for b in batches
            )
            totals = torch.stack(
                [step_loss, torch.tensor(float(local_tokens), dtype=torch.float64, device=device)]
            )
            if dist.world_size > 1:
                torch.distributed.all_reduce(totals)
            loss_total, tokens = totals.tolist()
            step_tokens = int(tokens)
            total_tokens += step_tokens
            window_tokens += step_tokens
            train_seconds += time.perf_counter() - t0
            mean_loss = loss_total / step_targets
            entry = {
                "step": step + 1,
                "epoch": round((step + 1) / steps_per_epoch, 4),
                "loss": round(mean_loss, 5),
                "lr": scheduler.get_last_lr()[0],
            }
            history.steps.append(entry)
            bar.update(1)
            if dist.main and ((step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps):
                now = time.perf_counter()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_tokens, window_start = 0, now
                bar.write(
                    f"epoch {entry['epoch']:.2f} | step {step + 1}/{total_steps} | loss {mean_loss:.4f} | "
                    f"lr {entry['lr']:.2e} | tok/s {tps:.0f} | mem {_memory_gb(device):.2f} GB",
                    file=sys.stdout,
                )
                sys.stdout.flush()
            if (
                cfg.eval_steps
                and (step + 1) % cfg.eval_steps == 0
                and val_examples
                and step + 1 < total_steps
            ):
                val = evaluate_loss(model, val_examples, cfg, pad_id, device, autocast, dist)
                history.evals.append({"step": step + 1, "val_loss": val})
                if dist.main:
                    bar.write(f"step {step + 1} | val_loss {val:.4f}", file=sys.stdout)
            if wandb_run is not None:
                wandb_run.log(entry, step=step + 1)
            if on_step is not None:
                on_step(entry)
            stop_now = stop.set
            if dist.world_size > 1:
                flag = torch.tensor([int(stop_now)], device=device)
                torch.distributed.all_reduce(flag)
                stop_now = bool(flag.item())
            want_ckpt = cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total_steps
            if dist.main and (want_ckpt or stop_now):
                path = save_checkpoint(
                    checkpoint_root(cfg.output_dir),
                    step + 1,
                    model,
                    optimizer,
                    scheduler,
                    history,
                    fingerprint,
                )
                bar.write(f"checkpoint {path}", file=sys.stdout)
            if stop_now:
                stopped = True
                break
    bar.close()
    if stopped:
        raise TrainingStopped(
            f"stopped by SIGTERM; resume with --resume_from_checkpoint latest "
            f"(checkpoints in {checkpoint_root(cfg.output_dir)})"
        )

    val_loss = (
        evaluate_loss(model, val_examples, cfg, pad_id, device, autocast, dist) if val_examples else None
    )
    if val_examples:
        history.evals.append({"step": total_steps, "val_loss": val_loss})
    generation_eval = None
    if dist.main and val_records and cfg.eval_generate > 0:
        from .evaluation import evaluate_peft

        generation_eval = evaluate_peft(
            model, tokenizer, val_records, template, max_records=cfg.eval_generate
        )
    card = {
        "base_model": identity,
        "template": template.to_dict(),
        "config": dataclasses.asdict(cfg),
        "data": {
            "path": str(cfg.data.data_path),
            "sha256": dataset_fingerprint(data_bytes),
            "records": len(records),
            "train_records": len(train_records),
            "val_records": len(val_records),
            "truncated": sum(e.truncated for e in train_examples),
            "trained_tokens_per_epoch": sum(e.trained_tokens for e in train_examples),
        },
        "training": {
            "steps": total_steps,
            "steps_rule": steps_reason,
            "gradient_accumulation": accum,
            "world_size": dist.world_size,
            "trainable_params": trainable,
            "total_params": total_params,
            "device": str(device),
            "weights_dtype": str(precision.weights),
            "compute_dtype": str(precision.compute),
            "tokens": total_tokens,
            "tokens_per_second": round(total_tokens / max(train_seconds, 1e-9), 2),
            "train_seconds": round(train_seconds, 2),
            "wall_seconds": round(time.time() - started, 2),
            "final_loss": history.steps[-1]["loss"] if history.steps else None,
        },
        "eval": {
            "base_val_loss": base_val_loss,
            "val_loss": val_loss,
            **_generation_figures(generation_eval),
        },
        "history": dataclasses.asdict(history),
        "versions": _versions(),
    }
    adapter_dir = Path(cfg.output_dir)
    if dist.main:
        adapter_dir = save_adapter(model, cfg.output_dir, template, card)
        log(
            f"adapter written to {adapter_dir} (val_loss {val_loss if val_loss is None else round(val_loss, 4)}, "
            f"base {base_val_loss if base_val_loss is None else round(base_val_loss, 4)})"
        )
    if dist.world_size > 1:
        torch.distributed.barrier()
    if wandb_run is not None:
        wandb_run.finish()
    return TrainResult(adapter_dir, card, model, tokenizer)


def _generation_figures(result: dict[str, Any] | None) -> dict[str, Any]:
    """Base-vs-adapter figures from the end-of-training evaluation, as the card stores them."""
    if not result:
        return {}
    names = ("loss", "perplexity", "exact_match", "f1", "repetition_rate", "stopped_cleanly_rate")
    return {
        "records": result["adapter"]["records"],
        "metrics": {n: {"base": result["base"][n], "adapter": result["adapter"][n]} for n in names},
        "examples": [
            {
                "instruction": a["instruction"],
                "expected": a["expected"],
                "base": b["generated"],
                "adapter": a["generated"],
            }
            for a, b in zip(result["adapter"]["rows"], result["base"]["rows"], strict=True)
        ],
    }


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "finetune": __version__,
    }


def _wandb(cfg: TrainConfig, dist: Dist) -> Any:
    if not dist.main:
        return None
    try:
        import wandb
    except ImportError as exc:
        raise ImportError("--wandb_project was given but wandb is not installed: pip install wandb") from exc
    if cfg.wandb_watch:
        os.environ["WANDB_WATCH"] = cfg.wandb_watch
    if cfg.wandb_log_model:
        os.environ["WANDB_LOG_MODEL"] = cfg.wandb_log_model
    return wandb.init(
        project=cfg.wandb_project, name=cfg.wandb_run_name or None, config=dataclasses.asdict(cfg)
    )
