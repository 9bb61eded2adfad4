"""The training fast path against the plain one: labeled-only logits without the padding mask,
FastDropout, and the bf16 frozen base must compute what the classic fp32 forward computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict

from finetune.config import DataConfig, LoraSettings, TrainConfig
from finetune.data import prompts
from finetune.data.batching import collate_padded, micro_batches
from finetune.data.dataset_file import read_records
from finetune.data.encoding import IGNORE_INDEX, Encoded
from finetune.data.records import split_records
from finetune.model.loading import (
    FastDropout,
    Precision,
    add_lora,
    load_base,
    load_tokenizer,
    use_fast_dropout,
)
from finetune.training.losses import TokenLoss, token_loss_sum
from finetune.training.run_data import encode_records
from finetune.training.schedule import lr_lambda
from finetune.training.trainer import train

CPU = torch.device("cpu")
FP32 = Precision(torch.float32, torch.float32)


def lora_model(model_dir, dropout: float = 0.0):
    torch.manual_seed(0)
    model = add_lora(load_base(str(model_dir), CPU, FP32), LoraSettings(lora_r=4, lora_dropout=dropout))
    with torch.no_grad():  # LoRA B starts at zero; random values make the A gradients non-zero too
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return model


def uneven_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    examples = []
    for n, prompt in ((17, 6), (5, 2), (11, 11), (9, 1)):  # the third has no trained token
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        examples.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate_padded(examples, pad_id=0)


def classic_loss(model, batch) -> torch.Tensor:
    """What the alpaca-lora recipe computes: the full forward with the padding mask, every logit."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def test_labeled_only_loss_and_gradients_equal_the_full_forward(tiny_model_dir):
    model = lora_model(tiny_model_dir).train()
    batch = uneven_batch()
    assert TokenLoss(model).labeled_only  # the tiny Llama takes the fast path
    expected = classic_loss(model, batch)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    got, n = token_loss_sum(model, batch, CPU, _no_autocast)
    got.backward()
    assert n == 11 + 3 + 0 + 8
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, grad in want.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in want.items() if "lora_A" in n)


def test_a_left_padded_batch_keeps_its_mask(tiny_model_dir):
    model = lora_model(tiny_model_dir).eval()
    batch = uneven_batch()
    # The same rows padded on the left: dropping this mask would let real tokens attend to pads.
    width = batch["input_ids"].shape[1]
    lengths = batch["attention_mask"].sum(1)
    left = {
        k: torch.stack([torch.roll(row, int(width - n)) for row, n in zip(v, lengths, strict=True)])
        for k, v in batch.items()
    }
    positions = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        right, _ = token_loss_sum(model, batch, CPU, _no_autocast)
        shifted, _ = token_loss_sum(model, {**left, "position_ids": positions}, CPU, _no_autocast)
    torch.testing.assert_close(shifted, right, rtol=1e-4, atol=1e-4)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_fast_dropout_drops_p_of_each_draw_and_rescales():
    torch.manual_seed(3)
    layer = FastDropout(0.05).train()
    x = torch.ones(400_000, requires_grad=True)
    out = layer(x)
    dropped = (out == 0).float().view(-1, 4)
    # Each of the four int16 draws in a 64-bit word must drop at rate p (a sign bit stuck at 0
    # would make one of them never drop).
    for column in dropped.T:
        assert abs(float(column.mean()) - 0.05) < 0.003
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.95))
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # gradient flows through the same mask
    torch.manual_seed(3)
    assert torch.equal(FastDropout(0.05).train()(torch.ones(400_000)), out.detach())  # seeded
    assert torch.equal(layer.eval()(x), x)


