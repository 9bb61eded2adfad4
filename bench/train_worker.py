"""One training variant in its own process, so that peak RSS belongs to that variant alone.

    python -m bench.train_worker SPEC.json OUT.json

Every variant trains on the same encoded examples in the same micro-batch order (the order our
trainer draws for seed/epoch 0), so step k sees the same records everywhere and the per-step token
counts are identical. Throughput is measured the same way for all: non-padding tokens of steps
2..N over the wall time from the end of step 1 to the end of step N (step 1 pays one-off costs)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_LORA,
    load_avg,
    log,
    peak_gpu_mb,
    peak_rss_mb,
    read_json,
    setup_torch,
    sync,
    write_json,
)

# variant -> settings. "hf" is the classic alpaca-lora recipe; "ours" is finetune.training.trainer.train with
# the project's defaults (dtype, packing), except the LoRA, which is pinned for every variant. A
# key left out means "the project's default".
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"trainer": "hf", "amp": False, "about": "HF Trainer + PEFT, fp32, padded micro-batches"},
    "baseline_amp": {
        "trainer": "hf",
        "amp": True,
        "about": "HF Trainer + PEFT, bf16 mixed precision, padded",
    },
    "ours": {"trainer": "ours", "about": "finetune.training.trainer defaults"},
    "ours_glibc": {
        "trainer": "ours",
        "about": "ours with glibc's malloc (TRAIN_JEMALLOC=off)",
        "jemalloc": False,
    },
    "baseline_jemalloc": {
        "trainer": "hf",
        "amp": False,
        "about": "the baseline with jemalloc preloaded",
        "jemalloc": True,
    },
    "ours_defaults": {
        "trainer": "ours",
        "about": "ours at the project's defaults: LoRA r=8 on all linear layers, lr 1e-3",
        "lora": "defaults",
    },
    "ours_fp32": {"trainer": "ours", "dtype": "float32", "about": "ours, fp32"},
    "ours_packed": {"trainer": "ours", "packing": True, "about": "ours, packing on"},
    "ours_padded": {"trainer": "ours", "packing": False, "about": "ours, packing off"},
    "ours_unsorted": {
        "trainer": "ours",
        "about": "ours without re-splitting each step's records longest first",
        "sorted_steps": False,
    },
    "ours_compiled": {
        "trainer": "ours",
        "about": "ours with each decoder layer under torch.compile (dynamic shapes; compile in step 1)",
        "compile_layers": True,
    },
    "ours_grouped": {
        "trainer": "ours",
        "group_by_length": True,
        "about": "ours, length-grouped micro-batches",
    },
    "ours_qlora4": {
        "trainer": "ours",
        "quantization": "4bit",
        "about": "ours, 4-bit QLoRA (bitsandbytes nf4)",
    },
}


def preloads_jemalloc(name: str) -> bool:
    """Our entry points (finetune.py, make train) preload jemalloc where the system has it
    (finetune/training/allocator.py): the bench starts our variants the same way and the recipe's as people
    run it, unless a variant says otherwise. `jemalloc` in each result says what ran."""
    variant = VARIANTS[name]
    return variant.get("jemalloc", variant["trainer"] == "ours")


def other_packing_variant() -> str:
    """The variant that flips the project's packing default: what packing buys or costs."""
    from finetune.config import DataConfig, field_default

    return "ours_padded" if field_default(DataConfig, "packing") else "ours_packed"


def make_config(spec: dict[str, Any], variant: dict[str, Any], output_dir: Path) -> Any:
    from finetune.config import DataConfig, LoraSettings, TrainConfig

    defaults = variant.get("lora") == "defaults"
    return TrainConfig(
        output_dir=str(output_dir),
        batch_size=spec["batch_size"],
        micro_batch_size=spec["micro_batch_size"],
        max_steps=spec["steps"],
        # The defaults variant keeps TrainConfig's learning rate and LoraSettings' targets.
        **({} if defaults else {"learning_rate": spec["learning_rate"]}),
        seed=spec["seed"],
        **{k: variant[k] for k in ("dtype", "quantization") if k in variant},
        logging_steps=spec["steps"],
        lora=LoraSettings() if defaults else LoraSettings(**BENCH_LORA),
        data=DataConfig(
            data_path=spec["data_path"],
            val_set_size=0,
            cutoff_len=spec["cutoff_len"],
            **{k: variant[k] for k in ("packing", "group_by_length") if k in variant},
        ),
    )


