"""The training loss, shared by the trainer and the held-out evaluation: summed cross-entropy over
the tokens that carry a label, and its mean over a validation split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..data.batching import collate_padded, iter_collated
from ..data.encoding import IGNORE_INDEX, Encoded
from .distributed import Dist

# Causal LMs whose logits are exactly lm_head(final hidden state): for these the loss projects only
# the positions that carry a label (others, e.g. Gemma's soft-capping, take the full forward).
LABELED_ONLY_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3"})


def _right_padded(mask: torch.Tensor) -> bool:
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


class TokenLoss(torch.nn.Module):
    """Summed cross-entropy over trained tokens (labels shift inside), as a module so that DDP wraps
    the whole computation.

    The vocabulary projection runs only at positions that have a label: the prompt and padding
    never need logits (with train_on_inputs=False that is about half the rows of a 49k-wide
    projection). Exact, like token_loss_sum's dropping of a right-padded batch's mask."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
        self.head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        self.labeled_only = (
            getattr(lm.config, "model_type", None) in LABELED_ONLY_MODEL_TYPES
            and self.decoder is not None
            and self.head is not None
        )

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs: Any) -> torch.Tensor:
        logits, targets = self.labeled_logits(input_ids, labels, **inputs)
        return F.cross_entropy(logits.float(), targets, reduction="sum")

    def labeled_logits(
        self, input_ids: torch.Tensor, labels: torch.Tensor, **inputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits at the positions that carry a label, and those labels (both flat)."""
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if self.labeled_only:
            hidden = self.decoder(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
            return self.head(hidden[:, :-1][keep]), targets[keep]
        logits = self.model(input_ids=input_ids, use_cache=False, **inputs).logits[:, :-1]
        return logits[keep], targets[keep]


def token_loss_sum(
    model: Any, batch: dict[str, torch.Tensor], device: torch.device, autocast: Any
) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens and their count. `model` is a causal LM (plain or
    PEFT) or a TokenLoss, possibly inside DDP."""
    loss_fn = model if isinstance(model, TokenLoss | DistributedDataParallel) else TokenLoss(model)
    # Counted and checked on the host, before the copy: no device sync per micro-batch. A
    # right-padded batch needs no mask: under a causal mask no real token can see a pad to its
    # right, and without one SDPA takes its causal kernel instead of a masked one.
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if "attention_mask" in batch and _right_padded(batch["attention_mask"]):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with autocast():
        loss = loss_fn(**batch)
    return loss, n


@torch.no_grad()
def evaluate_loss(
    model: Any,
    examples: list[Encoded],
    cfg: TrainConfig,
    pad_id: int,
    device: torch.device,
    autocast: Any,
    dist: Dist,
) -> float:
    """Mean loss per trained token over the validation split (all ranks together)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensor
    order = [
        list(range(i, min(i + cfg.micro_batch_size, len(examples))))
        for i in range(0, len(examples), cfg.micro_batch_size)
    ]
    for batch in iter_collated(examples, order[dist.rank :: dist.world_size], pad_id, cfg.data.packing):
        loss, n = token_loss_sum(model, batch, device, autocast)
        total[0] += loss.detach()
        total[1] += n
    if dist.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train()
    loss_sum, count = total.tolist()
    return loss_sum / count if count > 0 else float("nan")


@dataclass(frozen=True)
class Recall:
    """How well the model reproduces taught answers, greedily: the share of examples whose whole
    answer (EOS included) greedy decoding would give back token for token, and the share of answer
    tokens it predicts given the taught prefix."""

    exact: float
    token_accuracy: float
    examples: int


@torch.no_grad()
def greedy_recall(
    model: Any, examples: list[Encoded], pad_id: int, device: torch.device, autocast: Any, batch_size: int = 4
) -> Recall:
    """Greedy recall of the examples' labels in one teacher-forced pass each.

    Exact because greedy decoding is deterministic: it returns the taught answer iff the argmax at
    every answer position is the taught next token (induction over positions). One forward pass
    instead of a decode loop: the cost of a validation pass, not of generating every answer."""
    if not examples:
        return Recall(float("nan"), float("nan"), 0)
    was_training = model.training
    model.eval()
    loss_fn = TokenLoss(model)
    exact = correct = total = 0
    for start in range(0, len(examples), batch_size):
        chosen = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_padded(chosen, pad_id).items()}
        with autocast():
            logits, targets = loss_fn.labeled_logits(**batch)
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        hits = torch.zeros_like(keep)
        hits[keep] = logits.argmax(-1) == targets
        # A row is recalled when every answer position is a hit: greedy decoding then returns it.
        exact += int((hits | ~keep).all(dim=1).sum())
        correct += int(hits.sum())
        total += int(keep.sum())
    if was_training:
        model.train()
    return Recall(exact / len(examples), correct / max(total, 1), len(examples))
