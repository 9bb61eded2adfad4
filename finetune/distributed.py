"""Distributed set-up: this process's place among the training processes (torchrun's RANK,
LOCAL_RANK and WORLD_SIZE) and where it computes."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .modeling import Precision


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


@dataclass
class Placement:
    """Where this process computes, among how many, and in which precision."""

    device: torch.device
    dist: Dist
    precision: Precision
    autocast: Callable[[], Any]
