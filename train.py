"""Cog trainer (`cog train -i train_data=@data.json`, POST /trainings): returns a weights archive that
a predictor loads through COG_WEIGHTS (a "trained version"). Thin: the work is in finetune/."""

from typing import Optional, get_args

from cog import BaseModel, Input, Path

from finetune.cog.service_train import RUN_ID, run_training
from finetune.config import (
    DataConfig,
    LoraSettings,
    Quantization,
    TrainConfig,
    field_default,
    field_doc,
    parse_list,
)
from finetune.data.prompts import available_templates
from finetune.training.cli import parse_auto_bool
from finetune.training.stopping import watch_sigterm

# Cog's worker calls train() off the main thread, where Python's SIGTERM handling never reaches:
# armed here, at import in the main thread, a SIGTERM makes the training checkpoint and stop.
watch_sigterm()


def _input(cls: type, name: str, **bounds):
    return Input(description=field_doc(cls, name), default=field_default(cls, name), **bounds)


class TrainingOutput(BaseModel):
    weights: Path
    train_loss: float
    eval_loss: Optional[float]
    base_eval_loss: Optional[float]
    eval_exact_match: Optional[float]
    base_eval_exact_match: Optional[float]
    eval_f1: Optional[float]
    base_eval_f1: Optional[float]
    steps: int
    tokens_per_second: float


def train(
    train_data: Path = Input(
        description="Training data: JSON list or JSONL of Alpaca {instruction, input, output}, "
        "{prompt, completion}, {messages} or {text} records."
    ),
    num_train_epochs: Optional[float] = _input(TrainConfig, "num_epochs", ge=0.01, le=100),
    max_steps: int = _input(TrainConfig, "max_steps", ge=0, le=1_000_000),
    learning_rate: float = _input(TrainConfig, "learning_rate", ge=1e-8, le=0.1),
    batch_size: int = _input(TrainConfig, "batch_size", ge=1, le=4096),
    micro_batch_size: int = _input(TrainConfig, "micro_batch_size", ge=1, le=512),
    lora_rank: int = _input(LoraSettings, "lora_r", ge=1, le=1024),
    lora_alpha: int = _input(LoraSettings, "lora_alpha", ge=1, le=4096),
    lora_dropout: float = _input(LoraSettings, "lora_dropout", ge=0, le=0.9),
    lora_target_modules: str = Input(
        description="Comma-separated layers to adapt (e.g. q_proj,v_proj), or all-linear.",
        default=",".join(field_default(LoraSettings, "lora_target_modules")),
    ),
    cutoff_len: int = _input(DataConfig, "cutoff_len", ge=8, le=131072),
    train_on_inputs: bool = _input(DataConfig, "train_on_inputs"),
    val_set_size: float = _input(DataConfig, "val_set_size", ge=0),
    prompt_template: str = Input(
        description=field_doc(DataConfig, "prompt_template_name"),
        default=field_default(DataConfig, "prompt_template_name"),
        choices=available_templates(),
    ),
    seed: Optional[int] = Input(description=field_doc(TrainConfig, "seed"), default=None),
    quantization: str = Input(
        description=field_doc(TrainConfig, "quantization"),
        default=field_default(TrainConfig, "quantization"),
        choices=list(get_args(Quantization)),
    ),
    gradient_checkpointing: str = Input(
        description=field_doc(TrainConfig, "gradient_checkpointing"),
        default="auto",
        choices=["auto", "true", "false"],
    ),
    resume_from: Optional[str] = Input(
        description="The run id of a training stopped by SIGTERM (its error and logs name it): "
        "finish that training from its checkpoint. Give the same train_data and settings.",
        default=None,
        regex=f"^{RUN_ID.pattern}$",
    ),
) -> TrainingOutput:
    summary = run_training(
        lambda output_dir: TrainConfig(
            output_dir=output_dir,
            num_epochs=num_train_epochs,
            max_steps=max_steps,
            learning_rate=learning_rate,
            batch_size=batch_size,
            micro_batch_size=micro_batch_size,
            seed=seed if seed is not None else field_default(TrainConfig, "seed"),
            quantization=quantization,
            gradient_checkpointing=parse_auto_bool(gradient_checkpointing),
            data=DataConfig(
                data_path=str(train_data),
                cutoff_len=cutoff_len,
                train_on_inputs=train_on_inputs,
                val_set_size=val_set_size,
                prompt_template_name=prompt_template,
            ),
            lora=LoraSettings(
                lora_r=lora_rank,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                lora_target_modules=parse_list(lora_target_modules),
            ),
        ),
        resume_from=resume_from,
    )
    return TrainingOutput(
        weights=Path(summary.archive),
        train_loss=summary.train_loss,
        eval_loss=summary.eval_loss,
        base_eval_loss=summary.base_eval_loss,
        steps=summary.steps,
        eval_exact_match=summary.metric("exact_match", "adapter"),
        base_eval_exact_match=summary.metric("exact_match", "base"),
        eval_f1=summary.metric("f1", "adapter"),
        base_eval_f1=summary.metric("f1", "base"),
        tokens_per_second=summary.tokens_per_second,
    )