def examples_in_order(cfg: Any, tokenizer: Any, per_step: int = 1) -> tuple[list[Any], list[list[int]]]:
    """The encoded training examples and the micro-batches our trainer draws in epoch 0 (per_step:
    its optimizer step's micro-batches, re-split longest first; the recipe's feed in plain order)."""
    from finetune.data import prompts
    from finetune.data.batching import micro_batches
    from finetune.data.dataset_file import read_records
    from finetune.data.records import split_records
    from finetune.training.run_data import encode_records

    train_records, _ = split_records(read_records(cfg.data.data_path), cfg.data.val_set_size, cfg.seed)
    template = prompts.load_template(cfg.data.prompt_template_name)
    examples = encode_records(train_records, tokenizer, template, cfg)
    batches = micro_batches(
        examples, cfg.micro_batch_size, cfg.seed, 0, cfg.data.group_by_length, per_step=per_step
    )
    return examples, batches


class StepClock:
    """End-of-step timestamps (wall and process CPU) and losses."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.loss: list[float] = []
        self.start: float | None = None  # training start, where the trainer exposes it

    def tick(self, loss: float | None = None) -> None:
        sync(self.device)
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if loss is not None:
            self.loss.append(float(loss))


Run = tuple[dict[str, Any], list[Any], list[list[int]]]


def run_hf(spec: dict[str, Any], variant: dict[str, Any], cfg: Any, clock: StepClock) -> Run:
    """The classic alpaca-lora loop: transformers.Trainer, DataCollatorForSeq2Seq padding to the
    longest row (labels padded with -100), no packing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from finetune.model.loading import load_tokenizer
    from finetune.model.weights import resolve_base_model

    base = resolve_base_model(cfg.base_model)
    tokenizer = load_tokenizer(base)
    examples, batches = examples_in_order(cfg, tokenizer)
    # The trainer's micro-batch order, flattened; a sequential sampler replays it exactly.
    dataset = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e), "labels": e.labels}
        for e in (examples[i] for batch in batches for i in batch)
    ]
    device = spec["device"]
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    lora = cfg.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=list(lora.lora_target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    accum = cfg.batch_size // cfg.micro_batch_size
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "hf-output"),
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accum,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(cfg.warmup_ratio * cfg.max_steps),  # ours: int(ratio * steps)
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=bool(variant.get("amp")),
        use_cpu=device == "cpu",
        seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        label_names=["labels"],
    )

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.tick()

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[Clock()],
    )
    trainer.train()
    clock.loss = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return (
        {
            "total_params": sum(p.numel() for p in model.parameters()),
            "compute_dtype": "bfloat16 (autocast)" if variant.get("amp") else "float32",
        },
        examples,
        batches,
    )


def run_ours(spec: dict[str, Any], variant: dict[str, Any], cfg: Any, clock: StepClock) -> Run:
    import finetune.training.trainer
    from finetune.model.loading import load_tokenizer
    from finetune.model.weights import resolve_base_model
    from finetune.training.trainer import train

    per_step = cfg.batch_size // cfg.micro_batch_size if variant.get("sorted_steps", True) else 1
    if per_step == 1:  # the trainer as it was before steps were re-split by length
        import finetune.data.batching

        plain = finetune.data.batching.micro_batches
        finetune.training.trainer.micro_batches = lambda *args: plain(*args[:7])  # type: ignore[assignment]
    compiled: list[int] = []
    if variant.get("compile_layers"):
        load = finetune.training.trainer.load_for_training

        def compiled_layers(*args: Any, **kwargs: Any) -> Any:
            model = load(*args, **kwargs)
            for layer in model.get_base_model().model.layers:
                layer.compile(dynamic=True)
                compiled.append(1)
            return model

        finetune.training.trainer.load_for_training = compiled_layers  # type: ignore[assignment]
    examples, batches = examples_in_order(cfg, load_tokenizer(resolve_base_model(cfg.base_model)), per_step)
    result = train(cfg, on_step=lambda entry: clock.tick(entry["loss"]), log=lambda text: log(text))
    t = result.card["training"]
    return (
        {
            "total_params": t["total_params"],
            "compute_dtype": t["compute_dtype"]
            + (" (autocast)" if t["compute_dtype"] != t["weights_dtype"] else ""),
            "card_tokens_per_second": t["tokens_per_second"],
            "card_tokens": t["tokens"],
            "adapter_dir": str(result.adapter_dir),
            **({"compiled_layers": len(compiled)} if variant.get("compile_layers") else {}),
        },
        examples,
        batches,
    )


