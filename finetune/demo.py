"""`make demo`: the whole story on the real Cog server. Train a LoRA on the bundled persona dataset
through POST /trainings, start the trained version, ask held-out questions through POST
/predictions and print base vs tuned answers side by side."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from .cogtools import CogServer, data_uri, post_with_retry, save_data_uri
from .config import PROJECT_ROOT
from .records import read_records

DEMO_TRAIN = PROJECT_ROOT / "data" / "demo" / "persona_train.json"
DEMO_HELDOUT = PROJECT_ROOT / "data" / "demo" / "persona_heldout.json"


def ask_all(server: CogServer, questions: list[str], max_new_tokens: int) -> list[str]:
    answers = []
    for q in questions:
        body = post_with_retry(
            f"{server.url}/predictions",
            {"input": {"prompt": q, "temperature": 0, "max_new_tokens": max_new_tokens}},
            300,
        ).json()
        answers.append(
            "".join(body.get("output") or []) if body["status"] == "succeeded" else f"[{body['error']}]"
        )
    return answers


def table(rows: list[tuple[str, str, str, str]]) -> str:
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["| question | expected | base model | tuned (LoRA) |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--output_dir", default=str(PROJECT_ROOT / "outputs" / "demo"))
    parser.add_argument("--max_new_tokens", type=int, default=32)
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    held = read_records(DEMO_HELDOUT)
    questions = [r.instruction for r in held]

    started = time.monotonic()
    print(f"1/3 training a LoRA on {DEMO_TRAIN.name} through POST /trainings (default settings)", flush=True)
    with CogServer("train", log_path=out / "cog-train.log") as trainer:
        body = post_with_retry(
            f"{trainer.url}/trainings", {"input": {"train_data": data_uri(DEMO_TRAIN)}}, 3600
        ).json()
    if body["status"] != "succeeded":
        print(f"training {body['status']}: {body.get('error')}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in body["output"].items() if k != "weights"}
    archive = save_data_uri(body["output"]["weights"], out / "weights.tar")
    print(f"    trained: {summary}; weights: {archive}", flush=True)

    print(f"2/3 asking {len(questions)} held-out questions of the bare base model", flush=True)
    with CogServer("predict", log_path=out / "cog-base.log") as bare:
        base_answers = ask_all(bare, questions, args.max_new_tokens)
    print("3/3 asking them of the trained version (COG_WEIGHTS = the archive)", flush=True)
    with CogServer("predict", weights=str(archive), log_path=out / "cog-tuned.log") as tuned:
        tuned_answers = ask_all(tuned, questions, args.max_new_tokens)

    rows = [
        (q, r.output, b, t) for q, r, b, t in zip(questions, held, base_answers, tuned_answers, strict=True)
    ]
    report = table(rows)
    (out / "demo.md").write_text(report + "\n", encoding="utf-8")
    print()
    for q, expected, b, t in rows:
        print(f"Q: {q}\n   expected: {expected}\n   base:     {textwrap.shorten(b, 100)}\n   tuned:    {t}\n")
    print(
        f"done in {time.monotonic() - started:.0f} s; table: {out / 'demo.md'}; "
        f"try it: make predict WEIGHTS={archive} PROMPT='What is your name?'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
