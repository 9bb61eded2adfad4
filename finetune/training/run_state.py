"""The records a training run hands from stage to stage, in the order trainer.train makes them:
Data (the dataset as read) -> RunPlan (the run sized from the data, before any model loads) ->
TrainState (model, optimizer, schedule, history) -> LoopState (the loop's counters) -> TrainResult."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import prompts
from ..data.encoding import Encoded
from ..data.records import Record
from .checkpoints import History
from .distributed import Placement


@dataclass
class Data:
    """The dataset as read and split, and the run it belongs to; nothing here needs a model."""

    records: list[Record]
    data_bytes: bytes
    train_records: list[Record]
    val_records: list[Record]
    template: prompts.PromptTemplate
    base_path: str  # the base model as resolved (a folder or a hub id)
    fingerprint: dict[str, Any]
    checkpoint: Path | None


@dataclass
class RunPlan:
    """The run as the data decides it, before any model loads: encoded examples and step counts."""

    data: Data
    place: Placement
    base_path: str
    tokenizer: Any
    train_examples: list[Encoded]
    val_examples: list[Encoded]
    accum: int
    micro_per_epoch: int
    steps_per_epoch: float
    total_steps: int
    steps_rule: str
    recall_examples: list[Encoded]  # training answers each evaluation checks for greedy recall
    eval_every: int  # steps between evaluations (0: only at the end)


@dataclass
class TrainState:
    """The model and what trains it, at the step the run starts from (0, or a checkpoint's)."""

    model: Any
    loss_fn: Any  # TokenLoss around the model; inside DDP, or around the FSDP-sharded model (distributed.py)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    identity: dict[str, Any]
    trainable: int
    total_params: int
    start_step: int
    history: History
    best_state: dict[str, torch.Tensor] | None = None  # trainable weights at history.best


@dataclass
class LoopState:
    """What the loop carries from one step to the next."""

    bar: Any
    wandb_run: Any
    window_tokens: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    total_tokens: int = 0
    train_seconds: float = 0.0
    epoch: int = -1  # the epoch whose micro-batch order is held below
    epoch_order: list[list[int]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What train() returns: the adapter folder, its card, and the trained model."""

    adapter_dir: Path
    card: dict[str, Any]
    model: Any = None  # under FSDP this process's shards: distributed.lora_state gathers the adapter
    tokenizer: Any = None


def steps_run(state: TrainState) -> int:
    """Optimizer steps done so far (the last recorded step, or the step the run started from)."""
    return int(state.history.steps[-1]["step"]) if state.history.steps else state.start_step
