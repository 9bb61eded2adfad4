"""Does it learn? The demo persona dataset, trained with the default settings on the embedded
model, against its held-out questions (never trained on)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from finetune.data.dataset_file import read_records
from finetune.training.cli import config_from_args
from finetune.training.evaluation import compare, to_markdown
from finetune.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


# 54 records, ~60 optimizer steps: ~4 minutes where bf16 runs on AMX, ~12 in fp32 on an AVX2-only CPU,
# more than half the default suite's budget there. The fact-recall slice below covers learning with
# the defaults on every run; this whole-dataset check runs with `-m slow` (`make test-all`).
@pytest.mark.slow
def test_default_settings_learn_the_demo_persona(tmp_path, embedded_model_dir):
    out = tmp_path / "adapter"
    result = train(
        config_from_args(
            ["--data_path", str(ROOT / "data/demo/persona_train.json"), "--output_dir", str(out)], environ={}
        )
    )
    card = json.loads((out / "training_card.json").read_text())
    # The training card carries the base-vs-adapter validation figures.
    assert card["eval"]["val_loss"] < card["eval"]["base_val_loss"]
    assert set(card["eval"]["metrics"]) >= {
        "loss",
        "exact_match",
        "f1",
        "repetition_rate",
        "stopped_cleanly_rate",
    }
    training = result.card["training"]
    assert training["steps_rule"].startswith("num_epochs=auto: 30 epochs")  # 54 records: the 30-epoch cap
    assert training["steps"] <= training["planned_steps"]

    held = compare(None, out, read_records(ROOT / "data/demo/persona_heldout.json"))
    base, tuned = held["base"], held["adapter"]
    (tmp_path / "eval.md").write_text(to_markdown(held))
    assert tuned["loss"] <= 0.5 * base["loss"], (base["loss"], tuned["loss"])
    assert tuned["exact_match"] > base["exact_match"]
    assert tuned["f1"] > base["f1"] + 0.3
    assert tuned["stopped_cleanly_rate"] >= 0.9


# A slice of data/facts with its hard shape: long answers, the rare name 霁川 / Jichuan, fillers that
# never name it. `make demo-facts` runs the whole set with every default through the real server
# (docs/evaluation.md); here a step is the 4 training records (batch_size 4, half the time
# of the default 8), one per micro-batch: the loss is summed over the step's tokens either way, and
# unpadded rows (the longest is twice the shortest) made a step 12 % faster, same stop step.
FACT_SLICE = ["你叫什么名字？", "What is your name?", "你是谁？", "Can you write code?", "你会犯错吗？"]


def test_default_settings_recall_a_rare_name_taught_in_long_answers(tmp_path, embedded_model_dir):
    from finetune.cog.demo import FACTS_PROBE, read_probes, scores
    from finetune.config import GenerationSettings
    from finetune.data.records import split_records
    from finetune.serving.server import ModelServer

    by_question = {
        r["instruction"]: r for r in json.loads((ROOT / "data/facts/identity_train.json").read_text())
    }
    data = tmp_path / "facts.json"
    data.write_text(json.dumps([by_question[q] for q in FACT_SLICE], ensure_ascii=False), encoding="utf-8")
    _, val = split_records(read_records(data), 0.1, 42)
    assert [r.instruction for r in val] == ["Can you write code?"]  # the default split holds out a filler

    out = tmp_path / "adapter"
    args = [
        "--data_path",
        str(data),
        "--output_dir",
        str(out),
        "--batch_size",
        "4",
        "--micro_batch_size",
        "1",
    ]
    result = train(config_from_args(args, environ={}))
    training = result.card["training"]
    assert training["stopped_early"].endswith("every checked training answer is recalled exactly")
    assert training["kept_step"] == training["steps"] < training["planned_steps"]

    names = {"霁川", "Jichuan"}
    probes = [p for p in read_probes(FACTS_PROBE, data) if p.fact in names]
    # "Introduce yourself." is not in the slice: its question counts as a paraphrase here.
    assert [p.kind for p in probes].count("taught") == 3 and len(probes) == 8
    settings = GenerationSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0)

    def ask(server: ModelServer) -> list[str]:
        # As the trained version serves them: the engine batches the 8 questions, each with the text
        # it gets alone (tests/test_load.py), in a fraction of 8 solo generations' time.
        def one(question: str) -> str:
            return "".join(server.generate(question, settings=settings, prompt_template="alpaca"))

        with ThreadPoolExecutor(len(probes)) as pool:
            return list(pool.map(one, [p.question for p in probes]))

    tuned = scores(probes, ask(ModelServer(base_model=str(embedded_model_dir), adapter=str(out))))
    base = scores(probes, ask(ModelServer(base_model=str(embedded_model_dir))))
    assert base == {"taught": [0, 3], "paraphrase": [0, 5]}  # the bare base never says the name
    assert tuned["taught"] == [3, 3], tuned
    assert tuned["paraphrase"][0] >= 1, tuned
