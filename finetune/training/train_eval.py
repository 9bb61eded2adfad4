"""Evaluation during training: validation loss and greedy recall every eval_every steps, the best
evaluation so far (BEST_RULE) with its weights copied aside, and, with num_epochs=auto, the decision
to stop once more steps can only overfit. The base-vs-adapter generations at the end are
evaluation.py's."""

from __future__ import annotations

import math
import sys

import torch

from ..config import TrainConfig
from .distributed import Dist, figures_as_main, lora_state
from .losses import evaluate_loss, greedy_recall
from .run_state import LoopState, RunPlan, TrainState
from .schedule import auto_length

BEST_RULE = (
    "the evaluation with the highest recall exact match, then the highest recall token accuracy "
    "(to 3 decimals), then the lowest validation loss"
)


def eval_score(entry: dict[str, float]) -> tuple[float, ...]:
    """BEST_RULE as a sortable key; figures an evaluation lacks (no recall sample, no validation
    split) drop out of the comparison."""
    exact, accuracy = entry.get("recall_exact"), entry.get("recall_token_accuracy")
    val = entry.get("val_loss")
    key: tuple[float, ...] = ()
    if exact is not None and accuracy is not None:
        key += (exact, round(accuracy, 3))
    if val is not None and math.isfinite(val):
        key += (-val,)
    return key


def evaluate_step(cfg: TrainConfig, plan: RunPlan, state: TrainState, done: int) -> dict[str, float] | None:
    """Validation loss and greedy recall now, recorded in the history; the best evaluation's weights
    are copied aside. None when there is nothing to evaluate on."""
    entry: dict[str, float] = {"step": done}
    if plan.val_examples:
        entry["val_loss"] = validation_loss(cfg, plan, state)
    if plan.recall_examples:
        place = plan.place
        recall = greedy_recall(
            state.model, plan.recall_examples, plan.tokenizer.pad_token_id, place.device, place.autocast
        )
        entry["recall_exact"] = recall.exact
        entry["recall_token_accuracy"] = recall.token_accuracy
    if len(entry) == 1:
        return None
    # Every rank keeps the same best: under FSDP copying it aside is a gather all must join.
    entry = figures_as_main(entry, plan.place)
    history = state.history
    history.evals.append(entry)
    if history.best is None or eval_score(entry) > eval_score(history.best):
        history.best, history.stale = entry, 0
        state.best_state = lora_state(state.model)
    else:
        history.stale += 1
    return entry


def validation_loss(cfg: TrainConfig, plan: RunPlan, state: TrainState) -> float:
    """The mean loss over the validation split, of the model as it is now."""
    place = plan.place
    pad_id = plan.tokenizer.pad_token_id
    # Split over the ranks, a rank with one batch fewer would leave the others waiting in an FSDP
    # forward: sharded, every rank computes the whole split (the same figure everywhere).
    dist = Dist() if place.sharded else place.dist
    return evaluate_loss(state.model, plan.val_examples, cfg, pad_id, place.device, place.autocast, dist)


def eval_hook(cfg: TrainConfig, plan: RunPlan, state: TrainState, loop: LoopState, done: int) -> None:
    """Evaluate every eval_every steps; the last step's comes with the final evaluation. With
    num_epochs=auto, decide here whether the run has learned what it can (History.stopped)."""
    if not (plan.eval_every and done % plan.eval_every == 0 and done < plan.total_steps):
        return
    entry = evaluate_step(cfg, plan, state, done)
    if entry is None:
        return
    history = state.history
    if plan.place.dist.main:
        loop.bar.write(eval_line(entry), file=sys.stdout)
    if not (auto_length(cfg) and cfg.stop_patience):
        return
    history.stopped = stop_reason(entry, history.stale, cfg.stop_patience)
    if plan.place.dist.world_size > 1:  # every rank stops at the same step: rank 0 decides
        flag = torch.tensor([int(bool(history.stopped))], device=plan.place.device)
        torch.distributed.broadcast(flag, src=0)
        if not flag.item():
            history.stopped = ""
        elif not history.stopped:
            history.stopped = "rank 0 stopped"
    if history.stopped and plan.place.dist.main:
        loop.bar.write(f"stopping at {history.stopped}", file=sys.stdout)


def stop_reason(entry: dict[str, float], stale: int, patience: int) -> str:
    """Why a num_epochs=auto run should stop after this evaluation ("" to go on): every checked
    answer recalled token for token (more steps can only overfit), or `patience` evaluations in a
    row without a better score by BEST_RULE."""
    if entry.get("recall_exact") == 1.0:
        return f"step {entry['step']}: every checked training answer is recalled exactly"
    if stale >= patience:
        return f"step {entry['step']}: no better score in {stale} evaluations"
    return ""


def eval_line(entry: dict[str, float]) -> str:
    """An evaluation as the log shows it."""
    parts = [f"step {entry['step']}"]
    if "val_loss" in entry:
        parts.append(f"val_loss {entry['val_loss']:.4f}")
    if "recall_exact" in entry:
        parts.append(
            f"recall exact {entry['recall_exact']:.2f} token accuracy {entry['recall_token_accuracy']:.3f}"
        )
    return " | ".join(parts)
