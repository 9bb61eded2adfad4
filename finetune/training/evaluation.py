"""Held-out evaluation: does the adapter answer better than the base model it was trained on?

Each record is scored twice: the masked-response loss (exactly the training encoding, so the
figure is comparable with the training card's val_loss) and a greedy generation of the response,
compared with the expected output (exact match, token F1), checked for loops and for stopping at
EOS. The base is scored through the same PEFT model with its adapter disabled, so both columns
come from one set of weights loaded once.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, GenerationSettings, field_default
from ..data.batching import collate_padded
from ..data.encoding import Encoded, encode_example
from ..data.prompts import AUTO, PromptTemplate, load_template, split_record
from ..data.records import DatasetError, Record
from ..engine.requests import GenerationStats
from ..engine.scheduler import stream_tokens
from ..model.adapter_folder import CARD_JSON, template_from_adapter
from . import metrics
from .losses import token_loss_sum

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_EXAMPLES = 3
DEFAULT_OUTPUT_DIR = "outputs/eval"
FALLBACK_TEMPLATE = "alpaca"
# Rows of the Markdown table: (label, key in the figures dict).
METRICS = (
    ("loss", "loss"),
    ("perplexity", "perplexity"),
    ("exact match", "exact_match"),
    ("token F1", "f1"),
    ("repetition rate", "repetition_rate"),
    ("stopped cleanly", "stopped_cleanly_rate"),
    ("records", "records"),
)
# Where the figures came from, shown under the report's title when known: (label, result key).
SOURCES = (("base", "base_model"), ("adapter", "adapter_source"), ("data", "data"))


def check_records(records: list[Record]) -> None:
    """Every record needs a prompt to answer; raised before any model loads."""
    if not records:
        raise DatasetError(["no records to evaluate"])
    plain = [r.number for r in records if r.shape == "text"]
    if plain:
        shown = ", ".join(map(str, plain[:5])) + (", ..." if len(plain) > 5 else "")
        raise DatasetError(
            [
                f"records {shown} are plain {{text}}, which has no prompt to answer; evaluate on "
                "instruction/output, prompt/completion or messages records"
            ]
        )


def _question(record: Record) -> str:
    """What a reader of the report should see as the question (not the templated prompt)."""
    if record.shape == "alpaca":
        return f"{record.instruction}\n{record.input}" if record.input else record.instruction
    if record.shape == "completion":
        return record.prompt
    users = [m.content for m in record.messages[:-1] if m.role == "user"]
    return users[-1] if users else ""


def evaluate_model(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    template: PromptTemplate,
    *,
    cutoff_len: int = field_default(DataConfig, "cutoff_len"),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Loss, perplexity, exact match, F1, repetition and clean-stop rates, with one row per record."""
    check_records(records)
    device = next(model.parameters()).device
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    loss_total, token_total = 0.0, 0
    try:
        for record in records:
            prompt, expected = split_record(record, template, tokenizer)
            encoded = encode_example(
                prompt, expected, tokenizer, cutoff_len, train_on_inputs=False, add_eos_token=True
            )
            with torch.no_grad():
                loss_sum, n = _response_loss(model, encoded, tokenizer.pad_token_id, device)
            stats = GenerationStats()
            generated = "".join(stream_tokens(model, tokenizer, prompt, settings, stats))
            loss_total += loss_sum
            token_total += n
            rows.append(
                {
                    "instruction": _question(record),
                    "expected": expected,
                    "generated": generated,
                    "loss": loss_sum / n,
                    "em": metrics.exact_match(generated, expected),
                    "f1": metrics.token_f1(generated, expected),
                    "looped": metrics.repeated_ngram_loop(generated),
                    "stopped": stats.stop_reason == "eos",
                }
            )
    finally:
        model.train(was_training)
    means = metrics.aggregate({k: row[k] for k in ("em", "f1", "looped", "stopped")} for row in rows)
    loss = loss_total / token_total
    return {
        "loss": loss,
        "perplexity": metrics.perplexity(loss),
        "exact_match": means["em"],
        "f1": means["f1"],
        "repetition_rate": means["looped"],
        "stopped_cleanly_rate": means["stopped"],
        "records": len(rows),
        "trained_tokens": token_total,
        "rows": rows,
    }


def _response_loss(model: Any, encoded: Encoded, pad_id: int, device: torch.device) -> tuple[float, int]:
    """Summed loss over one example's trained tokens and their count: the training loss itself."""
    # No autocast: at inference the weights already hold the compute dtype.
    loss, n = token_loss_sum(model, collate_padded([encoded], pad_id), device, nullcontext)
    return loss.item(), n


def evaluate_peft(
    model: Any,
    tokenizer: Any,
    records: list[Record],
    template: PromptTemplate,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_records: int = 50,
    examples: int = DEFAULT_EXAMPLES,
) -> dict[str, Any]:
    """Base vs adapter on a loaded PeftModel (the trainer's, at the end of training).

    Only the first `max_records` records are scored, so the end-of-training evaluation stays
    short, and only `examples` rows are kept, so the training card stays small.
    """
    chosen = records[:max_records]
    with model.disable_adapter():
        base = evaluate_model(model, tokenizer, chosen, template, max_new_tokens=max_new_tokens)
    adapter = evaluate_model(model, tokenizer, chosen, template, max_new_tokens=max_new_tokens)
    for figures in (base, adapter):
        figures["rows"] = figures["rows"][:examples]
    return {"base": base, "adapter": adapter, "template": template.name}


