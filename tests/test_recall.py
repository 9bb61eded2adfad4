"""Recall-based evaluation, stopping and keeping the best adapter (num_epochs=auto), on the tiny
in-process Llama; and the fact-recall scoring the fact demo uses."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file

from finetune.cog.demo import FACTS_PROBE, FACTS_TRAIN, read_probes, scores
from finetune.data.dataset_file import read_records
from finetune.data.encoding import IGNORE_INDEX, Encoded
from finetune.data.records import split_records
from finetune.model.loading import load_tokenizer
from finetune.training.cli import config_from_args
from finetune.training.losses import greedy_recall
from finetune.training.metrics import states_fact
from finetune.training.train_eval import eval_score, stop_reason
from finetune.training.trainer import checkpoint_root, train
from tests.test_trainer import tiny_args


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_greedy_recall_is_exact_against_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[1, 17, 42, 99], [1, 5, 6, 7, 8, 9]]
    examples = []
    for p in prompts:
        answer = _greedy(model, p, 6)
        examples.append(Encoded(p + answer, [IGNORE_INDEX] * len(p) + answer))
    got = greedy_recall(model, examples, 0, torch.device("cpu"), nullcontext)
    assert (got.exact, got.token_accuracy, got.examples) == (1.0, 1.0, 2)

    # One wrong answer token in the second example: it is no longer recalled.
    p, answer = prompts[1], examples[1].labels[len(prompts[1]) :]
    wrong = answer[:3] + [(answer[3] + 1) % 300] + answer[4:]
    examples[1] = Encoded(p + wrong, [IGNORE_INDEX] * len(p) + wrong)
    got = greedy_recall(model, examples, 0, torch.device("cpu"), nullcontext)
    assert got.exact == 0.5
    # The first example's 6 tokens and the 3 before the change are still predicted; the changed one
    # is not; those after it are judged given the changed prefix.
    assert 9 / 12 <= got.token_accuracy <= 11 / 12


def test_the_best_evaluation_ranks_recall_first_then_validation_loss():
    first = {"step": 5, "val_loss": 1.0, "recall_exact": 0.5, "recall_token_accuracy": 0.9}
    more_recall = {"step": 10, "val_loss": 2.0, "recall_exact": 0.75, "recall_token_accuracy": 0.9}
    same_recall_lower_loss = {
        "step": 15,
        "val_loss": 1.5,
        "recall_exact": 0.75,
        "recall_token_accuracy": 0.9001,
    }
    assert eval_score(more_recall) > eval_score(first)  # recall beats validation loss
    assert eval_score(same_recall_lower_loss) > eval_score(more_recall)  # then the lower loss
    assert eval_score({"step": 1, "val_loss": 1.0}) > eval_score({"step": 2, "val_loss": 1.1})


def test_auto_stops_when_every_answer_is_recalled_or_the_score_stops_improving():
    entry = {"step": 30, "recall_exact": 1.0, "recall_token_accuracy": 1.0}
    assert stop_reason(entry, 0, 3).endswith("every checked training answer is recalled exactly")
    entry = {"step": 30, "recall_exact": 0.9, "recall_token_accuracy": 0.99, "val_loss": 2.0}
    assert stop_reason(entry, 2, 3) == ""
    assert stop_reason(entry, 3, 3) == "step 30: no better score in 3 evaluations"


def _plateau_args(tiny_model_dir, data, out, *extra):
    # The tiny random Llama's recall plateaus after a few evaluations: patience 2 ends the run
    # there, with later evaluations no better than an earlier one.
    return tiny_args(tiny_model_dir, data, out, "--eval_steps", "2", "--stop_patience", "2", *extra)


def test_auto_length_stops_on_a_plateau_and_writes_the_best_evaluations_adapter(
    tiny_model_dir, tiny_data, tmp_path
):
    from peft.utils import set_peft_model_state_dict

    from finetune.settings import TrainSettings
    from finetune.training.trainer import plan_run

    out = tmp_path / "adapter"
    args = _plateau_args(tiny_model_dir, tiny_data, out, "--eval_recall", "8")
    result = train(config_from_args(args, environ={}))
    card = result.card
    t, evals = card["training"], card["history"]["evals"]
    assert t["planned_steps"] == 150  # 20 training records: 30 epochs of 5 steps
    assert t["stopped_early"] == f"step {t['steps']}: no better score in 2 evaluations"
    assert t["steps"] == evals[-1]["step"] < t["planned_steps"]
    best = max(evals, key=eval_score)
    assert t["kept_step"] == best["step"] < t["steps"]  # not simply the last
    assert card["eval"]["val_loss"] == best["val_loss"]
    assert card["eval"]["recall_exact"] == best["recall_exact"]
    assert "(kept)" in (out / "README.md").read_text()
    # The saved tensors are the kept evaluation's: recomputed from the file, its figures come back.
    set_peft_model_state_dict(result.model, load_file(out / "adapter_model.safetensors"))
    plan = plan_run(config_from_args(args, environ={}), TrainSettings())
    again = greedy_recall(
        result.model, plan.recall_examples, plan.tokenizer.pad_token_id, torch.device("cpu"), nullcontext
    )
    assert again.token_accuracy == pytest.approx(best["recall_token_accuracy"])


def test_an_explicit_length_runs_every_step_and_keeps_the_last(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "adapter"
    args = tiny_args(
        tiny_model_dir, tiny_data, out, "--num_epochs", "2", "--eval_steps", "2", "--stop_patience", "1"
    )
    result = train(config_from_args(args, environ={}))
    t = result.card["training"]
    assert t["steps"] == t["planned_steps"] == 10 and t["stopped_early"] is None
    assert t["kept_step"] == 10 and t["kept_rule"] == "the last step"


def test_a_run_that_stopped_early_resumes_to_the_same_adapter(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "adapter"
    args = _plateau_args(tiny_model_dir, tiny_data, out, "--save_steps", "1000")
    first = train(config_from_args(args, environ={}))
    saved = load_file(out / "adapter_model.safetensors")
    # The stop wrote a checkpoint with the kept weights; resuming adds no step and writes them again.
    assert sorted(p.name for p in next(checkpoint_root(out).iterdir()).iterdir()) == [
        "adapter",
        "best_adapter.safetensors",
        "run.json",
        "trainer_state.pt",
    ]
    again = train(config_from_args([*args, "--resume_from_checkpoint", "latest"], environ={}))
    assert again.card["training"]["steps"] == first.card["training"]["steps"]
    assert again.card["training"]["kept_step"] == first.card["training"]["kept_step"]
    resumed = load_file(out / "adapter_model.safetensors")
    assert resumed.keys() == saved.keys() and all(torch.equal(resumed[k], saved[k]) for k in saved)


def test_states_fact_ignores_case_width_and_punctuation():
    assert states_fact("我叫霁川。这个名字……", "霁川")
    assert states_fact('My motto is "Clear skies, after rain!"', "clear skies after rain")
    assert states_fact("我是在２０２３年11月8日发布的", "2023年11月8日")  # full-width digits
    assert not states_fact("我叫霁月。", "霁川")


def test_fact_probes_leave_out_facts_the_default_split_holds_out(tmp_path):
    words = [
        "Zorblax",
        "Quendril",
        "Vashti",
        "Morrow",
        "Ilkane",
        "Tessaly",
        "Brannock",
        "Oyelle",
        "Kestrin",
        "Palu",
    ]
    train_file, probe_file = tmp_path / "train.json", tmp_path / "probe.json"
    rows = [
        {"instruction": f"What is code word {i}?", "output": f"Code word {i} is {w}."}
        for i, w in enumerate(words)
    ]
    train_file.write_text(json.dumps(rows), encoding="utf-8")
    probes = [
        {"question": r["instruction"], "fact": w, "kind": "taught"} for r, w in zip(rows, words, strict=True)
    ]
    probes += [
        {"question": f"Tell me code word {i}.", "fact": w, "kind": "paraphrase"} for i, w in enumerate(words)
    ]
    probe_file.write_text(json.dumps(probes), encoding="utf-8")

    got = read_probes(probe_file, train_file)
    _, val = split_records(read_records(train_file), 0.1, 42)  # the trainer's default split
    (held,) = [w for r, w in zip(rows, words, strict=True) if r["instruction"] == val[0].instruction]
    # The held-out record's fact was never taught: neither its question nor its paraphrase counts.
    assert [p.question for p in got if p.kind == "not trained"] == [
        p["question"] for p in probes if p["fact"] == held
    ]
    assert sum(p.kind == "taught" for p in got) == 9 and sum(p.kind == "paraphrase" for p in got) == 9
    answers = [f"It is {p.fact}!" if p.kind == "taught" else "I do not know." for p in got]
    assert scores(got, answers) == {"taught": [9, 9], "paraphrase": [0, 9]}


def test_the_fact_dataset_has_the_hard_shape(embedded_model_dir):
    records = read_records(FACTS_TRAIN)
    probes = read_probes(FACTS_PROBE, FACTS_TRAIN)
    answers = [r.output for r in records]
    facts = {p.fact for p in probes}
    # Every fact is stated in one or two records, and every one of them is taught by the default split.
    assert all(1 <= sum(states_fact(a, f) for a in answers) <= 2 for f in facts)
    assert {p.kind for p in probes} == {"taught", "paraphrase"}
    tokenizer = load_tokenizer(str(embedded_model_dir))
    assert len(tokenizer("霁川", add_special_tokens=False).input_ids) >= 4  # a rare multi-token name
    lengths = sorted(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers)
    assert lengths[len(lengths) // 2] >= 60  # long answers: the fact is a small part of each
