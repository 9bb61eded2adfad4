"""The engine's fast decode step, whichever one the device has: a step compiled ahead of time on a
CPU (cpu_step.py, built and loaded by cpu_compile.py) or CUDA graphs on a GPU (cuda_graphs.py). One
entry point, so that neither of the two imports the other's loader and the server asks one question."""

from __future__ import annotations

from typing import Any

import torch

from ..settings import COMPILE_ENV, COMPILE_MODES
from . import cpu_compile, cuda_graphs
from .decoder import Decoder


def load_step(
    decoder: Decoder | None,
    device: torch.device,
    max_rows: int,
    mode: str = "auto",
    adapters: bool = True,
    kv_tokens: int | None = None,
) -> Any:
    """The fast decode step for this model, or None (with the reason printed): decode eagerly.
    `mode` is SERVE_COMPILE (auto | off); `adapters`: also cover steps with unmerged adapters;
    `kv_tokens`: the engine's KV budget, which a GPU's graph pool stays within."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"{COMPILE_ENV}={mode!r}: use one of {', '.join(COMPILE_MODES)}")
    if mode == "off" or decoder is None:
        return None
    if device.type == "cuda":
        return cuda_graphs.load(decoder, device, max_rows, kv_tokens)
    return cpu_compile.load(decoder, device, max_rows, mode, adapters)
