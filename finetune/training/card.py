"""The training card: what an adapter folder says about itself (base model, template, settings,
data, how the run went, evaluation figures, library versions), built from the run's records.
adapter_folder.py writes it beside the adapter, as JSON and Markdown."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from .. import __version__
from ..config import TrainConfig
from ..data.records import dataset_fingerprint
from .run_state import LoopState, RunPlan, TrainState, steps_run
from .schedule import auto_length
from .train_eval import BEST_RULE


def training_card(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    loop: LoopState,
    kept: dict[str, float] | None,
    generation_eval: dict[str, Any] | None,
    started: float,
) -> dict[str, Any]:
    """What the adapter folder says about itself: base, template, settings, data, run, figures."""
    data, history = plan.data, state.history
    kept = kept or {}
    return {
        "base_model": state.identity,
        "template": data.template.to_dict(),
        "config": dataclasses.asdict(cfg),
        "data": {
            "path": str(cfg.data.data_path),
            "sha256": dataset_fingerprint(data.data_bytes),
            "records": len(data.records),
            "train_records": len(data.train_records),
            "val_records": len(data.val_records),
            "truncated": sum(e.truncated for e in plan.train_examples),
            "trained_tokens_per_epoch": sum(e.trained_tokens for e in plan.train_examples),
        },
        "training": _training_section(cfg, plan, state, loop, kept, started),
        "eval": {
            "base_val_loss": history.base_val_loss,
            "val_loss": kept.get("val_loss"),
            "recall_exact": kept.get("recall_exact"),
            "recall_token_accuracy": kept.get("recall_token_accuracy"),
            "recall_records": len(plan.recall_examples),
            **_generation_figures(generation_eval),
        },
        "history": dataclasses.asdict(history),
        "versions": _versions(),
    }


def _training_section(
    cfg: TrainConfig,
    plan: RunPlan,
    state: TrainState,
    loop: LoopState,
    kept: dict[str, float],
    started: float,
) -> dict[str, Any]:
    """How the run went: its length and why, where it ran, its size and speed."""
    place, history = plan.place, state.history
    return {
        "steps": steps_run(state),
        "planned_steps": plan.total_steps,
        "steps_rule": plan.steps_rule,
        "stopped_early": history.stopped or None,
        "kept_step": kept.get("step"),
        "kept_rule": BEST_RULE if auto_length(cfg) else "the last step",
        "gradient_accumulation": plan.accum,
        "world_size": place.dist.world_size,
        "strategy": place.strategy if place.dist.world_size > 1 else None,
        "memory_plan": place.memory.to_json() if place.memory is not None else None,
        "trainable_params": state.trainable,
        "total_params": state.total_params,
        "device": str(place.device),
        "weights_dtype": str(place.precision.weights),
        "compute_dtype": str(place.precision.compute),
        "tokens": loop.total_tokens,
        "tokens_per_second": round(loop.total_tokens / max(loop.train_seconds, 1e-9), 2),
        "train_seconds": round(loop.train_seconds, 2),
        "wall_seconds": round(time.time() - started, 2),
        "final_loss": history.steps[-1]["loss"] if history.steps else None,
    }


def _generation_figures(result: dict[str, Any] | None) -> dict[str, Any]:
    """Base-vs-adapter figures from the end-of-training evaluation, as the card stores them."""
    if not result:
        return {}
    names = ("loss", "perplexity", "exact_match", "f1", "repetition_rate", "stopped_cleanly_rate")
    return {
        "records": result["adapter"]["records"],
        "metrics": {n: {"base": result["base"][n], "adapter": result["adapter"][n]} for n in names},
        "examples": [
            {
                "instruction": a["instruction"],
                "expected": a["expected"],
                "base": b["generated"],
                "adapter": a["generated"],
            }
            for a, b in zip(result["adapter"]["rows"], result["base"]["rows"], strict=True)
        ],
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "finetune": __version__,
    }
