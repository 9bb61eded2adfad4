"""Held-out evaluation on the tiny in-process model: figures agree with the training loss and the
metric functions, the adapter column really differs, and the CLI writes its reports."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext

import pytest
import torch
from conftest import alpaca_records

from finetune.__main__ import main as finetune_main
from finetune.data.batching import collate_padded
from finetune.data.dataset_file import parse_records
from finetune.data.encoding import encode_example
from finetune.data.prompts import load_template, save_template, split_record
from finetune.data.records import DatasetError
from finetune.engine.requests import GenerationStats
from finetune.model.loading import load_tokenizer
from finetune.training import evaluation
from finetune.training.losses import token_loss_sum
from finetune.training.metrics import exact_match, repeated_ngram_loop, token_f1

TOKENS = 6  # generated tokens per record: enough to exercise generation, cheap on CPU


def records_of(rows: list[dict[str, str]]):
    return parse_records(json.dumps(rows).encode(), "held_out.json")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter that visibly changes the model: lora_B set away from its zero init."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    save_template(load_template("alpaca_short"), folder)
    return folder


def test_figures_match_training_loss_and_metric_functions(tiny):
    model, tokenizer = tiny
    records = records_of(alpaca_records(5))
    template = load_template("alpaca")
    model.train()  # the caller's mode is restored afterwards
    result = evaluation.evaluate_model(
        model, tokenizer, records, template, cutoff_len=256, max_new_tokens=TOKENS
    )
    assert model.training

    # Hand-computed: one padded batch of the training encoding through the trainer's loss.
    encoded = [
        encode_example(
            *split_record(r, template, tokenizer), tokenizer, 256, train_on_inputs=False, add_eos_token=True
        )
        for r in records
    ]
    with torch.no_grad():
        total, n = token_loss_sum(
            model.eval(), collate_padded(encoded, tokenizer.pad_token_id), torch.device("cpu"), nullcontext
        )
    assert result["loss"] == pytest.approx(total.item() / n, rel=1e-5)
    assert result["trained_tokens"] == n
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert result["records"] == len(result["rows"]) == 5

    for record, row in zip(records, result["rows"], strict=True):
        assert row["expected"] == record.output
        assert row["em"] == exact_match(row["generated"], row["expected"])
        assert row["f1"] == token_f1(row["generated"], row["expected"])
        assert row["looped"] == repeated_ngram_loop(row["generated"])
    for key, flag in [
        ("exact_match", "em"),
        ("f1", "f1"),
        ("repetition_rate", "looped"),
        ("stopped_cleanly_rate", "stopped"),
    ]:
        assert 0.0 <= result[key] <= 1.0
        assert result[key] == pytest.approx(sum(row[flag] for row in result["rows"]) / 5)
    assert result["rows"][1]["instruction"] == records[1].instruction


def test_generation_is_greedy_and_scored_against_the_expected_text(tiny):
    model, tokenizer = tiny
    template = load_template("alpaca")
    first = evaluation.evaluate_model(
        model, tokenizer, records_of(alpaca_records(3)), template, max_new_tokens=TOKENS
    )
    # Expect exactly what the model said (greedy, so it says it again): every answer matches.
    echoed = [
        {"instruction": row["instruction"], "output": row["generated"]}
        for row in first["rows"]
        if row["generated"].strip()
    ]
    assert echoed, "the tiny model generated nothing at all"
    again = evaluation.evaluate_model(model, tokenizer, records_of(echoed), template, max_new_tokens=TOKENS)
    assert again["exact_match"] == again["f1"] == 1.0


def test_stopped_flag_follows_the_generation_stop_reason(tiny, monkeypatch):
    model, tokenizer = tiny
    reasons = iter(["eos", "length", "stop_sequence", "eos"])

    def fake_stream(model, tokenizer, prompt, settings, stats: GenerationStats):
        assert settings.temperature == 0 and settings.max_new_tokens == TOKENS
        stats.stop_reason = next(reasons)
        yield "ha ha ha ha ha ha ha ha ha ha ha ha ha"

    monkeypatch.setattr(evaluation, "stream_tokens", fake_stream)
    result = evaluation.evaluate_model(
        model, tokenizer, records_of(alpaca_records(4)), load_template("alpaca"), max_new_tokens=TOKENS
    )
    assert [row["stopped"] for row in result["rows"]] == [True, False, False, True]
    assert result["stopped_cleanly_rate"] == 0.5
    assert result["repetition_rate"] == 1.0


def test_plain_text_records_are_refused():
    with pytest.raises(DatasetError, match="no prompt to answer"):
        evaluation.check_records(records_of([{"text": "just text"}]))


def test_compare_scores_base_and_adapter_with_the_adapter_template(tiny_model_dir, adapter_dir):
    records = records_of(alpaca_records(4))
    both = evaluation.compare(str(tiny_model_dir), adapter_dir, records, max_new_tokens=TOKENS)
    assert both["template"] == "alpaca_short"  # the adapter's own, saved next to it
    assert both["adapter"]["loss"] != pytest.approx(both["base"]["loss"], rel=1e-3)
    # The disabled adapter is the bare base: same figures as a run without any adapter.
    bare = evaluation.compare(
        str(tiny_model_dir), None, records, template_name="alpaca_short", max_new_tokens=TOKENS
    )
    assert bare["adapter"] is None
    assert bare["base"]["loss"] == pytest.approx(both["base"]["loss"], rel=1e-5)
    assert [r["generated"] for r in bare["base"]["rows"]] == [r["generated"] for r in both["base"]["rows"]]
    assert evaluation.compare(str(tiny_model_dir), None, records, max_new_tokens=1)["template"] == "alpaca"


def test_evaluate_peft_bounds_the_work_and_keeps_few_rows(tiny_model_dir, adapter_dir, tiny):
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM

    _, tokenizer = tiny
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    model.train()
    result = evaluation.evaluate_peft(
        model,
        tokenizer,
        records_of(alpaca_records(5)),
        load_template("alpaca"),
        max_new_tokens=TOKENS,
        max_records=3,
        examples=2,
    )
    assert result["base"]["records"] == result["adapter"]["records"] == 3
    assert len(result["base"]["rows"]) == len(result["adapter"]["rows"]) == 2
    assert result["adapter"]["loss"] != pytest.approx(result["base"]["loss"], rel=1e-3)
    # Left as the trainer had it: training mode, adapter enabled.
    assert model.training
    assert not any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert "| metric | base | adapter |" in evaluation.to_markdown(result)


def test_markdown_escapes_cells_and_shows_base_only_without_adapter():
    row = {"instruction": "a | b\nc", "expected": "x", "generated": "y\r\nz", "loss": 1.0}
    figures = {
        "loss": 1.5,
        "perplexity": math.exp(1.5),
        "exact_match": 0.0,
        "f1": 0.25,
        "repetition_rate": 0.0,
        "stopped_cleanly_rate": 1.0,
        "records": 1,
        "rows": [row],
    }
    md = evaluation.to_markdown({"base": figures, "adapter": None, "template": "alpaca"})
    assert "| metric | base |\n" in md
    assert "| token F1 | 0.2500 |" in md
    assert "| a \\| b<br>c | x | y<br>z |" in md
    assert "adapter" not in md


def test_cli_writes_json_and_markdown(tiny_model_dir, adapter_dir, tmp_path, capsys):
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(alpaca_records(3)), encoding="utf-8")
    out = tmp_path / "eval"
    code = evaluation.main(
        [
            "--base_model",
            str(tiny_model_dir),
            "--adapter",
            str(adapter_dir),
            "--data",
            str(data),
            "--max_new_tokens",
            str(TOKENS),
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads((out / "eval.json").read_text(encoding="utf-8"))
    md = (out / "eval.md").read_text(encoding="utf-8")
    assert md in capsys.readouterr().out
    assert "| metric | base | adapter |" in md
    assert result["data"] == str(data) and result["template"] == "alpaca_short"
    for key in ("loss", "perplexity", "exact_match", "f1"):
        for side in ("base", "adapter"):
            assert f"{result[side][key]:.4f}" in md
    assert len(result["adapter"]["rows"]) == 3


def test_cli_bad_data_exits_2_naming_the_record_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "held_out.json"
    data.write_text(
        json.dumps([{"instruction": "Hi", "output": "Hello"}, {"instruction": "Bye"}]), encoding="utf-8"
    )
    out = tmp_path / "eval"
    code = finetune_main(
        ["eval", "--base_model", str(tiny_model_dir), "--data", str(data), "--output_dir", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "record 2" in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_missing_adapter_exits_2(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "held_out.json"
    data.write_text(json.dumps(alpaca_records(1)), encoding="utf-8")
    out = tmp_path / "eval"
    code = evaluation.main(
        [
            "--base_model",
            str(tiny_model_dir),
            "--adapter",
            str(tmp_path / "nope"),
            "--data",
            str(data),
            "--output_dir",
            str(out),
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
    assert not out.exists()
