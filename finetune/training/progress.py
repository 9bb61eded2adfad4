"""What a run says as it goes: the start lines, the step line (epoch | step | loss | lr | tok/s |
mem) and, when wandb_project is set, the wandb run. Only the main process speaks."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainConfig
from .distributed import Dist
from .run_state import LoopState, RunPlan, TrainState


def log_line(text: str) -> None:
    """The default log: one line to stdout, flushed at once."""
    print(text, flush=True)


def log_start(cfg: TrainConfig, plan: RunPlan, state: TrainState, log: Callable[[str], None]) -> None:
    """The run as resolved, said once by the main process: model, data, length, memory."""
    place = plan.place
    if not place.dist.main:
        return
    trainable, total_params, examples = state.trainable, state.total_params, plan.train_examples
    log(
        f"base {plan.base_path} | {total_params / 1e6:.1f}M params, {trainable / 1e6:.2f}M trainable "
        f"({100 * trainable / total_params:.2f}%) | device {place.device} weights {place.precision.weights} compute {place.precision.compute}"
    )
    log(
        f"data {cfg.data.data_path}: {len(examples)} train / {len(plan.val_examples)} val, "
        f"{sum(e.truncated for e in examples)} truncated to {cfg.data.cutoff_len} tokens"
    )
    log(
        f"{plan.total_steps} steps x {plan.accum} accumulation x {cfg.micro_batch_size} micro-batch x {place.dist.world_size} "
        f"process(es){f' ({place.strategy})' if place.dist.world_size > 1 else ''} | lr {cfg.learning_rate} "
        f"{cfg.lr_scheduler} | packing {cfg.data.packing}"
        + (f" | resuming at step {state.start_step}" if state.start_step else "")
    )
    log(f"steps: {plan.steps_rule}")
    if place.device.type == "cuda" or cfg.quantization != "none" or cfg.gradient_checkpointing:
        log(f"memory {place.memory.table()}")
    effective = plan.accum * cfg.micro_batch_size * place.dist.world_size
    if effective != cfg.batch_size:
        # Accumulation is a whole number of micro-batches: say what a step really trains on.
        log(
            f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size {cfg.micro_batch_size} x "
            f"{place.dist.world_size} process(es): each step trains on {effective} examples"
        )


def log_step(
    cfg: TrainConfig, plan: RunPlan, loop: LoopState, entry: dict[str, float], mean_loss: float
) -> None:
    """The step line every logging_steps steps and at the last: loss, lr, speed, memory."""
    done = entry["step"]
    if not plan.place.dist.main or (done % cfg.logging_steps != 0 and done != plan.total_steps):
        return
    now = time.perf_counter()
    tps = loop.window_tokens / max(now - loop.window_start, 1e-9)
    loop.window_tokens, loop.window_start = 0, now
    loop.bar.write(
        f"epoch {entry['epoch']:.2f} | step {done}/{plan.total_steps} | loss {mean_loss:.4f} | "
        f"lr {entry['lr']:.2e} | grad_norm {entry['grad_norm']:.3g} | tok/s {tps:.0f} | mem {_memory_gb(plan.place.device):.2f} GB",
        file=sys.stdout,
    )
    sys.stdout.flush()


def _memory_gb(device: torch.device) -> float:
    """Peak memory so far: the GPU's allocations, or the process's resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def start_wandb(cfg: TrainConfig, dist: Dist) -> Any:
    """The wandb run (main process only); wandb is imported only when a project is set."""
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
