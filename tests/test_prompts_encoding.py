"""Templates, encoding (literal tensors), batching and the packed-equals-padded loss contract."""

from __future__ import annotations

import pytest
import torch

from finetune.data import prompts
from finetune.data.batching import collate_packed, collate_padded, micro_batches
from finetune.data.encoding import IGNORE_INDEX, Encoded, encode_example
from finetune.data.records import Message, Record
from finetune.model.adapter_folder import template_from_adapter


class CharTokenizer:
    """One id per character (ord), BOS=1 and EOS=2: makes expected tensors easy to write by hand."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __init__(self, add_bos: bool = True) -> None:
        self.add_bos = add_bos

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids}


def test_alpaca_templates_render_with_and_without_input():
    t = prompts.load_template("alpaca")
    with_input = t.render("Add", "2 and 3")
    assert with_input.endswith("### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert t.render("Add").endswith("### Instruction:\nAdd\n\n### Response:\n")
    assert prompts.load_template("alpaca_legacy").render("Add").endswith("### Response:")
    assert prompts.load_template("alpaca_short").render("Add") == "### Instruction:\nAdd\n\n### Response:\n"
    assert t.get_response(with_input + "Five.") == "Five."


def test_every_packaged_template_loads_and_unknown_names_fail():
    assert set(prompts.available_templates()) == {"alpaca", "alpaca_legacy", "alpaca_short", "chat"}
    with pytest.raises(prompts.TemplateError, match="choose one of alpaca"):
        prompts.load_template("vicuna")


def test_chat_template_uses_the_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = prompts.load_template("chat").render("Hi", "there", tok)
    assert text == "<|user|>Hi\n\nthere</s><|assistant|>"
    with pytest.raises(prompts.TemplateError, match="chat template"):
        prompts.load_template("chat").render("Hi", tokenizer=CharTokenizer())


def test_template_travels_with_the_adapter(tmp_path):
    t = prompts.load_template("alpaca_short")
    prompts.save_template(t, tmp_path)
    assert template_from_adapter(tmp_path) == t
    assert template_from_adapter(tmp_path / "missing") is None


def test_split_record_for_each_shape(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    t = prompts.load_template("alpaca_short")
    assert prompts.split_record(Record("alpaca", instruction="I", output="O"), t, tok) == (
        "### Instruction:\nI\n\n### Response:\n",
        "O",
    )
    assert prompts.split_record(Record("completion", prompt="P", output="C"), t, tok) == ("P", "C")
    msgs = (Message("user", "Q"), Message("assistant", "A"))
    assert prompts.split_record(Record("messages", messages=msgs), t, tok) == (
        "<|user|>Q</s><|assistant|>",
        "A",
    )
    assert prompts.split_record(Record("text", text="T"), t, tok) == ("", "T")


def test_encoding_masks_the_prompt_and_appends_eos():
    e = encode_example("ab", "cd", CharTokenizer(), cutoff_len=64)
    assert e.input_ids == [1, 97, 98, 99, 100, 2]
    assert e.labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 99, 100, 2]
    assert e.trained_tokens == 3 and not e.truncated


def test_encoding_train_on_inputs_and_no_eos():
    e = encode_example("ab", "cd", CharTokenizer(), cutoff_len=64, train_on_inputs=True, add_eos_token=False)
    assert e.input_ids == [1, 97, 98, 99, 100]
    assert e.labels == [1, 97, 98, 99, 100]


def test_truncation_cuts_the_prompt_middle_and_keeps_eos():
    e = encode_example("abcdefghij", "xyz", CharTokenizer(), cutoff_len=8)
    # 11 prompt ids + 4 response ids -> budget 4 for the prompt: 2 from the head, 2 from the tail.
    assert e.input_ids == [1, 97, 105, 106, 120, 121, 122, 2]
    assert e.labels[-4:] == [120, 121, 122, 2] and e.labels[:4] == [IGNORE_INDEX] * 4
    assert e.truncated


def test_overlong_response_keeps_its_end_and_eos():
    e = encode_example("abcdefgh", "0123456789", CharTokenizer(), cutoff_len=8)
    # A quarter of the budget stays for the prompt's tail; the response keeps its last tokens + EOS.
    assert len(e.input_ids) == 8
    assert e.input_ids == [ord("g"), ord("h"), ord("5"), ord("6"), ord("7"), ord("8"), ord("9"), 2]
    assert e.labels[-1] == 2


def test_plain_text_records_get_bos_without_a_prompt():
    e = encode_example("", "hi", CharTokenizer(), cutoff_len=16)
    assert e.input_ids == [1, 104, 105, 2]
    assert e.labels == [IGNORE_INDEX, 104, 105, 2]


def test_collate_padded_literal_tensors():
    a = Encoded([5, 6, 7], [IGNORE_INDEX, 6, 7])
    b = Encoded([8, 9], [IGNORE_INDEX, 9])
    batch = collate_padded([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert collate_padded([b], pad_id=0, pad_to_multiple_of=4)["input_ids"].tolist() == [[8, 9, 0, 0]]


def test_collate_packed_literal_tensors():
    a = Encoded([5, 6, 7], [5, 6, 7])
    b = Encoded([8, 9], [8, 9])
    batch = collate_packed([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # No label is predicted across the boundary from a's last token to b's first.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]


def test_micro_batches_are_deterministic_and_cover_every_example():
    examples = [Encoded([1] * n, [1] * n) for n in range(1, 23)]
    first = micro_batches(examples, 4, seed=3, epoch=0)
    assert first == micro_batches(examples, 4, seed=3, epoch=0)
    assert first != micro_batches(examples, 4, seed=3, epoch=1)
    assert sorted(i for b in first for i in b) == list(range(22))
    grouped = micro_batches(examples, 4, seed=3, epoch=0, group_by_length=True)
    spread = [max(len(examples[i]) for i in b) - min(len(examples[i]) for i in b) for b in grouped]
    assert max(spread) <= 3  # sorted within the window: neighbours have close lengths
    ranks = [micro_batches(examples, 4, 3, 0, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # 6 micro-batches (the last holds 2) split over 2 ranks
    assert not set(map(tuple, ranks[0])) & set(map(tuple, ranks[1]))


def test_a_steps_micro_batches_are_regrouped_by_length_with_the_same_examples():
    examples = [Encoded([1] * n, [1] * n) for n in (5, 40, 7, 33, 12, 9, 28, 3, 21, 16, 2)]
    plain = micro_batches(examples, 2, seed=1, epoch=0)
    steps = micro_batches(examples, 2, seed=1, epoch=0, per_step=3)
    assert [len(b) for b in steps] == [len(b) for b in plain]  # 5 full micro-batches and a last of 1
    for start in (0, 3):  # each step of 3 micro-batches keeps its examples, now longest first
        mine = [i for b in steps[start : start + 3] for i in b]
        assert sorted(mine) == sorted(i for b in plain[start : start + 3] for i in b)
        assert [len(examples[i]) for i in mine] == sorted((len(examples[i]) for i in mine), reverse=True)
    padded = [sum(len(b) * max(len(examples[i]) for i in b) for b in x) for x in (plain, steps)]
    assert padded[1] < padded[0]


def test_packed_loss_equals_padded_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.training.losses import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (5, 9, 3):
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]))
    from contextlib import nullcontext

    with torch.no_grad():
        padded, n_pad = token_loss_sum(model, collate_padded(examples, 0), torch.device("cpu"), nullcontext)
        packed, n_pack = token_loss_sum(model, collate_packed(examples), torch.device("cpu"), nullcontext)
    assert n_pad == n_pack == sum(n - 2 for n in (5, 9, 3))
    assert torch.allclose(padded, packed, atol=1e-4), (padded, packed)


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def test_a_chat_template_that_writes_bos_gets_exactly_one(tmp_path):
    """Llama 2/3 and Mistral templates start with {{ bos_token }}; the tokenizer adds BOS as well."""
    from conftest import train_llama_sentencepiece
    from transformers import LlamaTokenizerFast

    from finetune.data.encoding import encode_prompt

    lines = ["what is the capital of france? paris is the capital of france."] * 50
    (tmp_path / "tokenizer.model").write_bytes(train_llama_sentencepiece(lines, vocab_size=300))
    tok = LlamaTokenizerFast.from_pretrained(
        str(tmp_path), bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True
    )
    tok.chat_template = MISTRAL_TEMPLATE
    prompt = prompts.load_template("chat").render("what is the capital of france?", "", tok)
    assert prompt.startswith("<s>[INST]")
    assert tok(prompt)["input_ids"][:2] == [tok.bos_token_id] * 2  # what a plain call gives
    served = encode_prompt(tok, prompt)
    trained = encode_example(prompt, "paris.", tok, cutoff_len=256).input_ids
    for ids in (served, trained):
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert served == trained[: len(served)]
    plain = encode_prompt(tok, "what is the capital of france?")  # no BOS in the text: the tokenizer adds it
    assert plain[0] == tok.bos_token_id and plain.count(tok.bos_token_id) == 1
