"""decoder.py: our Llama forward over a preallocated KV cache computes transformers' logits (prompts
in chunks, a growing cache, left-padded batches), gives plain `generate`'s greedy text on the
embedded model, keeps the model trainable after fusing its weights, follows weights replaced behind
its back, and other architectures run transformers' forward on the same cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.config import GenerationSettings
from finetune.data.encoding import encode_prompt
from finetune.engine import attention, quant
from finetune.engine.decoder import KV, Decoder, unsupported
from finetune.engine.requests import Request
from finetune.engine.scheduler import Engine

PROMPTS = [
    "What is two plus two?",
    "The capital of France is",
    "Alpacas live in the Andes. Give three tips for staying healthy.",
    "中国的首都是北京。",
    "hi",
]


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def full_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_chunked_prompt_and_decoding_match_transformers_logits(tiny):
    model, tokenizer = tiny
    assert unsupported(model) is None
    decoder = Decoder(model)
    ids = encode_prompt(tokenizer, PROMPTS[2])
    kv = KV(capacity=3)  # smaller than the prompt: the buffer has to grow
    with torch.inference_mode():
        for start in range(0, len(ids), 5):
            chunk = ids[start : start + 5]
            positions = torch.arange(start, start + len(chunk))[None]
            logits = decoder.forward(torch.tensor([chunk]), positions, kv)
        assert kv.length == len(ids) and kv.capacity >= len(ids)
        torch.testing.assert_close(logits[0], full_logits(model, ids), rtol=1e-5, atol=1e-5)
        for _ in range(6):
            ids.append(int(logits.argmax()))
            logits = decoder.forward(torch.tensor([ids[-1:]]), torch.tensor([[len(ids) - 1]]), kv)
            torch.testing.assert_close(logits[0], full_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_a_left_padded_batch_gives_each_row_its_own_logits(tiny):
    model, tokenizer = tiny
    decoder = Decoder(model)
    rows = [encode_prompt(tokenizer, p) for p in PROMPTS[:3]]
    with torch.inference_mode():
        parts = []
        for ids in rows:
            kv = KV(len(ids))
            decoder.forward(torch.tensor([ids]), torch.arange(len(ids))[None], kv)
            parts.append(kv)
        kv = KV.stack(parts)
        length = max(len(ids) for ids in rows)
        assert kv.length == length and kv.rows == 3
        mask = torch.tensor([[False] * (length - len(ids)) + [True] * (len(ids) + 1) for ids in rows])
        nxt = [7, 11, 13]
        logits = decoder.forward(
            torch.tensor([[t] for t in nxt]), torch.tensor([[len(ids)] for ids in rows]), kv, mask
        )
    for i, ids in enumerate(rows):
        torch.testing.assert_close(logits[i], full_logits(model, [*ids, nxt[i]]), rtol=1e-5, atol=1e-5)


def padded_and_alone(forward, decoder: Decoder, rows: list[list[int]], nxt: list[int]):
    """Logits of one more token per row through `forward` (Decoder.forward's arguments): the rows in
    one left-padded batch, and each alone, after prompts prefilled one by one (as the engine does)."""
    parts = []
    with torch.inference_mode():
        for ids in rows:
            parts.append(KV(len(ids)))
            decoder.forward(torch.tensor([ids]), torch.arange(len(ids))[None], parts[-1])
        length = max(len(ids) for ids in rows)
        mask = torch.tensor([[False] * (length - len(ids)) + [True] * (len(ids) + 1) for ids in rows])
        positions = [[len(ids)] for ids in rows]
        batched = forward(torch.tensor([[t] for t in nxt]), torch.tensor(positions), KV.stack(parts), mask)
        alone = [
            forward(torch.tensor([[t]]), torch.tensor([p]), KV.stack([kv]), None)[0]
            for t, p, kv in zip(nxt, positions, parts, strict=True)
        ]
    return batched, alone


# int8, the CPU default, and int4: their products are our kernels', a row's bits whatever the batch.
# fp32's are MKL's GEMM, whose sums for a row change with the number of rows.
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_row_decodes_to_the_same_bits_in_a_padded_batch_as_alone(tiny, kind):
    """Decode attention sums over each row's own positions in order (kernels/decode_attention.cpp):
    with SDPA over the padded length, a padded row's logits were a few ulps off its solo ones (up to
    3e-3 on the embedded model), which int8's rounded activations can turn into another token."""
    model, tokenizer = tiny
    if kind != "none":
        assert quant.quantize(model, kind) > 0
    if kind == "int4":
        assert quant.int8_kernel() == "finetune"  # ours, not torch's int4 kernel
    assert attention.batch_invariant(model.model.embed_tokens.weight)
    decoder = Decoder(model)
    rows = [encode_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(ids) for ids in rows}) == len(rows)  # every row but the longest is padded
    batched, alone = padded_and_alone(decoder.forward, decoder, rows, [7, 11, 13, 17, 19])
    for i in range(len(rows)):
        assert torch.equal(batched[i], alone[i]), i