def test_fast_dropout_swaps_modules_not_weights(tiny_model_dir):
    model = lora_model(tiny_model_dir, dropout=0.1)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert len(lora_layers) == 7 * 2  # all linear layers of the 2 blocks (the default targets)
    assert use_fast_dropout(model) == len(lora_layers)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    after = get_peft_model_state_dict(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def reference_losses(cfg: TrainConfig) -> list[float]:
    """The plain path, step by step as train() orders the data: fp32 weights, HF's own loss over the
    full forward with the padding mask, nn.Dropout, the same optimizer and schedule."""
    records, _ = split_records(read_records(cfg.data.data_path), 0, cfg.seed)
    tokenizer = load_tokenizer(cfg.base_model)
    examples = encode_records(records, tokenizer, prompts.load_template(cfg.data.prompt_template_name), cfg)
    torch.manual_seed(cfg.seed)
    model = add_lora(load_base(cfg.base_model, CPU, FP32), cfg.lora).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.max_steps))
    per_epoch = len(micro_batches(examples, cfg.micro_batch_size, cfg.seed, 0))
    losses = []
    for step in range(cfg.max_steps):
        epoch, k = divmod(step, per_epoch)
        chosen = micro_batches(examples, cfg.micro_batch_size, cfg.seed, epoch)[k]
        batch = collate_padded([examples[i] for i in chosen], tokenizer.pad_token_id)
        loss = model(**batch).loss  # mean over trained tokens, as train() logs it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_fast_training_path_follows_the_plain_loss_curve(tiny_model_dir, tiny_data, tmp_path):
    def config(dtype: str) -> TrainConfig:
        return TrainConfig(
            base_model=str(tiny_model_dir),
            output_dir=str(tmp_path / dtype),
            batch_size=4,
            micro_batch_size=4,
            max_steps=12,
            learning_rate=2e-2,
            logging_steps=1,
            dtype=dtype,
            lora=LoraSettings(lora_r=4, lora_dropout=0.0),
            data=DataConfig(data_path=str(tiny_data), val_set_size=0, cutoff_len=256),
        )

    plain = reference_losses(config("float32"))
    assert plain[-1] < plain[0] - 0.2  # it learns, so a misaligned loss would not track it

    def curve(dtype: str) -> list[float]:
        result = train(config(dtype), log=lambda _: None)
        return [s["loss"] for s in result.card["history"]["steps"]]

    assert curve("float32") == pytest.approx(plain, rel=1e-4)
    # bf16 compute on a bf16 frozen base (what AMX CPUs and GPUs run): same curve within bf16 noise.
    fast = curve("bfloat16")
    assert fast == pytest.approx(plain, rel=0.03)


def test_bfloat16_serving_on_cpu_runs_bf16_weights(tiny_model_dir, monkeypatch):
    from finetune.config import GenerationSettings
    from finetune.engine.requests import GenerationStats
    from finetune.model.loading import ModelError
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("SERVE_DTYPE", "bfloat16")
    bf16 = ModelServer(base_model=str(tiny_model_dir))
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}  # was silently fp32
    fp32 = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    ids = torch.tensor([[1, 17, 42, 99, 5, 63]])
    with torch.no_grad():
        a, b = fp32.model(ids).logits[0].float(), bf16.model(ids).logits[0].float()
    assert F.cosine_similarity(a, b, dim=-1).min() > 0.999
    stats = GenerationStats()
    "".join(bf16.generate("hello", settings=GenerationSettings(max_new_tokens=5, temperature=0), stats=stats))
    assert stats.output_token_count == 5 or stats.stop_reason == "eos"
    monkeypatch.setenv("SERVE_DTYPE", "float64")
    with pytest.raises(ModelError, match="SERVE_DTYPE='float64'.*auto, float32, bfloat16, float16"):
        ModelServer(base_model=str(tiny_model_dir))


def test_flattened_head_input_computes_the_same_logits(tiny_model_dir):
    from finetune.serving.server import flatten_head_input

    model = load_base(str(tiny_model_dir), CPU, Precision(torch.bfloat16, torch.bfloat16)).eval()
    model.requires_grad_(False)  # frozen, as under PEFT: the case that copied the weight per call
    ids = torch.tensor([[1, 17, 42, 99, 5, 63, 7]])
    with torch.no_grad():
        before = model(ids, logits_to_keep=1).logits
        weight = model.get_output_embeddings().weight
        flatten_head_input(model)
        after = model(ids, logits_to_keep=1).logits
        full = model(ids).logits
    assert model.get_output_embeddings().weight is weight
    assert after.shape == before.shape == (1, 1, model.config.vocab_size)
    torch.testing.assert_close(after, before)
    assert full.shape == (1, 7, model.config.vocab_size)
    torch.testing.assert_close(full[:, -1:], after)


@pytest.mark.parametrize("fast", [False, True])
def test_bfloat16_on_a_cpu_without_fast_bf16_warns_and_is_honoured(monkeypatch, capsys, fast):
    from finetune.model import loading

    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: fast)
    for training in (False, True):
        got = loading.pick_precision("bfloat16", CPU, training=training)
        assert got.compute == torch.bfloat16  # honoured: half the memory is a reason to ask for it
        warned = "bfloat16 on a CPU without AMX or AVX512-BF16" in capsys.readouterr().err
        assert warned is not fast
    loading.pick_precision("auto", CPU, training=False)
    assert capsys.readouterr().err == ""
