"""Checkpoints: what a run has done so far (LoRA weights, optimizer, schedule, RNG, history), written
atomically under <output_dir>-checkpoints/checkpoint-NNNNNNN, and the fingerprint that ties each one
to its data and settings so that a resume never mixes two runs."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import TrainConfig
from ..data.records import dataset_fingerprint
from ..model.loading import ModelError
from ..staging import staged_dir
from .distributed import (
    Dist,
    Placement,
    all_ranks,
    load_lora_state,
    load_optimizer_state,
    optimizer_state,
    whole_lora,
)

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class History:
    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    base_val_loss: float | None = None
    best: dict[str, float] | None = None  # the evaluation whose adapter is kept (BEST_RULE)
    stale: int = 0  # evaluations since the score last improved
    stopped: str = ""  # why the run ended before its planned steps, if it did


def checkpoint_root(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    return out.parent / f"{out.name}-checkpoints"


RUN_FILE = "run.json"
BEST_FILE = "best_adapter.safetensors"  # in a checkpoint: the weights of History.best
# Settings that do not change what a step computes: a resumed run may differ in these.
_OUTSIDE_FINGERPRINT = {
    "output_dir",
    "resume_from_checkpoint",
    "save_steps",
    "logging_steps",
    "wandb_project",
    "wandb_run_name",
    "wandb_watch",
    "wandb_log_model",
}


def run_fingerprint(cfg: TrainConfig, data_bytes: bytes, base_path: str) -> dict[str, Any]:
    """What a checkpoint belongs to: the dataset's hash and every setting that shapes the run. The
    base model is the one resolved (`base_path`), not the setting: an unset one means $BASE_MODEL or
    the default, which may name another model by the time the run resumes."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _OUTSIDE_FINGERPRINT}
    settings["base_model"] = str(Path(base_path).resolve()) if Path(base_path).is_dir() else base_path
    # The data counts by its hash: the same file under another name (each upload to the Cog server
    # gets a fresh one) is the same run.
    settings["data"].pop("data_path", None)
    return {
        "data": dataset_fingerprint(data_bytes),
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def _fingerprint_problem(path: Path, expected: dict[str, Any]) -> str | None:
    run_file = path / RUN_FILE
    if not run_file.is_file():
        return (
            f"{path} does not say which run it belongs to (no {RUN_FILE}); it was not written by this trainer"
        )
    saved = json.loads(run_file.read_text(encoding="utf-8"))
    changed = []
    if saved.get("data") != expected["data"]:
        changed.append("the training data")
    old, new = saved.get("settings", {}), expected["settings"]
    changed += [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not changed:
        return None
    return (
        f"{path} belongs to another run: {', '.join(changed)} changed since it was written. Resume with "
        "the same data and settings, or start a fresh run without --resume_from_checkpoint (old "
        "checkpoints are then moved aside)"
    )


def move_aside_old_checkpoints(output_dir: str | Path) -> Path | None:
    """A fresh run must not share a folder with an older run's checkpoints: pruning would keep the
    older, higher-numbered ones and `--resume_from_checkpoint latest` would pick them."""
    root = checkpoint_root(output_dir)
    if not any(root.glob(f"{CHECKPOINT_PREFIX}*")):
        return None
    aside = root.with_name(f"{root.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    root.rename(aside)
    return aside


def find_checkpoint(cfg: TrainConfig, fingerprint: dict[str, Any]) -> Path | None:
    spec = cfg.resume_from_checkpoint
    if not spec:
        return None
    if spec in {"latest", "true", "True"}:
        found = sorted(checkpoint_root(cfg.output_dir).glob(f"{CHECKPOINT_PREFIX}*"))
        if not found:
            raise FileNotFoundError(f"no checkpoint under {checkpoint_root(cfg.output_dir)} to resume from")
        path = found[-1]
    else:
        path = Path(spec)
    state = path / "trainer_state.pt"
    if not state.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer_state.pt)")
    # A checkpoint folder may have been copied from elsewhere: refuse a bad one before any model
    # loads (weights_only never runs pickled code; the state is LoRA-sized, so reading it twice is cheap).
    try:
        torch.load(state, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{state} was not loaded: it is corrupt or holds pickled objects, which are never unpickled "
            f"({type(exc).__name__}); resume only from a checkpoint this trainer wrote"
        ) from exc
    problem = _fingerprint_problem(path, fingerprint)
    if problem:
        raise ModelError(problem)
    return path


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path,
    step: int,
    model: Any,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    history: History,
    fingerprint: dict[str, Any],
    keep: int | None = 2,
    best_state: dict[str, torch.Tensor] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomic and durable: written to a temporary folder, flushed to disk, then renamed; older
    checkpoints pruned after, all but the `keep` newest (None: none pruned). The model's LoRA
    weights must be whole here and `optimizer_state` as one process's; `rng_ranks`: every
    process's random state, by rank, when there are several (write_checkpoint)."""
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    # Owner-only (mode=None keeps mkdtemp's mode), as checkpoints always were; one of this step
    # already there is replaced.
    with staged_dir(final, mode=None, replace=True) as tmp:
        model.save_pretrained(tmp / "adapter")
        if best_state is not None:
            save_file(best_state, tmp / BEST_FILE)
        torch.save(
            {
                "step": step,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                # Each rank draws its own dropout masks: a resume gives each its own state back.
                **({"rng_ranks": rng_ranks} if rng_ranks else {}),
                "history": dataclasses.asdict(history),
            },
            tmp / "trainer_state.pt",
        )
        (tmp / RUN_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    if keep is not None:
        for old in sorted(root.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(
    root: Path,
    step: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    history: History,
    fingerprint: dict[str, Any],
    place: Placement,
    keep: int | None = 2,
    best_state: dict[str, torch.Tensor] | None = None,
) -> Path | None:
    """save_checkpoint from any strategy, called by every process (with several, each one's random
    state is gathered): under FSDP the weights and the optimizer state are gathered whole first
    (collectives); process 0 writes (None elsewhere). The adapter and optimizer state are as one
    process writes them, so the checkpoint resumes under any strategy."""
    rng_ranks = all_ranks(_rng_state(), place.dist) if place.dist.world_size > 1 else None
    state = optimizer_state(model, optimizer, place.sharded) if place.sharded or place.dist.main else {}
    with whole_lora(model):
        if not place.dist.main:
            return None
        return save_checkpoint(
            root, step, model, state, scheduler, history, fingerprint, keep, best_state, rng_ranks
        )


def load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, dist: Dist | None = None, sharded: bool = False
) -> tuple[int, History, dict[str, torch.Tensor] | None]:
    """The step, history and best evaluation's weights (if kept) of a checkpoint, loaded into
    the model, optimizer, schedule and this rank's RNG (`sharded`: under FSDP, each process
    keeping its shards)."""
    load_lora_state(model, load_file(path / "adapter" / "adapter_model.safetensors"))
    best_state = load_file(path / BEST_FILE) if (path / BEST_FILE).exists() else None
    # weights_only: a checkpoint folder may have been copied from elsewhere; never unpickle code.
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    load_optimizer_state(model, optimizer, state["optimizer"], sharded)
    scheduler.load_state_dict(state["scheduler"])
    dist = dist or Dist()
    ranks = state.get("rng_ranks") or []
    # One random state per rank when the run had as many ranks as this one; else rank 0's for all.
    _set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else state["rng"])
    history = History(**state["history"])
    return int(state["step"]), history, best_state
