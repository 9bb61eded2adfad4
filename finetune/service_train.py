"""The training service behind train.py: run the engine, pack the adapter folder into one archive."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .archives import pack_dir
from .trainer import train


@dataclass(frozen=True)
class TrainingSummary:
    archive: Path
    train_loss: float
    eval_loss: float | None
    base_eval_loss: float | None
    steps: int
    tokens_per_second: float


def run_training(cfg, archive: Path) -> TrainingSummary:
    """Train, then pack the adapter, template, card and loss curve into `archive` (atomically)."""
    result = train(cfg)
    pack_dir(result.adapter_dir, archive)
    shutil.rmtree(result.adapter_dir, ignore_errors=True)
    card = result.card
    return TrainingSummary(
        archive=archive,
        train_loss=float(card["training"]["final_loss"]),
        eval_loss=card["eval"]["val_loss"],
        base_eval_loss=card["eval"]["base_val_loss"],
        steps=int(card["training"]["steps"]),
        tokens_per_second=float(card["training"]["tokens_per_second"]),
    )
