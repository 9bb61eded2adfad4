"""Run under torch.distributed.run by test_trainer (one process or several, TRAIN_STRATEGY ddp or
fsdp): trains, then each rank dumps its LoRA weights, whole (rank{N}.pt), and what it logged
(rank{N}.json). With SIGTERM_AT=N, rank SIGTERM_RANK (default 1) signals itself after step N: the
run stops with a checkpoint, and the JSON holds only that."""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from finetune.training.cli import config_from_args
from finetune.training.distributed import lora_state, shutdown
from finetune.training.stopping import TrainingStopped
from finetune.training.trainer import train


def main() -> None:
    dump_dir = Path(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    sigterm_at = int(os.environ.get("SIGTERM_AT", "0"))

    def on_step(entry: dict[str, float]) -> None:
        if entry["step"] == sigterm_at and rank == int(os.environ.get("SIGTERM_RANK", "1")):
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        result = train(config_from_args(sys.argv[2:]), on_step=on_step)
    except TrainingStopped as stopped:
        logged = {"stopped": str(stopped.checkpoint) if stopped.checkpoint else None}
        (dump_dir / f"rank{rank}.json").write_text(json.dumps(logged), encoding="utf-8")
    else:
        # Every rank: under FSDP each weight is gathered from all of them.
        torch.save(lora_state(result.model), dump_dir / f"rank{rank}.pt")
        steps = result.card["history"]["steps"]
        logged = {
            "losses": [s["loss"] for s in steps],
            # The norm of the gradient the optimizer applies (after DDP's all-reduce, or FSDP's
            # reduce-scatter). AdamW hides a gradient off by a constant factor (e.g. not averaged
            # over ranks) from the weights; the norm shows it.
            "grad_norms": [s["grad_norm"] for s in steps],
            "base_val_loss": result.card["eval"]["base_val_loss"],
            "val_loss": result.card["eval"]["val_loss"],
            "stopped_early": result.card["training"]["stopped_early"],
            "kept_step": result.card["training"]["kept_step"],
        }
        (dump_dir / f"rank{rank}.json").write_text(json.dumps(logged), encoding="utf-8")
    shutdown()  # as the CLI ends a run


if __name__ == "__main__":
    main()
