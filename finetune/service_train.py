"""The training service behind train.py: run the engine in a scratch folder and pack the adapter
folder into one archive; a failed or canceled training leaves nothing behind."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .archives import pack_dir
from .config import TrainConfig
from .trainer import train


@dataclass(frozen=True)
class TrainingSummary:
    archive: Path
    train_loss: float
    eval_loss: float | None
    base_eval_loss: float | None
    steps: int
    tokens_per_second: float
    card: dict

    def metric(self, name: str, which: str) -> float | None:
        """An end-of-training generation figure (exact_match, f1, ...) for "base" or "adapter"."""
        return self.card["eval"].get("metrics", {}).get(name, {}).get(which)


def run_training(make_config: Callable[[str], TrainConfig]) -> TrainingSummary:
    """`make_config(output_dir)` builds the settings; returns the packed adapter and its figures."""
    work = Path(tempfile.mkdtemp(prefix="training-"))
    try:
        result = train(make_config(str(work / "adapter")))
        archive = pack_dir(result.adapter_dir, work / "weights.tar")
        shutil.rmtree(result.adapter_dir, ignore_errors=True)
    except BaseException:  # includes Cog's CancelationException
        shutil.rmtree(work, ignore_errors=True)
        raise
    card = result.card
    return TrainingSummary(
        archive=archive,
        train_loss=float(card["training"]["final_loss"]),
        eval_loss=card["eval"]["val_loss"],
        base_eval_loss=card["eval"]["base_val_loss"],
        steps=int(card["training"]["steps"]),
        tokens_per_second=float(card["training"]["tokens_per_second"]),
        card=card,
    )
