"""int8 decoding (SERVE_QUANT=int8): the kernel's numbers against the dequantized weight, prompts
through the kernel their kind and the CPU pick (the AVX2 path again in a subprocess), widths the
kernel cannot take left alone, and the embedded model's greedy text unchanged; stop sequences and
cancel on the quantized path."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from finetune.config import GenerationSettings
from finetune.engine import kernel, quant
from finetune.serving.server import ModelServer

GREEDY16 = GenerationSettings(max_new_tokens=16, temperature=0)
PROMPTS = [
    "Tell me something about alpacas.",
    "What is the capital of France?",
    "Write a haiku about rain.",
    "Give three tips for staying healthy.",
    "请用中文介绍一下你自己。",
]


def linear(out_features: int, in_features: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_decode_uses_the_low_bit_weight_and_prompts_the_one_their_kind_picks(kind):
    layer = linear(96, 64)
    reference = F.linear  # before quantize() replaces the forward
    assert quant.quantize(torch.nn.Sequential(layer), kind) == 1
    dequantized = quant._dequantize(kind, layer.weight)
    step = (
        (layer.weight.abs().amax(1) / 127)
        if kind == "int8"
        else (layer.weight.amax(1) - layer.weight.amin(1)) / 15
    )
    assert ((dequantized - layer.weight).abs().amax(1) <= step * 0.51 + 1e-6).all()  # rounding only
    x = torch.randn(3, 64)
    want = x.bfloat16().float() @ dequantized.T + layer.bias
    got = layer(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2)
    assert not torch.allclose(got, reference(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
    # Any number of rows takes the low-bit kernel (a batch row's numbers must not depend on the
    # batch). A prompt (the engine's prefill() block) takes our int8 and int4 kernels too off
    # AVX-512, the same bits row by row; on AVX-512, and on torch's kernels, it goes through the
    # fp32 weight. fp32_weights() is fp32.
    rows = torch.randn(40, 64)
    assert torch.equal(layer(rows)[:3], layer(rows[:3]))
    fp32 = reference(rows, layer.weight, layer.bias)
    with quant.prefill():
        prompt = layer(rows)
    ours = quant.int8_kernel() == "finetune"
    assert quant.prefills_quantized(kind) == (ours and kernel.isa() != "avx512")
    assert torch.equal(prompt, layer(rows) if quant.prefills_quantized(kind) else fp32)
    with quant.fp32_weights():
        assert torch.equal(layer(rows), fp32)
    assert not torch.equal(layer(rows), fp32)


@pytest.mark.parametrize(
    "kind, odd_shape, fine_shape",
    # int8: widths in multiples of 16 (torch's kernel crashes on a width of 36 and gives wrong
    # numbers at 40); int4: whole groups of 32 in, outputs in blocks of 8 (ours; 16 torch's).
    [
        ("int8", (64, 36), (64, 48)),
        ("int8", (64, 40), (8, 32)),
        ("int4", (42, 64), (48, 64)),
        ("int4", (48, 48), (16, 32)),
    ],
)
def test_shapes_the_kernels_cannot_take_stay_fp32(kind, odd_shape, fine_shape):
    odd, fine = linear(*odd_shape), linear(*fine_shape, seed=1)
    assert not quant.kernel_fits(odd, kind) and quant.kernel_fits(fine, kind)
    model = torch.nn.Sequential(odd, fine)  # not run as a stack: only quantized
    assert quant.quantize(model, kind) == 1
    assert not hasattr(odd, "qweight") and hasattr(fine, "qweight")
    x = torch.randn(2, odd.in_features)
    assert torch.equal(odd(x), F.linear(x, odd.weight, odd.bias))


@pytest.mark.parametrize(
    "mode, dtype, message",
    [
        ("int2", "float32", "SERVE_QUANT='int2': use one of auto, none, int8, int4"),
        ("int8", "bfloat16", "SERVE_QUANT=int8 needs a CPU and float32 weights"),
        ("int4", "bfloat16", "SERVE_QUANT=int4 needs a CPU and float32 weights"),
    ],
)
def test_bad_quantization_settings_stop_setup_with_a_reason(
    tiny_model_dir, monkeypatch, mode, dtype, message
):
    from finetune.model.loading import ModelError

    monkeypatch.setenv("SERVE_QUANT", mode)
    with pytest.raises(ModelError, match=message):
        ModelServer(base_model=str(tiny_model_dir), dtype=dtype)


@pytest.fixture(scope="module")
def servers(embedded_model_dir):
    return (
        ModelServer(base_model=str(embedded_model_dir), dtype="float32", quantization="none"),
        ModelServer(base_model=str(embedded_model_dir), dtype="float32", quantization="int8"),
        ModelServer(base_model=str(embedded_model_dir), dtype="float32", quantization="int4"),
    )


def prompt_ids(server: ModelServer, prompt: str) -> list[int]:
    from finetune.data.encoding import encode_prompt

    return encode_prompt(
        server.tokenizer, server.resolve_template("auto", None).render(prompt, "", server.tokenizer)
    )


def token_ids(server: ModelServer, prompt: str, n: int = 16) -> list[int]:
    from finetune.engine.requests import Request

    request = Request(prompt_ids(server, prompt), GenerationSettings(max_new_tokens=n, temperature=0))
    server.engine.submit(request)
    server.compute.wake()
    list(server._chunks(request))
    return list(request.generated)


def test_quantization_defaults_to_int8_on_a_cpu_with_fp32_weights(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("SERVE_QUANT", raising=False)
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    assert server.quantization == "int8" and quant.quantized_bytes(server.model) > 0
    bf16 = ModelServer(base_model=str(tiny_model_dir), dtype="bfloat16")
    assert bf16.quantization == "none" and quant.quantized_bytes(bf16.model) == 0
    monkeypatch.setenv("SERVE_QUANT", "none")
    assert quant.quantized_bytes(ModelServer(base_model=str(tiny_model_dir), dtype="float32").model) == 0


def test_int8_decoding_gives_the_fp32_greedy_text(servers):
    """Where fp32's choice is clear, int8 makes it too. Free-running text can only match up to
    fp32's first near-tie: 'Tell me something about alpacas.' has a top-2 logit margin of 0.067 at
    token 12 and the Chinese prompt 0.002 at token 12 (measured), which any rounding may flip. So:
    teacher-forced on fp32's 64 greedy tokens, int8 picks fp32's token at every position with a
    margin of at least 0.5 (1.0 where activations round to int8) and at 90 % of all positions
    (measured 94-100 % per prompt with fp32 activations, every miss at a margin under 0.35); and
    free-running, the same 16 tokens on two prompts with no tie."""
    fp32, int8, _ = servers
    assert quant.quantized_bytes(int8.model) > 0 and quant.quantized_bytes(fp32.model) == 0
    # Off AVX-512 our kernel rounds activations to int8 per 64 (llama.cpp's q8_0 activations): a
    # coarser step, measured to flip one token at a margin of 0.76 on the alpacas prompt (90.6 % of
    # its positions agree; held-out loss +0.05 % against fp32, bench/quant_quality.py).
    clear_margin = 1.0 if quant.rounds_activations("int8") else 0.5
    for prompt in PROMPTS:
        ids, generated = prompt_ids(fp32, prompt), token_ids(fp32, prompt, 64)
        sequence, n = torch.tensor([ids + generated]), len(ids)

        @torch.no_grad()
        def logits(exact: bool, sequence: torch.Tensor = sequence, n: int = n) -> torch.Tensor:
            # on the compute thread: fp32_weights() is per thread
            with quant.fp32_weights() if exact else contextlib.nullcontext():
                return int8.model(sequence).logits[0, n - 1 : -1]

        low, exact = int8.compute.call(logits, False), int8.compute.call(logits, True)
        assert exact.argmax(-1).tolist() == generated, prompt  # the fp32 block is fp32's model
        top = exact.topk(2, dim=-1).values
        clear = top[:, 0] - top[:, 1] >= clear_margin
        agree = low.argmax(-1) == exact.argmax(-1)
        assert agree[clear].all() and agree.float().mean() >= 0.9, (prompt, agree.float().mean())
    # The capital and the tips: no near-tie in their first 16 tokens (the haiku has one at token 12,
    # margin 0.135, which int8 activations flip).
    for prompt in (PROMPTS[1], PROMPTS[3]):
        want = "".join(fp32.generate(prompt, settings=GREEDY16))
        assert "".join(int8.generate(prompt, settings=GREEDY16)) == want, prompt


def test_int4_greedy_agreement(servers):
    fp32, _, int4 = servers
    agree = []
    for prompt in PROMPTS:
        want, got = token_ids(fp32, prompt), token_ids(int4, prompt)
        agree.append(sum(a == b for a, b in zip(want, got, strict=False)) / len(want))
    # Measured: 0.0, 0.44, 0.31, 1.0, 0.06 (mean 0.36). int4 rounding changes a 135M model's answers;
    # the floor catches a broken kernel layout (random tokens agree ~never), not a quality claim.
    assert sum(agree) / len(agree) >= 0.25 and max(agree) == 1.0


def test_stop_sequences_and_cancel_on_the_int8_path(servers):
    _, int8, _ = servers
    full = "".join(int8.generate(PROMPTS[1], settings=GREEDY16))
    stop = full.split()[2]
    stopped = "".join(
        int8.generate(
            PROMPTS[1], settings=GenerationSettings(max_new_tokens=16, temperature=0, stop_sequences=[stop])
        )
    )
    assert stopped == full[: full.index(stop)]
    chunks = int8.generate(PROMPTS[0], settings=GenerationSettings(max_new_tokens=200, temperature=0))
    next(chunks)
    chunks.close()  # what a cancelled prediction does
    # The engine dropped it: the next request is served alone, at once.
    assert "".join(int8.generate(PROMPTS[1], settings=GREEDY16)) == full
    assert not int8.engine.busy


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_batches_and_chunked_prompts_give_the_solo_tokens(tiny_model_dir, kind):
    """A request's tokens must not depend on its batch or on how its prompt was chunked (the load
    test caught int8 prompts chunked differently in a batch leaving a different cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.encoding import encode_prompt
    from finetune.engine.requests import Request
    from finetune.engine.scheduler import Engine, EngineLimits

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert quant.quantize(model, kind) > 0
    settings = GenerationSettings(max_new_tokens=16, temperature=0)
    # Prompts longer than a chunk, so a chunked prefill differs from a whole one in its row count.
    prompts = [
        "What is two plus two? Think step by step and write the sum.",
        "Alpacas live in the Andes. Give three tips for staying healthy, and explain each one.",
        "The capital of France is Paris, and the capital of Italy is",
        "中国的首都是北京。日本的首都是东京。",
    ]

    def run(limits: EngineLimits, texts: list[str]) -> list[list[int]]:
        engine = Engine(model, tokenizer, limits)
        requests = [Request(encode_prompt(tokenizer, t), settings) for t in texts]
        for r in requests:
            engine.submit(r)
        for _ in range(500):
            engine.step()
            if all(r.done for r in requests):
                break
        return [list(r.generated) for r in requests]

    alone = [run(EngineLimits(), [p])[0] for p in prompts]
    assert all(len(encode_prompt(tokenizer, p)) > 16 for p in prompts)
    assert run(EngineLimits(prefill_chunk=5), prompts) == alone


def test_prompts_through_the_int8_kernel_on_the_avx2_path():
    """This machine may have AVX-512, where prompts take the fp32 weight: the prompt and batch tests
    run again with the kernel capped to AVX2, where prompts go through the int8 kernel."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "FINETUNE_INT8_ISA": "avx2", "PYTHONPATH": str(root)}
    pick = "prompts_the_one_their_kind_picks or chunked_prompts_give_the_solo_tokens"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", pick, __file__],
        env=env, capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout, done.stdout[-2000:]
