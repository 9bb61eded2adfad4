"""Where a training micro-batch spends its time: the classic layout (fp32 weights, padded rows)
against ours (the model prepared as finetune.training.trainer.train prepares it, in both the padded and the
packed layout), the same four examples, one forward + backward each.

    python -m bench.profile_worker SPEC.json OUT.json

The baseline computes the classic full forward (padding mask, logits everywhere), ours the
trainer's own loss (`token_loss_sum`); each is warmed up once, then timed once plain and profiled
once with torch.profiler (self time per operator)."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from bench.common import profile_summary, read_json, setup_torch, sync, write_json
from bench.train_worker import VARIANTS, examples_in_order, make_config


def main(spec_path: str, out_path: str) -> None:
    spec = read_json(spec_path)
    device_name = spec["device"]
    setup_torch(device_name, spec["threads"])
    import torch
    from torch.profiler import ProfilerActivity, profile

    from finetune.data.batching import collate_packed, collate_padded
    from finetune.model.loading import (
        add_lora,
        load_base,
        load_for_training,
        load_tokenizer,
        pick_precision,
    )
    from finetune.model.weights import resolve_base_model
    from finetune.training.losses import token_loss_sum

    cfg = make_config(spec, VARIANTS["ours"], Path(spec["workdir"]) / "adapter-profile")
    device = torch.device(device_name)
    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base)
    examples, batches = examples_in_order(cfg, tokenizer)
    chosen = [examples[i] for i in batches[0]]
    fp32 = pick_precision("float32", device, training=True)
    ours = pick_precision(cfg.dtype, device, training=True)
    torch.manual_seed(cfg.seed)
    model = add_lora(load_base(base, device, fp32), cfg.lora).train()
    ours_model = load_for_training(base, device, ours, cfg.lora).train()  # as the trainer prepares it

    def classic_loss_sum(m: Any, batch: dict[str, Any], device: Any, autocast: Any) -> tuple[Any, int]:
        """The classic recipe's loss: the full forward with the padding mask, logits everywhere."""
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")[:, 1:]
        with autocast():
            logits = m(**batch).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return loss, int((labels != -100).sum())

    def autocast_for(precision: Any) -> Any:
        if precision.autocast:
            return lambda: torch.autocast(device.type, dtype=precision.compute)
        return nullcontext

    dtype = str(ours.compute).removeprefix("torch.")
    padded = collate_padded(chosen, tokenizer.pad_token_id)
    packed = collate_packed(chosen)
    ours_cases = [("packed", packed), ("padded", padded)]
    if not cfg.data.packing:  # the project's default layout first
        ours_cases.reverse()
    cases = {"baseline_layout_fp32_padded": (model, padded, autocast_for(fp32), classic_loss_sum)}
    for layout, batch in ours_cases:
        cases[f"ours_{dtype}_{layout}"] = (ours_model, batch, autocast_for(ours), token_loss_sum)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict[str, Any] = {
        "examples": len(chosen),
        "tokens": sum(len(e) for e in chosen),
        "cases": list(cases),
        "ours_default_packing": cfg.data.packing,
    }
    for name, (m, batch, autocast, loss_sum) in cases.items():

        def step(
            m: Any = m, batch: dict[str, Any] = batch, autocast: Any = autocast, loss_sum: Any = loss_sum
        ) -> None:
            loss, n = loss_sum(m, batch, device, autocast)
            (loss / max(n, 1)).backward()
            m.zero_grad(set_to_none=True)

        step()  # warm-up
        sync(device_name)
        t0 = time.perf_counter()
        step()
        sync(device_name)
        plain_s = time.perf_counter() - t0
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            step()
            sync(device_name)
            wall = time.perf_counter() - t0
        out[name] = {
            "rows_x_width": list(batch["input_ids"].shape),
            "step_ms": round(1000 * plain_s, 1),
            **profile_summary(prof, wall, device_name),
        }
    write_json(out_path, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