def test_greedy_text_is_plain_generates_on_the_embedded_model(embedded_model_dir):
    """Our forward against transformers' eager `generate`, 16 tokens on fixed prompts, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir)
    settings = GenerationSettings(max_new_tokens=16, temperature=0)
    engine = Engine(model, tokenizer)
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        request = engine.submit(Request(ids, settings))
        list(engine.drive(request))
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        want = [t for t in out[0, len(ids) :].tolist() if t not in engine.stop_ids]
        assert request.generated == want[: len(request.generated)] and len(request.generated) >= min(
            len(want), 16
        )


def test_fused_weights_stay_trainable_and_follow_in_place_changes(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    ids = encode_prompt(tokenizer, PROMPTS[0])
    list(engine.drive(engine.submit(Request(ids, GenerationSettings(max_new_tokens=3, temperature=0)))))
    attn = model.model.layers[0].self_attn
    # q/k/v are views of one tensor now...
    assert attn.k_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr() + attn.q_proj.weight.nbytes
    # ... that training can still use (made outside inference mode)...
    model.train()
    model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.backward()
    assert attn.k_proj.weight.grad is not None and attn.k_proj.weight.grad.abs().sum() > 0
    model.eval()
    decoder = engine.decoder()
    assert decoder is not None

    def ours(tokens: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            kv = KV(len(tokens))
            return decoder.forward(torch.tensor([tokens]), torch.arange(len(tokens))[None], kv)[0]

    with torch.no_grad():
        attn.v_proj.weight.mul_(2.0)  # in place: the fused tensor sees it
    torch.testing.assert_close(ours(ids), full_logits(model, ids), rtol=1e-5, atol=1e-5)
    attn.k_proj.weight.data = torch.randn_like(attn.k_proj.weight)  # replaced: fused again
    torch.testing.assert_close(ours(ids), full_logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_groups_multiply_one_fused_copy_kept_once(tiny, kind, monkeypatch):
    """q/k/v and gate/up of a quantized model run as one product each: the same bits as one by one
    (each output of our kernels is computed alone), and each module's low-bit copy becomes a view
    of the fused one, so it is kept once; the merged-adapter set gets its own."""
    model, tokenizer = tiny
    assert quant.quantize(model, kind) > 0
    attn = model.model.layers[0].self_attn
    modules = [attn.q_proj, attn.k_proj, attn.v_proj]
    before = quant.quantized_bytes(model)
    decoder = Decoder(model)
    ids = torch.tensor([encode_prompt(tokenizer, PROMPTS[2])])

    def logits() -> torch.Tensor:  # outside prefill(): every row through the low-bit kernels
        with torch.inference_mode():
            return decoder.forward(ids, torch.arange(ids.shape[1])[None], KV(ids.shape[1]))

    fused = logits()
    (weights, scales), *rest = attn.q_proj.q_fused[tuple(m.qweight.data_ptr() for m in modules)]
    assert not rest
    for m in modules:  # views of the fused copy, the base set included
        assert m.qweight.untyped_storage().data_ptr() == weights.untyped_storage().data_ptr()
        assert m.qscales.untyped_storage().data_ptr() == scales.untyped_storage().data_ptr()
        assert m.q_base[0] is m.qweight
    assert attn.k_proj.qweight.data_ptr() == weights.data_ptr() + attn.q_proj.qweight.nbytes
    assert quant.quantized_bytes(model) == before
    monkeypatch.setattr(quant, "fused_matmul", lambda x, layers: None)  # module by module
    assert torch.equal(logits(), fused)
    monkeypatch.undo()
    # Another set of copies (as use_merged makes): fused on its own, the base set kept as it was.
    base = [m.q_base for m in modules]
    with torch.no_grad():
        for m in modules:
            m.weight.mul_(1.5)
    quant.use_merged(modules)
    merged = logits()
    assert not torch.equal(merged, fused)
    assert all(
        m.q_merged[0] is m.qweight and m.qweight.data_ptr() != b[0].data_ptr()
        for m, b in zip(modules, base, strict=True)
    )
    assert len(attn.q_proj.q_fused) == 2
    quant.use_base(modules)
    assert [m.q_base for m in modules] == base and torch.equal(logits(), fused)


def test_adapters_on_different_modules_share_a_batch(tiny_model_dir, tmp_path, monkeypatch):
    """PEFT swaps in LoRA modules when it attaches an adapter; the decoder looks the modules up each
    pass, so a second adapter on other layers (k/o/gate/up) is applied to its rows only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.serving.server import ModelServer
    from tests.test_engine import outcomes_together, serve, together

    folders = []
    for seed, targets in enumerate([["q_proj", "v_proj"], ["k_proj", "o_proj", "gate_proj", "up_proj"]]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        )
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        folders.append(str(tmp_path / f"a{seed}"))
    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    asks = [(PROMPTS[1], folders[0]), (PROMPTS[1], folders[1]), (PROMPTS[1], None)]
    alone = [serve(server, *ask) for ask in asks]
    assert len(set(alone)) == 3
    assert together(server, asks) == alone
    # An error inside a mixed batch's forward pass: each row runs again alone and gets its own text
    # (only a row whose own pass fails is failed), and PEFT's per-row hooks do not stay behind.
    lora_layer = next(m for m in server.model.modules() if hasattr(m, "lora_A") and m.lora_A)
    forward = lora_layer.forward

    def fails_in_mixed_batches(*args, **kwargs):
        if "adapter_names" in kwargs:  # what PEFT's hooks pass in a mixed batch
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    monkeypatch.setattr(lora_layer, "forward", fails_in_mixed_batches)
    assert outcomes_together(server, asks) == alone
    monkeypatch.setattr(lora_layer, "forward", forward)
    assert together(server, asks) == alone and [serve(server, *ask) for ask in asks] == alone


