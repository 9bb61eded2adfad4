"""Run under torchrun by test_trainer: trains, then each rank dumps its LoRA weights."""

import sys
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict

from finetune.cli import config_from_args
from finetune.trainer import train

if __name__ == "__main__":
    dump_dir = Path(sys.argv[1])
    result = train(config_from_args(sys.argv[2:]))
    rank = torch.distributed.get_rank()
    torch.save(get_peft_model_state_dict(result.model), dump_dir / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
