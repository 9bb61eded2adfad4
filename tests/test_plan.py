"""The memory planner (finetune/memory/plan.py, footprint.py): its training estimate against a measured
step on small random Llamas (CPU, the allocator's own events), its byte counts against
bitsandbytes' real storage, the auto choices on the shapes users bring (bench/configs), and the
command."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.__main__ import main as finetune_main
from finetune.memory import footprint as fp
from finetune.memory.plan import (
    GIB,
    PlanError,
    largest_kv_budget,
    load_config,
    parse_memory,
    plan_serving,
    plan_training,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "bench" / "configs"
LLAMA2_7B, LLAMA3_8B, LLAMA2_13B, LLAMA_1B = (
    CONFIGS / f"{n}.json" for n in ("llama-2-7b", "llama-3-8b", "llama-2-13b", "llama-1b")
)
# Small enough for a CPU step in about a second, with the vocabulary large enough that logits
# matter and grouped-query attention (2 KV heads for 4).
SMALL = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
MICRO_BATCH, CUTOFF = 2, 128


# -- measuring a step -----------------------------------------------------------------------------


def _tensors_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind these tensors."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters with bitsandbytes' quantization state."""
    out = list(model.parameters())
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            nested = (qs.state2.absmax, qs.state2.code) if qs.nested else ()
            out += [t for t in (qs.absmax, qs.code, qs.offset, *nested) if torch.is_tensor(t)]
        if torch.is_tensor(getattr(p, "SCB", None)):
            out.append(p.SCB)
    return out


