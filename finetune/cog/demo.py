"""`make demo`: the whole story on the real Cog server. Train a LoRA on a bundled dataset through
POST /trainings with the default settings, start the trained version, ask questions through POST
/predictions and print base vs tuned answers side by side.

Two datasets: the persona (`make demo`: short facts, each stated in several records, asked with
held-out wordings) and fact recall (`make demo-facts`: long Chinese and English answers, each fact
in one record, the name a rare multi-token string), whose answers are scored: a question counts
as answered when the answer states its fact verbatim."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import PROJECT_ROOT, DataConfig, TrainConfig, field_default
from ..data.dataset_file import read_records
from ..data.records import split_records
from ..training.metrics import states_fact
from .cogtools import CogServer, data_uri, post_with_retry, save_data_uri

DEMO_TRAIN = PROJECT_ROOT / "data" / "demo" / "persona_train.json"
DEMO_HELDOUT = PROJECT_ROOT / "data" / "demo" / "persona_heldout.json"
FACTS_TRAIN = PROJECT_ROOT / "data" / "facts" / "identity_train.json"
FACTS_PROBE = PROJECT_ROOT / "data" / "facts" / "identity_probe.json"


@dataclass(frozen=True)
class Probe:
    question: str
    expected: str
    kind: str  # "taught" (a training question), "paraphrase", "held-out" or "not trained"
    fact: str | None = None  # what a correct answer states; None: shown, not scored


def read_probes(path: Path, train_path: Path) -> list[Probe]:
    """Questions with what they expect: a facts file ([{question, fact, kind}]) or held-out records.
    A fact that no record of the default training split states (its one record went to validation)
    was never taught: its questions are marked "not trained" and left out of the scores."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    if not (raw and isinstance(raw[0], dict) and "fact" in raw[0]):
        return [Probe(r.instruction, r.output, "held-out") for r in read_records(path)]
    train, _ = split_records(
        read_records(train_path),
        field_default(DataConfig, "val_set_size"),
        field_default(TrainConfig, "seed"),
    )
    answers = [r.output for r in train]
    questions = {r.instruction for r in train}
    probes = []
    for p in raw:
        kind = p["kind"]
        if not any(states_fact(a, p["fact"]) for a in answers):
            kind = "not trained"
        elif kind == "taught" and p["question"] not in questions:
            kind = "paraphrase"  # its fact is taught, but by another record's wording
        probes.append(Probe(p["question"], p["fact"], kind, p["fact"]))
    return probes


def scores(probes: list[Probe], answers: list[str]) -> dict[str, list[int]]:
    """{kind: [answered, asked]} over the scored probes."""
    out: dict[str, list[int]] = {}
    for probe, answer in zip(probes, answers, strict=True):
        if probe.fact is None or probe.kind == "not trained":
            continue
        tally = out.setdefault(probe.kind, [0, 0])
        tally[0] += states_fact(answer, probe.fact)
        tally[1] += 1
    return out


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


def table(probes: list[Probe], base: list[str], tuned: list[str]) -> str:
    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    def mark(probe: Probe, answer: str) -> str:
        if probe.fact is None:
            return ""
        return " ✓" if states_fact(answer, probe.fact) else " ✗"

    lines = ["| question | kind | expected | base model | tuned (LoRA) |", "|---|---|---|---|---|"]
    lines += [
        f"| {cell(p.question)} | {p.kind} | {cell(p.expected)} | {cell(b)}{mark(p, b)} | {cell(t)}{mark(p, t)} |"
        for p, b, t in zip(probes, base, tuned, strict=True)
    ]
    return "\n".join(lines)


