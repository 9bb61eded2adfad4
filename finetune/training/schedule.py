"""How long a run trains and how its learning rate moves: the optimizer steps (num_epochs=auto sized
to the data), the steps between evaluations, and the warmup-then-decay schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..config import TrainConfig

# num_epochs=auto: about AUTO_EXAMPLES examples seen, in 3 to 30 epochs, and never fewer than
# AUTO_MIN_STEPS optimizer steps. A few dozen records need ~15-30 passes and ~50 updates before a
# rare name sticks (measured on data/facts); from 1,000 records up this is alpaca-lora's three
# epochs. Recall-based stopping ends small runs as soon as the answers come back.
AUTO_EXAMPLES = 3000
AUTO_MIN_EPOCHS = 3
AUTO_MAX_EPOCHS = 30
AUTO_MIN_STEPS = 60
AUTO_EVALUATIONS = 10  # evaluations per run with num_epochs=auto and eval_steps=0


def plan_steps(cfg: TrainConfig, steps_per_epoch: float, records: int) -> tuple[int, str]:
    """Optimizer steps for the run and a line saying where the number came from. Only num_epochs=auto
    is adjusted to the data: an explicit epoch or step count is exact."""
    if cfg.max_steps:
        return cfg.max_steps, f"max_steps={cfg.max_steps}"
    if cfg.num_epochs is not None:
        return max(1, math.ceil(cfg.num_epochs * steps_per_epoch)), f"num_epochs={cfg.num_epochs:g}"
    epochs = min(AUTO_MAX_EPOCHS, max(AUTO_MIN_EPOCHS, AUTO_EXAMPLES / max(records, 1)))
    steps = math.ceil(epochs * steps_per_epoch)
    rule = (
        f"num_epochs=auto: {epochs:.3g} epochs ({AUTO_EXAMPLES} examples over {records} records, "
        f"{AUTO_MIN_EPOCHS} to {AUTO_MAX_EPOCHS} epochs)"
    )
    if steps < AUTO_MIN_STEPS:  # so few records that 30 epochs are too few updates
        steps = AUTO_MIN_STEPS
        rule += f" would be under {AUTO_MIN_STEPS} steps: {steps / steps_per_epoch:.3g} epochs"
    return steps, f"{rule} = {steps} steps at most"


def auto_length(cfg: TrainConfig) -> bool:
    """Whether the run's length is ours to choose (and so may stop early on evidence)."""
    return cfg.max_steps == 0 and cfg.num_epochs is None


def eval_interval(cfg: TrainConfig, total_steps: int) -> int:
    """Steps between evaluations; 0 means only at the end."""
    if cfg.eval_steps:
        return cfg.eval_steps
    return max(1, math.ceil(total_steps / AUTO_EVALUATIONS)) if auto_length(cfg) else 0


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The learning rate's factor at each step: a linear warmup, then constant, linear or cosine decay."""
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
