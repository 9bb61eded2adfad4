"""The adapter folder: PEFT weights + config, the prompt template, a training card (JSON and
Markdown) and a loss curve. Written to a temporary folder, verified, flushed to disk, then renamed
into place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data import prompts
from ..staging import fsync_path as fsync_path
from ..staging import staged_dir
from .adapter_limits import read_json
from .loading import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelError

CARD_JSON = "training_card.json"
CARD_MD = "README.md"
LOSS_PNG = "loss.png"


def template_from_adapter(adapter_dir: Path) -> prompts.PromptTemplate | None:
    """The template an adapter folder carries, read under the adapter's JSON cap; None without one."""
    path = Path(adapter_dir) / prompts.ADAPTER_TEMPLATE_FILE
    if not path.is_file():
        return None
    return prompts.template_from_dict(read_json(path, prompts.ADAPTER_TEMPLATE_FILE), default_name="adapter")


class AdapterVerificationError(RuntimeError):
    """The saved adapter is incomplete or broken (alpaca-lora's empty-adapter bug, NaN weights)."""


def lora_state_keys(model: Any) -> set[str]:
    """Names PEFT writes for this model's trainable LoRA tensors (adapter name stripped)."""
    from peft.utils import get_peft_model_state_dict

    return set(get_peft_model_state_dict(model).keys())


def verify_adapter(folder: Path, expected_keys: set[str]) -> int:
    """Every expected LoRA tensor is present, finite, and the file is not trivially small."""
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file() or path.stat().st_size < 1024:
        raise AdapterVerificationError(f"{path} is missing or empty")
    tensors = load_file(path)
    missing = sorted(expected_keys - set(tensors))
    if missing:
        raise AdapterVerificationError(f"{len(missing)} LoRA tensors missing from {path}, e.g. {missing[:3]}")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise AdapterVerificationError(f"{len(bad)} LoRA tensors hold NaN/inf, e.g. {bad[:3]}")
    if not any(k for k in tensors if "lora_B" in k and tensors[k].abs().sum() > 0):
        raise AdapterVerificationError(
            "every lora_B tensor is zero: the adapter learned nothing (no steps ran?)"
        )
    return len(tensors)


def save_adapter(
    model: Any, output_dir: str | Path, template: prompts.PromptTemplate, card: dict[str, Any]
) -> Path:
    output = Path(output_dir)
    with staged_dir(output, replace=True) as tmp:  # a new training replaces the adapter there
        model.save_pretrained(tmp, safe_serialization=True)
        card["adapter"] = {
            "tensors": verify_adapter(tmp, lora_state_keys(model)),
            "bytes": (tmp / ADAPTER_WEIGHTS).stat().st_size,
        }
        prompts.save_template(template, tmp)
        (tmp / CARD_JSON).write_text(
            json.dumps(card, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8"
        )
        (tmp / CARD_MD).write_text(card_markdown(card), encoding="utf-8")
        plot_loss(card, tmp / LOSS_PNG)
    return output


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def card_markdown(card: dict[str, Any]) -> str:
    t, d, e, cfg = card["training"], card["data"], card["eval"], card["config"]
    lines = [
        "# LoRA adapter training card",
        "",
        f"- Base model: `{card['base_model'].get('source')}` ({card['base_model'].get('model_type')}, "
        f"{card['base_model'].get('num_hidden_layers')} layers, hidden {card['base_model'].get('hidden_size')})",
        f"- Template: `{card['template']['name']}`",
        f"- Data: `{d['path']}` ({d['sha256']}): {d['train_records']} train / {d['val_records']} validation records, "
        f"{d['truncated']} truncated",
        f"- LoRA: r={cfg['lora']['lora_r']}, alpha={cfg['lora']['lora_alpha']}, dropout={cfg['lora']['lora_dropout']}, "
        f"targets {cfg['lora']['lora_target_modules']}",
        f"- Steps: {t['steps']} (batch {cfg['batch_size']}, micro-batch {cfg['micro_batch_size']}, lr {cfg['learning_rate']}), "
        f"{t['tokens']} tokens at {t['tokens_per_second']} tok/s on {t['device']} ({t['compute_dtype']})",
        f"- Training length: {t.get('steps_rule', '')}"
        + (f"; stopped early at {t['stopped_early']}" if t.get("stopped_early") else ""),
        f"- Adapter kept: step {t.get('kept_step')}, {t.get('kept_rule', 'the last step')}",
        f"- Wall time: {t['wall_seconds']} s; versions: "
        + ", ".join(f"{k} {v}" for k, v in card["versions"].items()),
        "",
        "| | base | adapter |",
        "|---|---|---|",
        f"| validation loss | {_fmt(e.get('base_val_loss'))} | {_fmt(e.get('val_loss'))} |",
    ]
    if e.get("recall_exact") is not None:
        lines.append(
            f"| recall of {e.get('recall_records')} training answers (exact / token accuracy) | | "
            f"{_fmt(e['recall_exact'])} / {_fmt(e['recall_token_accuracy'])} |"
        )
    for name, values in (e.get("metrics") or {}).items():
        lines.append(f"| {name} | {_fmt(values.get('base'))} | {_fmt(values.get('adapter'))} |")
    lines += ["", f"Final training loss {_fmt(t.get('final_loss'))}; the loss curve is in `{LOSS_PNG}`.", ""]
    evals = card["history"]["evals"]
    if evals:
        lines += [
            "Evaluations (recall: greedy answers to training questions, checked token for token):",
            "",
            "| step | validation loss | recall exact | recall token accuracy |",
            "|---|---|---|---|",
        ]
        for ev in evals:
            kept = " (kept)" if ev["step"] == t.get("kept_step") else ""
            lines.append(
                f"| {ev['step']}{kept} | {_fmt(ev.get('val_loss', '–'))} | {_fmt(ev.get('recall_exact', '–'))} | "
                f"{_fmt(ev.get('recall_token_accuracy', '–'))} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_loss(card: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = card["history"]["steps"]
    evals = [e for e in card["history"]["evals"] if e.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label="train loss")
    if evals:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", label="validation loss")
    base = card["eval"].get("base_val_loss")
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", label="base model (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per token")
    kept = card["training"].get("kept_step")
    if kept is not None:
        ax.axvline(kept, color="tab:red", linestyle=":", label="adapter kept")
    handles, labels = ax.get_legend_handles_labels()
    recall = [e for e in card["history"]["evals"] if e.get("recall_exact") is not None]
    if recall:  # recall is a share: its own axis on the right
        right = ax.twinx()
        xs = [e["step"] for e in recall]
        right.plot(xs, [e["recall_exact"] for e in recall], "s-", color="tab:green", label="recall exact")
        accuracy = [e["recall_token_accuracy"] for e in recall]
        right.plot(xs, accuracy, "^:", color="tab:olive", label="recall token accuracy")
        right.set_ylim(-0.02, 1.02)
        right.set_ylabel("recall of training answers")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def convert_pickled_adapter(folder: Path) -> Path:
    """Opt-in conversion of a trusted adapter_model.bin to safetensors (never unpickles code)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    source = folder / "adapter_model.bin"
    if not source.is_file() or not (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{folder} has no adapter_model.bin and adapter_config.json to convert")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything that is not plain tensors
        raise ModelError(f"{source} is not a plain tensor file and was not loaded: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{source} does not hold a flat dict of tensors")
    target = folder / ADAPTER_WEIGHTS
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target
