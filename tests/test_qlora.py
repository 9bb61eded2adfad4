"""QLoRA on a CPU (bitsandbytes' CPU backend), 4-bit and 8-bit: training lowers the loss on a
quantized base, the adapter it saves loads back bit for bit, and the server on a quantized base
(SERVE_QUANT=bnb4|bnb8) serves the setup adapter and a per-request adapter unmerged, with the text
transformers' `generate` gives for the same base and adapter.

The base here is a tiny Llama 64 wide (the shared one is 32): on CPUs with AVX512-BF16,
bitsandbytes repacks 4-bit weights for its bf16 kernel only where the inputs are a multiple of
its 64-weight block, and the server should run that kernel as it would on a real model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_SHAPE, alpaca_records, build_tokenizer
from safetensors.torch import load_file

from finetune.config import GenerationSettings
from finetune.data.encoding import encode_prompt
from finetune.model.loading import (
    ModelError,
    Precision,
    attach_adapter,
    bitsandbytes_config,
    is_bitsandbytes_model,
    load_base,
    load_for_training,
    load_tokenizer,
)
from finetune.training.cli import config_from_args
from finetune.training.trainer import train

CPU = torch.device("cpu")
FP32 = Precision(torch.float32, torch.float32)
MODES = {"4bit": "bnb4", "8bit": "bnb8"}  # training's quantization -> the server's SERVE_QUANT
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0)
PROMPTS = ["What is 3 plus 4?", "What is 6 plus 2?"]


def bnb_layer(quantization: str) -> type:
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    return Linear4bit if quantization == "4bit" else Linear8bitLt


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-64")
    tok = build_tokenizer(folder)
    torch.manual_seed(0)
    shape = {**TINY_SHAPE, "hidden_size": 64, "intermediate_size": 128}
    config = LlamaConfig(
        vocab_size=len(tok),
        **shape,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def trained(request, base_dir, tmp_path_factory):
    """One short training run per quantization, with an evaluation half way (eval mode, no grad:
    where bitsandbytes would repack 4-bit weights on an AVX512-BF16 CPU)."""
    root = tmp_path_factory.mktemp(f"qlora-{request.param}")
    data = root / "data.json"
    data.write_text(json.dumps(alpaca_records(24)), encoding="utf-8")
    out = root / "adapter"
    args = ["--base_model", str(base_dir), "--data_path", str(data), "--output_dir", str(out)]
    args += ["--quantization", request.param, "--max_steps", "10", "--eval_steps", "5"]
    args += ["--micro_batch_size", "2", "--batch_size", "4", "--val_set_size", "4"]
    args += ["--learning_rate", "1e-2", "--lora_r", "4", "--eval_recall", "0", "--eval_generate", "0"]
    return request.param, train(config_from_args(args, environ={})), out


def test_training_on_a_quantized_base_lowers_the_loss(trained):
    quantization, result, _ = trained
    # The base the run trained is the quantized one: every linear layer under LoRA is bitsandbytes'.
    assert is_bitsandbytes_model(result.model)
    layers = [m.base_layer for name, m in result.model.named_modules() if name.endswith("q_proj")]
    assert len(layers) == 2 and all(isinstance(m, bnb_layer(quantization)) for m in layers)
    losses = [s["loss"] for s in result.card["history"]["steps"]]
    assert len(losses) == 10
    assert sum(losses[-3:]) < sum(losses[:3]) and losses[-1] < losses[0]
    assert result.card["eval"]["val_loss"] < result.card["eval"]["base_val_loss"]


def test_the_saved_adapter_loads_back_with_the_same_tensors(trained, base_dir):
    from peft.utils import get_peft_model_state_dict

    quantization, result, out = trained
    trained_tensors = get_peft_model_state_dict(result.model)
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == trained_tensors.keys() and len(saved) == 2 * 7 * 2  # all-linear, A and B
    assert all(torch.equal(saved[k], v.cpu()) for k, v in trained_tensors.items())
    assert all(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)  # B starts at 0: it learned
    model = attach_adapter(load_base(str(base_dir), CPU, FP32, quantization), out)
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_an_evaluation_pass_leaves_the_gradients_as_they_were(base_dir):
    """bitsandbytes' repacked 4-bit CPU kernel has no backward: had an evaluation pass repacked the
    weights, the gradients after it would miss every path through a base layer (measured: wrong
    values where LoRA offers another path, None where it does not)."""
    from finetune.config import LoraSettings

    model = load_for_training(
        str(base_dir), CPU, FP32, LoraSettings(lora_r=4, lora_dropout=0.0), quantization="4bit"
    )
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * 7 * 2
    with torch.no_grad():  # B starts at 0, which would hide A's gradient
        for name, p in lora.items():
            if "lora_B" in name:
                p.normal_(0, 0.1)

    def gradients() -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in lora.items()}

    model.train()
    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    after = gradients()
    assert all(g is not None and g.abs().sum() > 0 for g in before.values())
    assert [n for n in lora if after[n] is None or not torch.equal(after[n], before[n])] == []


def test_a_4bit_base_too_narrow_to_repack_still_runs(tiny_model_dir):
    """The shared tiny Llama is 32 wide, under bitsandbytes' 64-weight block: repacking it for the
    CPU kernel would fail, so those layers keep the plain 4-bit path."""
    model = load_base(str(tiny_model_dir), CPU, FP32, "4bit").eval()
    layers = [m for m in model.modules() if isinstance(m, bnb_layer("4bit"))]
    assert len(layers) == 2 * 7
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    narrow = [m for m in layers if m.in_features % 64]
    assert narrow and not any(m.support_avx512bf16_for_cpu for m in narrow)


def random_adapter(base_dir: Path, folder: Path) -> Path:
    """A LoRA adapter with random, non-zero B on q/v/down (a fresh LoRA is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def generate_text(model, tokenizer, prompt: str) -> str:
    """transformers' greedy `generate`, EOS dropped, as the server's text."""
    ids = encode_prompt(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_the_server_on_a_quantized_base_serves_adapters_unmerged(
    trained, base_dir, tmp_path, monkeypatch, capfd
):
    """The server's forward (decoder.py) and transformers' are the same math on the same weights:
    the base quantized the same way from the same checkpoint, the same bitsandbytes kernels (both
    run in eval mode with no gradient, so on an AVX512-BF16 CPU both run the repacked 4-bit one) and
    the same LoRA layers. Only the rounding of the norms, rotary and attention can differ, far under
    what moves a greedy token here."""
    from finetune.serving.server import ModelServer

    quantization, _, setup = trained
    other = random_adapter(base_dir, tmp_path / "other")
    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    monkeypatch.setenv("SERVE_COMPILE", "auto")  # asked for, and skipped for a bitsandbytes base
    server = ModelServer(base_model=str(base_dir), adapter=str(setup), quantization=MODES[quantization])
    err = capfd.readouterr().err
    assert f"SERVE_QUANT={MODES[quantization]}: a bitsandbytes base, so adapters stay unmerged" in err
    assert f"bitsandbytes {quantization} base" in err
    assert not server.merged and server.engine.compiled is None and is_bitsandbytes_model(server.model)

    def serve(prompt: str, lora: str | None = None) -> str:
        return "".join(server.generate(prompt, settings=GREEDY, prompt_template="none", lora_weights=lora))

    served = {p: (serve(p), serve(p, str(other)), serve(p)) for p in PROMPTS}
    assert not server.merged

    tokenizer = load_tokenizer(str(base_dir))
    reference = attach_adapter(load_base(str(base_dir), CPU, FP32, quantization), setup).eval()
    reference = attach_adapter(reference, other, name="other")
    for prompt, (setup_text, other_text, again) in served.items():
        reference.set_adapter("default")
        assert setup_text == generate_text(reference, tokenizer, prompt) == again
        reference.set_adapter("other")
        assert other_text == generate_text(reference, tokenizer, prompt) != setup_text
        with reference.disable_adapter():
            assert generate_text(reference, tokenizer, prompt) not in (setup_text, other_text)


def test_quantization_settings_that_cannot_run_say_why(monkeypatch):
    from finetune.engine.quant import pick_quantization

    with pytest.raises(ModelError, match="SERVE_QUANT='nf4': use one of auto, none, int8, int4, bnb8, bnb4"):
        pick_quantization("nf4", CPU, torch.float32)
    assert pick_quantization("bnb4", CPU, torch.bfloat16) == "bnb4"  # any dtype: bitsandbytes computes it
    with pytest.raises(ModelError, match="runs on a CPU or a CUDA GPU .*not on meta"):
        bitsandbytes_config("4bit", torch.device("meta"), FP32)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ModelError, match="needs the bitsandbytes package .*pip install bitsandbytes=="):
        bitsandbytes_config("8bit", CPU, FP32)
