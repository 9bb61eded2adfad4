"""Shared-context prefill: questions that follow the same long text, with the prefix cache on (the
default) and off, alternating question by question in one server (the defaults otherwise).

    python -m bench.prefix_worker SPEC.json OUT.json

The context is the first records of the bench data (instruction and answer each), put at the start
of the instruction, as a user would put a document before a question."""

from __future__ import annotations

import json
import sys
from statistics import median

from bench.common import data_path, read_json, setup_torch, write_json

QUESTIONS = [
    "How many are left?",
    "What is the total?",
    "Who bought the most?",
    "What was the price?",
    "How long did it take?",
    "Which number is largest?",
    "Summarize the first problem.",
    "What is 2+2?",
]


def main(spec_path: str, out_path: str) -> None:
    spec = read_json(spec_path)
    setup_torch(spec["device"], spec["threads"])
    from finetune.config import GenerationSettings
    from finetune.engine.requests import GenerationStats
    from finetune.serving.server import ModelServer

    records = json.loads(data_path().read_text(encoding="utf-8"))[: spec.get("records", 6)]
    context = "\n".join(f"{r['instruction']} {r['output']}" for r in records)
    server = ModelServer(device=spec["device"])
    limits = server.engine.limits
    cache_tokens = limits.prefix_tokens
    settings = GenerationSettings(max_new_tokens=4, temperature=0)
    ttft: dict[str, list[float]] = {"on": [], "off": []}
    texts: dict[str, list[str]] = {"on": [], "off": []}
    for i, question in enumerate(QUESTIONS):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
            limits.prefix_tokens = cache_tokens if mode == "on" else 0  # read by the engine per request
            stats = GenerationStats()
            text = "".join(
                server.generate(
                    f"{context}\n\nQuestion: {question}",
                    settings=settings,
                    prompt_template="alpaca",
                    stats=stats,
                )
            )
            ttft[mode].append(stats.time_to_first_token * 1000)
            texts[mode].append(text)
    prompt_tokens = len(server.tokenizer(context).input_ids)
    # The first question with the cache on prefills the context (nothing cached yet): left out.
    on, off = median(ttft["on"][1:]), median(ttft["off"][1:])
    write_json(
        out_path,
        {
            "context_tokens": prompt_tokens,
            "questions": len(QUESTIONS),
            "prefix_cache_tokens": cache_tokens,
            "prefill_chunk": limits.prefill_chunk,
            "ttft_ms_on": [round(t, 1) for t in ttft["on"]],
            "ttft_ms_off": [round(t, 1) for t in ttft["off"]],
            "ttft_ms_median_on": round(on, 1),
            "ttft_ms_median_off": round(off, 1),
            "ratio": round(on / off, 3),
            "same_texts": texts["on"] == texts["off"],
            "held_tokens": server.engine.prefixes.held,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