def main(spec_path: str, out_path: str) -> None:
    from finetune.training.allocator import preloaded

    spec = read_json(spec_path)
    setup_torch(spec["device"], spec["threads"])
    import torch

    name = spec["variant"]
    variant = VARIANTS[name]
    cfg = make_config(spec, variant, Path(spec["workdir"]) / f"adapter-{name}")
    clock = StepClock(spec["device"])
    load_before = load_avg()
    started = time.perf_counter()
    runner = run_hf if variant["trainer"] == "hf" else run_ours
    info, examples, batches = runner(spec, variant, cfg, clock)

    accum = cfg.batch_size // cfg.micro_batch_size
    step_tokens = [
        sum(len(examples[i]) for batch in batches[k * accum : (k + 1) * accum] for i in batch)
        for k in range(cfg.max_steps)
    ]
    padded_tokens = [
        sum(max(len(examples[i]) for i in b) * len(b) for b in batches[k * accum : (k + 1) * accum])
        for k in range(cfg.max_steps)
    ]
    if len(clock.wall) != cfg.max_steps:
        raise RuntimeError(f"{name}: saw {len(clock.wall)} step ends for {cfg.max_steps} steps")
    steady_s = clock.wall[-1] - clock.wall[0]
    steady_cpu = clock.cpu[-1] - clock.cpu[0]
    steady_tokens = sum(step_tokens[1:])
    if clock.start is not None:  # same definition as our card: all steps, step 1 included
        info["all_steps_tokens_per_second"] = round(sum(step_tokens) / (clock.wall[-1] - clock.start), 2)
    out = {
        "variant": name,
        "about": variant["about"],
        "packing": cfg.data.packing,
        "device": spec["device"],
        "threads": torch.get_num_threads(),
        "steps": cfg.max_steps,
        "micro_batch_size": cfg.micro_batch_size,
        "gradient_accumulation": accum,
        "tokens_per_step": step_tokens,
        "padding_efficiency": round(sum(step_tokens) / sum(padded_tokens), 3),
        # Share of positions with a label (train_on_inputs=False: the prompt side has none).
        "trained_fraction": round(
            sum(examples[i].trained_tokens for b in batches for i in b)
            / sum(len(examples[i]) for b in batches for i in b),
            3,
        ),
        "tokens_per_second": round(steady_tokens / steady_s, 2),
        "steady_tokens": steady_tokens,
        "steady_seconds": round(steady_s, 3),
        "seconds_per_step": round(steady_s / (cfg.max_steps - 1), 3),
        "step_seconds": [round(b - a, 3) for a, b in zip(clock.wall, clock.wall[1:], strict=False)],
        # CPU seconds per wall second over the timed steps: ~threads when the machine is ours alone.
        "cpu_utilisation": round(steady_cpu / steady_s, 2),
        "loss_per_step": [round(x, 4) for x in clock.loss],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_gpu_mb": peak_gpu_mb(spec["device"]),
        "process_seconds": round(time.perf_counter() - started, 1),
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "jemalloc": preloaded(),
        "learning_rate": cfg.learning_rate,
        "lora_targets": cfg.lora.lora_target_modules,
        **info,
    }
    write_json(out_path, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
