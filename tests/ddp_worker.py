"""Run under torch.distributed.run by test_trainer (one process or several): trains, then each rank
dumps its LoRA weights (rank{N}.pt) and what it logged (rank{N}.json)."""

import json
import sys
from pathlib import Path
from typing import Any

import torch
from peft.utils import get_peft_model_state_dict

from finetune.cli import config_from_args
from finetune.trainer import train


def main() -> None:
    dump_dir = Path(sys.argv[1])
    grad_norms: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The trainer clips once per step, after DDP's all-reduce, so this is the norm of the
        # gradient the optimizer applies. AdamW hides a gradient off by a constant factor (e.g. not
        # averaged over ranks) from the weights; the norm shows it.
        norm = clip(parameters, max_norm, *args, **kwargs)
        grad_norms.append(float(norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = recording_clip
    result = train(config_from_args(sys.argv[2:]))
    distributed = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    torch.save(get_peft_model_state_dict(result.model), dump_dir / f"rank{rank}.pt")
    logged = {
        "losses": [s["loss"] for s in result.card["history"]["steps"]],
        "grad_norms": grad_norms,
        "base_val_loss": result.card["eval"]["base_val_loss"],
        "val_loss": result.card["eval"]["val_loss"],
        "stopped_early": result.card["training"]["stopped_early"],
        "kept_step": result.card["training"]["kept_step"],
    }
    (dump_dir / f"rank{rank}.json").write_text(json.dumps(logged), encoding="utf-8")
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