def test_other_architectures_run_transformers_forward_on_the_same_cache(tmp_path: Path):
    """Qwen2 (q/k/v biases) is not Llama: the engine runs transformers' forward over our KV."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import TINY_SHAPE, build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), **TINY_SHAPE, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id
    )
    model = Qwen2ForCausalLM(config).eval()
    assert "qwen2" in (unsupported(model) or "")
    engine = Engine(model, tokenizer)
    requests = [
        Request(encode_prompt(tokenizer, p), GenerationSettings(max_new_tokens=8, temperature=0))
        for p in PROMPTS
    ]
    for r in requests:
        engine.submit(r)
    while engine.busy:
        engine.step()
    assert engine.decoder() is None
    for prompt, r in zip(PROMPTS, requests, strict=True):
        ids = encode_prompt(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        want = [t for t in out[0, len(ids) :].tolist() if t not in engine.stop_ids]
        assert r.generated == want[: len(r.generated)] and len(r.generated) >= 1


def test_transformers_forward_on_our_cache_gives_the_same_tokens(tiny):
    """The engine's two forwards (ours, and transformers' over the same KV buffer, as for other
    architectures and the bench's comparison) agree on a left-padded batch joined mid-decode."""
    model, tokenizer = tiny
    got = []
    for own in (True, False):
        engine = Engine(model, tokenizer, own_forward=own)
        requests = [
            Request(encode_prompt(tokenizer, p), GenerationSettings(max_new_tokens=10, temperature=0))
            for p in PROMPTS
        ]
        engine.submit(requests[0])
        engine.step()
        for r in requests[1:]:
            engine.submit(r)
        while engine.busy:
            engine.step()
        assert (engine.decoder() is None) is (not own)
        got.append([r.generated for r in requests])
    assert got[0] == got[1] and len({tuple(g) for g in got[0]}) > 1
