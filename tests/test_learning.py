"""Does it learn? The demo persona dataset, trained with the default settings on the embedded
model, against its held-out questions (never trained on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.cli import config_from_args
from finetune.evaluation import compare, to_markdown
from finetune.records import read_records
from finetune.trainer import train

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


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
    assert result.card["training"]["steps"] >= 60

    held = compare(None, out, read_records(ROOT / "data/demo/persona_heldout.json"))
    base, tuned = held["base"], held["adapter"]
    (tmp_path / "eval.md").write_text(to_markdown(held))
    assert tuned["loss"] <= 0.5 * base["loss"], (base["loss"], tuned["loss"])
    assert tuned["exact_match"] > base["exact_match"]
    assert tuned["f1"] > base["f1"] + 0.3
    assert tuned["stopped_cleanly_rate"] >= 0.9