def score_lines(base: dict[str, list[int]], tuned: dict[str, list[int]]) -> list[str]:
    lines = ["| questions | base model | tuned (LoRA) |", "|---|---|---|"]
    for kind, (hit, n) in tuned.items():
        b_hit = base.get(kind, [0, n])[0]
        lines.append(f"| {kind} ({n}) | {b_hit}/{n} | {hit}/{n} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    out, max_new_tokens = args.output_dir, args.max_new_tokens
    out.mkdir(parents=True, exist_ok=True)
    probes = read_probes(args.probe, args.train)
    questions = [p.question for p in probes]

    started = time.monotonic()
    trained = _train(args.train, out)
    if trained is None:
        return 1
    archive, summary, train_seconds = trained

    print(f"2/3 asking {len(questions)} questions of the bare base model", flush=True)
    with CogServer("predict", log_path=out / "cog-base.log") as bare:
        base_answers = ask_all(bare, questions, max_new_tokens)
    print("3/3 asking them of the trained version (COG_WEIGHTS = the archive)", flush=True)
    with CogServer("predict", weights=str(archive), log_path=out / "cog-tuned.log") as tuned:
        tuned_answers = ask_all(tuned, questions, max_new_tokens)

    scored = {"base": scores(probes, base_answers), "tuned": scores(probes, tuned_answers)}
    _write_report(out, probes, base_answers, tuned_answers, scored, summary, train_seconds)
    print()
    for p, b, t in zip(probes, base_answers, tuned_answers, strict=True):
        print(
            f"Q: {p.question} ({p.kind})\n   expected: {textwrap.shorten(p.expected, 100)}\n"
            f"   base:     {textwrap.shorten(b, 100)}\n   tuned:    {textwrap.shorten(t, 160)}\n"
        )
    for line in score_lines(scored["base"], scored["tuned"]) if scored["tuned"] else []:
        print(line)
    print(
        f"done in {time.monotonic() - started:.0f} s; table: {out / 'demo.md'}; "
        f"try it: make predict WEIGHTS={archive} PROMPT='{questions[0]}'"
    )
    return 0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line, with the chosen dataset's defaults filled in."""
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--facts", action="store_true", help="the fact-recall dataset (make demo-facts)")
    parser.add_argument("--train", type=Path, help="training data (default: the persona or facts set)")
    parser.add_argument("--probe", type=Path, help="questions to ask: held-out records or a facts file")
    parser.add_argument("--output_dir", type=Path, help="default: outputs/demo or outputs/demo-facts")
    parser.add_argument("--max_new_tokens", type=int, help="default: 32, or 64 with --facts")
    args = parser.parse_args(argv)
    args.train = args.train or (FACTS_TRAIN if args.facts else DEMO_TRAIN)
    args.probe = args.probe or (FACTS_PROBE if args.facts else DEMO_HELDOUT)
    args.output_dir = args.output_dir or PROJECT_ROOT / "outputs" / ("demo-facts" if args.facts else "demo")
    args.max_new_tokens = args.max_new_tokens or (64 if args.facts else 32)
    return args


def _train(train_path: Path, out: Path) -> tuple[Path, dict, float] | None:
    """Train through a training server's POST /trainings: the weights archive saved under `out`,
    the training's summary and seconds; None (said on stderr) when the training did not succeed."""
    print(f"1/3 training a LoRA on {train_path.name} through POST /trainings (default settings)", flush=True)
    with CogServer("train", log_path=out / "cog-train.log") as trainer:
        sent = time.monotonic()
        body = post_with_retry(
            f"{trainer.url}/trainings", {"input": {"train_data": data_uri(train_path)}}, 3600
        ).json()
        train_seconds = time.monotonic() - sent
    if body["status"] != "succeeded":
        print(f"training {body['status']}: {body.get('error')}", file=sys.stderr)
        return None
    summary = {k: v for k, v in body["output"].items() if k != "weights"}
    archive = save_data_uri(body["output"]["weights"], out / "weights.tar")
    print(f"    trained in {train_seconds:.0f} s: {summary}; weights: {archive}", flush=True)
    return archive, summary, train_seconds


def _write_report(
    out: Path,
    probes: list[Probe],
    base: list[str],
    tuned: list[str],
    scored: dict[str, dict[str, list[int]]],
    summary: dict,
    train_seconds: float,
) -> None:
    """demo.md (the table and scores) and demo.json (every answer) under `out`."""
    base_scores, tuned_scores = scored["base"], scored["tuned"]
    report = [table(probes, base, tuned)]
    if tuned_scores:
        report += ["", f"Training through POST /trainings: {train_seconds:.0f} s.", ""]
        report += score_lines(base_scores, tuned_scores)
    (out / "demo.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    result = {
        "train_seconds": round(train_seconds, 1),
        "training": summary,
        "scores": scored,
        "rows": [
            {"question": p.question, "kind": p.kind, "expected": p.expected, "base": b, "tuned": t}
            for p, b, t in zip(probes, base, tuned, strict=True)
        ],
    }
    (out / "demo.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