def compare(
    base_model: str | None,
    adapter: str | Path | None,
    records: list[Record],
    *,
    template_name: str = AUTO,
    cutoff_len: int = field_default(DataConfig, "cutoff_len"),
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    device: str | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Score the base model, then base + adapter, on the same records; the base is loaded once.

    `adapter` is a folder or an archive (.tar, .zip, ...); template "auto" means the adapter's own
    template, else alpaca. Returns {"base", "adapter" (None without one), "template", ...}.
    """
    from ..formats.weights_sources import materialize
    from ..model.loading import check_adapter_dir, load_base, load_tokenizer, pick_device, pick_precision
    from ..model.weights import resolve_base_model

    check_records(records)
    base_path = resolve_base_model(base_model)
    torch_device = pick_device(device)
    precision = pick_precision(dtype, torch_device, training=False)
    with tempfile.TemporaryDirectory(prefix="eval-adapter-") as workdir:
        folder = materialize(str(adapter), Path(workdir)) if adapter else None
        if folder is not None:
            check_adapter_dir(folder)
        template = _pick_template(template_name, folder)
        tokenizer = load_tokenizer(base_path)
        model = load_base(base_path, torch_device, precision).eval()
        kwargs = {"cutoff_len": cutoff_len, "max_new_tokens": max_new_tokens}
        result: dict[str, Any] = {
            "base_model": base_path,
            "adapter_source": str(adapter) if adapter else None,
            "template": template.name,
        }
        if folder is None:
            result["base"] = evaluate_model(model, tokenizer, records, template, **kwargs)
            result["adapter"] = None
            return result

        # Attach first, so a broken adapter fails before the base has been scored for nothing.
        model = _attach_checked(model, folder, str(adapter))
        with model.disable_adapter():
            result["base"] = evaluate_model(model, tokenizer, records, template, **kwargs)
        result["adapter"] = evaluate_model(model, tokenizer, records, template, **kwargs)
    return result


def _attach_checked(model: Any, folder: Path, source: str) -> Any:
    """The adapter in `folder` attached to `model`, once its training card (when it has one) names
    this base model."""
    from ..model.loading import attach_adapter, check_identity

    card = folder / CARD_JSON
    if card.is_file():
        check_identity(json.loads(card.read_text(encoding="utf-8")).get("base_model", {}), model, source)
    return attach_adapter(model, folder).eval()


def _pick_template(name: str, adapter_dir: Path | None) -> PromptTemplate:
    if name != AUTO:
        return load_template(name)
    own = template_from_adapter(adapter_dir) if adapter_dir is not None else None
    return own or load_template(FALLBACK_TEMPLATE)


# --- reports -------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "<br>".join(str(value).replace("|", "\\|").splitlines())


def to_markdown(result: dict[str, Any], examples: int = DEFAULT_EXAMPLES) -> str:
    """Metric table (base | adapter) and the first `examples` records side by side."""
    base, adapter = result["base"], result.get("adapter")
    columns = [("base", base)] + ([("adapter", adapter)] if adapter is not None else [])
    lines = [f"## Evaluation: {base['records']} records, template {result.get('template', '?')}", ""]
    sources = [f"{label}: `{result[key]}`" for label, key in SOURCES if result.get(key)]
    if sources:
        lines += ["; ".join(sources), ""]
    lines += [
        "| metric | " + " | ".join(name for name, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, key in METRICS:
        lines.append(f"| {label} | " + " | ".join(_cell(figures[key]) for _, figures in columns) + " |")
    shown = list(zip(*(figures["rows"][:examples] for _, figures in columns), strict=True))
    if shown:
        outputs = " | ".join(f"{name} output" for name, _ in columns)
        lines += ["", "### Examples", "", f"| instruction | expected | {outputs} |"]
        lines.append("|---" * (2 + len(columns)) + "|")
        for rows in shown:
            cells = [rows[0]["instruction"], rows[0]["expected"], *(row["generated"] for row in rows)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False) + "\n"


# --- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune eval",
        description="Compare the base model with base + adapter on held-out records "
        "(loss, perplexity, exact match, token F1, repetition, clean stops)",
    )
    parser.add_argument("--base_model", default=None, help="default: $BASE_MODEL, else the embedded model")
    parser.add_argument(
        "--adapter", default=None, help="adapter folder or archive; omit to score the base only"
    )
    parser.add_argument("--data", required=True, help="held-out .json/.jsonl records with expected outputs")
    parser.add_argument(
        "--prompt_template", default=AUTO, help="auto: the adapter's own template, else alpaca"
    )
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--cutoff_len", type=int, default=field_default(DataConfig, "cutoff_len"))
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES, help="example rows in the report")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="where eval.json and eval.md go")
    return parser


def _one_line(exc: BaseException) -> str:
    # DatasetError lists one problem per line; a single stderr line is easier to grep and log.
    first, *rest = str(exc).splitlines() or [""]
    return " ".join([first, "; ".join(line.strip().removeprefix("- ") for line in rest)]).strip()


def main(argv: list[str] | None = None) -> int:
    from ..data.dataset_file import read_records
    from ..errors import user_errors

    args = _parser().parse_args(argv)
    try:
        records = read_records(args.data)
        result = compare(
            args.base_model,
            args.adapter,
            records,
            template_name=args.prompt_template,
            cutoff_len=args.cutoff_len,
            max_new_tokens=args.max_new_tokens,
        )
    except user_errors() as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    result["data"] = str(args.data)
    report = to_markdown(result, args.examples)
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(to_json(result), encoding="utf-8")
        (out / "eval.md").write_text(report, encoding="utf-8")
    except OSError as exc:
        print(
            f"error: cannot write the report to {out}: {exc.strerror or exc}; choose another --output_dir",
            file=sys.stderr,
        )
        return 2
    print(report)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