def _resident(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor alive between steps: the weights, buffers, AdamW's state."""
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return [*_weights(model), *model.buffers(), *state]


def measured_step_peak(model: torch.nn.Module, vocab: int) -> int:
    """Peak bytes of tensors during a second training step (the first creates AdamW's state): what
    is resident before it plus the running sum of the CPU allocator's allocations and frees as the
    profiler records them, in time order."""
    from torch.profiler import ProfilerActivity, profile

    from finetune.training.losses import TokenLoss

    loss_fn = TokenLoss(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, vocab, (MICRO_BATCH, CUTOFF))

    def step() -> None:
        loss_fn(input_ids=ids, labels=ids).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    resident = _tensors_bytes(*_resident(model, optimizer), ids)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return resident + peak


def small_llama(dtype: torch.dtype, checkpointing: bool) -> tuple[torch.nn.Module, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.config import LoraSettings
    from finetune.model.loading import add_lora

    torch.manual_seed(0)
    config = LlamaConfig(**SMALL)
    model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    model = add_lora(model, LoraSettings(), gradient_checkpointing=checkpointing)  # r 8, all-linear, dropout
    return model.train(), config


@functools.cache
def measured_small(dtype: torch.dtype, checkpointing: bool) -> int:
    return measured_step_peak(small_llama(dtype, checkpointing)[0], SMALL["vocab_size"])


def planned_small(dtype: torch.dtype, checkpointing: bool) -> int:
    from transformers import LlamaConfig

    return plan_training(
        LlamaConfig(**SMALL),
        micro_batch_size=MICRO_BATCH,
        cutoff_len=CUTOFF,
        dtype="float32" if dtype == torch.float32 else "bfloat16",
        quantization="none",
        gradient_checkpointing=checkpointing,
        device="cpu",
    ).peak_bytes


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_estimate_is_within_15_percent_of_a_measured_step(dtype, checkpointing):
    measured, planned = measured_small(dtype, checkpointing), planned_small(dtype, checkpointing)
    assert abs(planned / measured - 1) <= 0.15, (planned, measured)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointing_saves_in_the_plan_what_it_saves_in_a_measured_step(dtype):
    """The estimate follows the setting's effect, not only the totals."""
    saved_measured = measured_small(dtype, False) - measured_small(dtype, True)
    saved_planned = planned_small(dtype, False) - planned_small(dtype, True)
    assert saved_measured > 0
    assert abs(saved_planned / saved_measured - 1) <= 0.25, (saved_planned, saved_measured)


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_estimate_is_within_15_percent_of_a_measured_step(tmp_path, quantization):
    """bitsandbytes runs on a CPU too: the fp32 flow after PEFT's kbit preparation, the dequantized
    weights in backward, checkpointing as QLoRA uses it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from finetune.config import LoraSettings
    from finetune.model.loading import Precision, add_lora, bitsandbytes_config

    torch.manual_seed(0)
    config = LlamaConfig(**SMALL)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    precision = Precision(torch.bfloat16, torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.bfloat16,
        quantization_config=bitsandbytes_config(quantization, torch.device("cpu"), precision),
        device_map={"": "cpu"},
    )
    model.config.use_cache = False
    model = add_lora(model, LoraSettings(), gradient_checkpointing=True, quantized=True).train()
    measured = measured_step_peak(model, SMALL["vocab_size"])
    plan = plan_training(
        config,
        micro_batch_size=MICRO_BATCH,
        cutoff_len=CUTOFF,
        dtype="bfloat16",
        quantization=quantization,
        gradient_checkpointing=True,
        device="cpu",
    )
    assert abs(plan.peak_bytes / measured - 1) <= 0.15, (plan.peak_bytes, measured, plan.parts)


# -- byte counts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_weights_are_what_bitsandbytes_stores(tmp_path, quantization):
    """Loaded through transformers, the embeddings, head and norms stay in the compute dtype; after
    PEFT's kbit preparation (what modeling.add_lora runs) they are fp32."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from finetune.model.loading import Precision, bitsandbytes_config

    config = LlamaConfig(**SMALL)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        dtype=torch.bfloat16,
        quantization_config=bitsandbytes_config(
            quantization, torch.device("cpu"), Precision(torch.bfloat16, torch.bfloat16)
        ),
        device_map={"": "cpu"},
    )
    shape = fp.Shape.from_config(config)
    assert _tensors_bytes(*_weights(model)) == fp.weight_bytes(shape, 2, quantization, kbit_fp32=False)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert _tensors_bytes(*_weights(model)) == fp.weight_bytes(shape, 2, quantization, kbit_fp32=True)


def test_shapes_have_the_published_parameter_counts():
    counts = {
        p: fp.Shape.from_config(load_config(p)).params for p in (LLAMA2_7B, LLAMA3_8B, LLAMA2_13B, LLAMA_1B)
    }
    assert counts == {
        LLAMA2_7B: 6_738_415_616,
        LLAMA3_8B: 8_030_261_248,
        LLAMA2_13B: 13_015_864_320,
        LLAMA_1B: 1_235_814_400,
    }
    one_b = fp.Shape.from_config(load_config(LLAMA_1B))
    assert one_b.head_params == 0  # tied: the head is the embedding, counted once


def test_kv_bytes_per_token_agree_with_the_server():
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.serving.server import kv_bytes_per_token

    config = LlamaConfig(**SMALL)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    assert fp.Shape.from_config(config).kv_elements_per_token * 2 == kv_bytes_per_token(model)


def test_lora_parameters_match_peft():
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.config import LoraSettings
    from finetune.model.loading import add_lora

    config = LlamaConfig(**SMALL)
    shape = fp.Shape.from_config(config)
    for targets in (["all-linear"], ["q_proj", "v_proj"]):
        model = add_lora(LlamaForCausalLM(config), LoraSettings(lora_r=4, lora_target_modules=targets))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert fp.lora_params(shape, 4, targets) == trainable


# -- choices --------------------------------------------------------------------------------------


def test_llama2_7b_on_24gib_fits_and_says_with_what():
    plan = plan_training(LLAMA2_7B, gpu_memory="24GiB")
    assert plan.fits and plan.required_bytes <= 24 * GIB
    data = json.loads(json.dumps(plan.to_json()))
    assert data["settings"]["quantization"] == "none" and data["settings"]["gradient_checkpointing"] is True
    assert data["settings"]["strategy"] == "single" and data["settings"]["micro_batch_size"] == 4
    assert "without gradient checkpointing would need" in plan.reason


def test_llama3_8b_on_24gib_needs_checkpointing():
    plain = plan_training(LLAMA3_8B, gpu_memory="24GiB", quantization="none", gradient_checkpointing=False)
    assert not plain.fits and "more than the 24.0 GiB given" in plain.reason
    assert "auto it fits" in plain.reason  # an explicit setting that does not fit points at auto
    auto = plan_training(LLAMA3_8B, gpu_memory="24GiB")
    assert auto.fits and (auto.settings["gradient_checkpointing"] or auto.settings["quantization"] == "4bit")
    # The 128k vocabulary: logits weigh more than on Llama-2 at the same tokens.
    assert auto.parts["logits"] > 3 * plan_training(LLAMA2_7B, gpu_memory="24GiB").parts["logits"]


def test_llama2_13b_on_24gib_needs_4bit():
    assert not plan_training(LLAMA2_13B, gpu_memory="24GiB", quantization="none").fits
    plan = plan_training(LLAMA2_13B, gpu_memory="24GiB")
    assert plan.fits and plan.settings["quantization"] == "4bit" and plan.settings["gradient_checkpointing"]
    assert (
        plan.parts["base_weights"] < plan_training(LLAMA2_13B, quantization="none").parts["base_weights"] / 3
    )


def test_nothing_fits_13b_on_8gb_and_the_reason_points_at_multi_gpu():
    plan = plan_training(LLAMA2_13B, gpu_memory="8GB")
    assert not plan.fits
    assert plan.settings["quantization"] == "4bit" and plan.settings["gradient_checkpointing"]  # the smallest
    assert "Nothing fits on one GPU" in plan.reason and "micro_batch_size 1 (batch_size kept" in plan.reason
    assert (
        "FSDP" in plan.reason and "torchrun --nproc_per_node" in plan.reason and "--world_size" in plan.reason
    )


def test_fsdp_over_four_gpus_fits_13b_on_8gb():
    single = plan_training(LLAMA2_13B, gpu_memory="8GB")
    plan = plan_training(LLAMA2_13B, gpu_memory="8GB", world_size=4)
    assert plan.fits and plan.settings["strategy"] == "fsdp" and plan.settings["world_size"] == 4
    assert plan.parts["optimizer_state"] * 4 == pytest.approx(single.parts["optimizer_state"], rel=1e-6)
    assert plan.parts["base_weights"] < single.parts["base_weights"] / 2


def test_several_gpus_take_ddp_while_the_whole_model_fits_each():
    ddp = plan_training(LLAMA2_7B, gpu_memory="24GiB", world_size=2)
    assert ddp.fits and ddp.settings["strategy"] == "ddp" and ddp.parts["ddp_buckets"] > 0
    fsdp = plan_training(LLAMA2_7B, gpu_memory="24GiB", world_size=2, strategy="fsdp")
    assert fsdp.fits and fsdp.settings["strategy"] == "fsdp"
    assert fsdp.parts["base_weights"] == ddp.parts["base_weights"] // 2
    with pytest.raises(PlanError, match="--quantization 8bit cannot be sharded"):
        plan_training(LLAMA2_7B, world_size=2, strategy="fsdp", quantization="8bit")


def test_no_limit_takes_the_fastest_setting():
    plan = plan_training(LLAMA2_13B, gpu_memory=None)
    assert (
        plan.fits and plan.settings["quantization"] == "none" and not plan.settings["gradient_checkpointing"]
    )
    assert "no memory limit" in plan.reason


def test_more_tokens_need_more_memory_and_parts_add_up():
    small = plan_training(LLAMA2_7B, gradient_checkpointing=False, quantization="none", micro_batch_size=1)
    big = plan_training(LLAMA2_7B, gradient_checkpointing=False, quantization="none", micro_batch_size=8)
    assert big.parts["activations"] == pytest.approx(8 * small.parts["activations"], rel=0.01)
    for plan in (small, big):
        assert sum(plan.parts.values()) == plan.required_bytes
        assert plan.required_bytes > plan.peak_bytes
    assert "base_weights" in small.table() and "GiB" in small.table()


def test_bad_settings_name_their_flag():
    with pytest.raises(PlanError, match="--lora_target_modules qkv_proj"):
        plan_training(LLAMA2_7B, lora_target_modules=["qkv_proj"])
    with pytest.raises(PlanError, match="--micro_batch_size 0"):
        plan_training(LLAMA2_7B, micro_batch_size=0)
    with pytest.raises(PlanError, match="--quantization '3bit'"):
        plan_training(LLAMA2_7B, quantization="3bit")


def test_memory_sizes_parse_and_bad_ones_name_the_flag():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("80G") == 80 * 10**9
    assert parse_memory("81920MiB") == 80 * 2**30
    assert parse_memory(" 1.5 gib ") == 3 * 2**29
    assert parse_memory(12345) == 12345 and parse_memory(None) is None
    for bad in ("24XB", "GB", "-3GB", "0GiB", "", 0):
        with pytest.raises(PlanError, match="--gpu_memory"):
            parse_memory(bad)


# -- serving --------------------------------------------------------------------------------------


def test_serving_kv_is_layers_x_kv_heads_x_head_dim_per_token():
    plan = plan_serving(LLAMA3_8B, gpu_memory="80GiB", max_rows=4, max_tokens=8192, cuda_graphs=False)
    per_token = 2 * 32 * 8 * 128 * 2  # keys and values, 32 layers, 8 KV heads of 128, bf16
    assert plan.parts["kv_cache"] == 2 * 8192 * per_token  # the batch's cache grows by doubling
    assert plan.parts["kv_joining"] == 8192 * per_token
    assert plan.fits and "cuda_graph_pools" not in plan.parts and plan.settings["graphs_captured"] == 0


def test_serving_graph_pool_stays_within_the_kv_budget():
    per_token = 2 * 32 * 32 * 128 * 2
    plan = plan_serving(LLAMA2_7B, gpu_memory="24GiB", max_rows=8, max_tokens=4096)
    assert plan.parts["kv_graph_pool"] == 4096 * per_token  # 8 rows x 512 columns, 4 x 1024, ...
    # rows 1, 2, 4, 8 x columns 64 ... 4096, those within 4096 slots: 7 + 6 + 5 + 4
    assert plan.settings["graphs_captured"] == 22 and plan.parts["cuda_graph_pools"] > 0
    # A budget above what the rows can use: the pool is max_rows x the longest row's bucket.
    wide = plan_serving(LLAMA2_7B, gpu_memory="80GiB", max_rows=2, max_tokens=100_000)
    assert wide.settings["longest_row"] == 4096 and wide.parts["kv_graph_pool"] == 2 * 4096 * per_token
    assert plan_serving(LLAMA2_7B, gpu_memory="24GiB", max_rows=8, max_tokens=4096).fits


def test_serving_that_does_not_fit_says_what_would():
    plan = plan_serving(LLAMA2_7B, gpu_memory="16GiB", max_rows=8, max_tokens=16384)
    assert not plan.fits and "more than the 16.0 GiB given" in plan.reason
    assert "KV_CACHE_TOKENS=" in plan.reason
    smaller = int(plan.reason.split("KV_CACHE_TOKENS=")[1].split()[0])
    assert plan_serving(LLAMA2_7B, gpu_memory="16GiB", max_rows=8, max_tokens=smaller).fits


def test_serving_budget_defaults_to_the_servers_own_rule():
    """A quarter of what the weights leave, at most max_rows full contexts (serving.engine_limits)."""
    plan = plan_serving(LLAMA3_8B, gpu_memory="80GiB", max_rows=2)
    assert plan.settings["max_tokens"] == 2 * 8192
    plan = plan_serving(LLAMA3_8B, gpu_memory="24GiB", max_rows=8)
    assert 2 * 8192 <= plan.settings["max_tokens"] < 8 * 8192


def test_largest_kv_budget_is_the_edge_of_fitting():
    config = load_config(LLAMA3_8B)
    budget = largest_kv_budget(config, gpu_memory="24GiB", max_rows=4)
    assert budget > 4096
    assert plan_serving(config, gpu_memory="24GiB", max_rows=4, max_tokens=budget).fits
    assert not plan_serving(config, gpu_memory="24GiB", max_rows=4, max_tokens=budget + 1).fits
    assert largest_kv_budget(config, gpu_memory="12GiB") == 0  # the bf16 weights alone are 15 GiB


def test_serving_4bit_weights_are_smaller():
    plain = plan_serving(LLAMA3_8B, gpu_memory="24GiB", max_rows=2, max_tokens=4096)
    nf4 = plan_serving(LLAMA3_8B, gpu_memory="24GiB", max_rows=2, max_tokens=4096, quantization="4bit")
    assert nf4.parts["base_weights"] < plain.parts["base_weights"] / 2
    assert not nf4.settings["cuda_graphs"]  # bitsandbytes layers decode eagerly


# -- the command ----------------------------------------------------------------------------------


def test_command_json_has_the_verdict_and_settings(capsys):
    code = finetune_main(
        ["plan", "--base_model", str(LLAMA2_7B), "--gpu_memory", "24GiB", "--serve_rows", "0", "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["fits"] is True
    assert out["peak_bytes"] == out["training"]["peak_bytes"] > 0
    assert {"quantization", "gradient_checkpointing", "micro_batch_size", "strategy"} <= set(out["settings"])
    assert "serving" not in out


def test_command_prints_both_tables_from_a_model_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(LLAMA_1B.read_text())
    code = finetune_main(
        ["plan", "--base_model", str(tmp_path), "--gpu_memory", "80GiB", "--serve_tokens", "8192"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("training:") and "\n\nserving:" in out and "required" in out


def test_command_exits_1_when_it_does_not_fit():
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune",
            "plan",
            "--base_model",
            str(LLAMA2_13B),
            "--gpu_memory",
            "8GB",
            "--serve_rows",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "does not fit" in run.stdout and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--gpu_memory", "24XB"], "--gpu_memory"),
        (["--gradient_checkpointing", "maybe"], "--gradient_checkpointing"),
        (["--lora_target_modules", "nope"], "--lora_target_modules"),
    ],
)
def test_command_bad_input_is_one_line_naming_the_flag(capsys, args, flag):
    code = finetune_main(["plan", "--base_model", str(LLAMA2_7B), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and flag in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_command_refuses_a_missing_folder_and_a_config_without_shape(tmp_path, capsys):
    assert finetune_main(["plan", "--base_model", str(tmp_path / "missing")]) == 2
    assert "--base_model" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert finetune_main(["plan", "--base_model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--base_model" in err and "num_hidden_layers" in err and len(err.splitlines()) == 1


def test_a_gpu_server_takes_the_kv_budget_its_plan_leaves_unless_the_operator_sets_one(monkeypatch, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.serving.server import engine_limits
    from finetune.settings import ServeSettings

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config)
    asked: list[int] = []
    gpu = torch.device("cuda")
    settings = ServeSettings(max_batch=3)
    limits = engine_limits(model, gpu, settings, lambda rows: asked.append(rows) or 777)
    assert asked == [3] and limits.kv_tokens == 777 and limits.max_batch == 3
    # Never more than max_batch full contexts, whatever the plan leaves.
    assert engine_limits(model, gpu, settings, lambda rows: 10**9).kv_tokens == 3 * 512
    operator = ServeSettings(max_batch=3, kv_tokens=100)
    assert engine_limits(model, gpu, operator, lambda rows: asked.append(rows) or 777).kv_tokens == 100
    assert asked == [3]  # the operator's budget wins without asking the plan


def test_training_settles_auto_settings_from_its_memory_plan(capsys):
    from finetune.config import ConfigError, TrainConfig
    from finetune.training.distributed import Dist
    from finetune.training.trainer import memory_plan

    llama13b = str(CONFIGS / "llama-2-13b.json")
    # A 24 GiB GPU: auto picks 4-bit with checkpointing for 13B.
    plan = memory_plan(TrainConfig(), llama13b, "cuda", 24 << 30, Dist())
    assert (
        plan.fits
        and plan.settings["quantization"] == "4bit"
        and plan.settings["gradient_checkpointing"] is True
    )
    # Nothing fits 8 GiB: auto stops before any weight loads, pointing at several GPUs.
    with pytest.raises(ConfigError, match="training does not fit this GPU.*GPUs"):
        memory_plan(TrainConfig(), llama13b, "cuda", 8 << 30, Dist())
    # Explicit settings the plan expects not to fit run anyway, with a warning.
    explicit = TrainConfig(quantization="none", gradient_checkpointing=False)
    assert not memory_plan(explicit, llama13b, "cuda", 24 << 30, Dist()).fits
    assert "warning: the memory plan expects this run not to fit" in capsys.readouterr().out
    # A CPU has no limit: auto is the fastest setting, nothing quantized.
    cpu = memory_plan(TrainConfig(), llama13b, "cpu", None, Dist())
    assert cpu.settings["quantization"] == "none" and cpu.settings["gradient_checkpointing"] is False


def test_serve_quant_auto_on_a_gpu_loads_bitsandbytes_only_where_the_dtype_leaves_no_room():
    from finetune.memory.plan import serving_quantization

    card = "24564MiB"  # an RTX 4090
    assert serving_quantization(CONFIGS / "llama-2-7b.json", gpu_memory=card, max_rows=8) == "none"
    assert serving_quantization(CONFIGS / "llama-2-7b.json", gpu_memory="16GiB", max_rows=8) == "bnb8"
    assert serving_quantization(CONFIGS / "llama-2-13b.json", gpu_memory=card, max_rows=8) == "bnb4"
    with pytest.raises(PlanError, match="even in 4-bit.*KV_CACHE_TOKENS="):
        serving_quantization(CONFIGS / "llama-2-13b.json", gpu_memory="12GiB", max_rows=8)
