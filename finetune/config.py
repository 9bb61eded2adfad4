"""Typed settings for every stage. Defaults live here once; the CLI, `train.py` and `predict.py`
read them from these dataclasses instead of repeating numbers."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT_ROOT / "weights"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / DEFAULT_MODEL_NAME
SAMPLE_DATA = PROJECT_ROOT / "data" / "sample_alpaca.json"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Quantization = Literal["auto", "none", "8bit", "4bit"]


class ConfigError(UserError, ValueError):
    """A setting is invalid; the message names the setting and how to fix it."""


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid settings:\n  - " + "\n  - ".join(problems))


@dataclass
class DataConfig:
    data_path: str = str(SAMPLE_DATA)
    """Training data: .json (a list of records) or .jsonl; Alpaca, prompt/completion, messages or text."""
    val_set_size: float = 0.1
    """Validation split: a fraction in [0, 1) or a record count (>= 1)."""
    cutoff_len: int = 256
    """Maximum tokens per example; the prompt side is truncated first, the response end and EOS kept."""
    train_on_inputs: bool = False
    """Also compute the loss on the prompt tokens (alpaca-lora's default was True)."""
    add_eos_token: bool = True
    """Append EOS to every response so the tuned model learns to stop."""
    prompt_template_name: str = "alpaca"
    """Prompt template: alpaca, alpaca_legacy, alpaca_short or chat (the tokenizer's chat template)."""
    group_by_length: bool = False
    """Batch examples of similar length together to cut padding (alpaca-lora's flag)."""
    packing: bool = False
    """Concatenate examples into padding-free micro-batches (attention never crosses examples). Pays on
    GPUs with variable-length attention; on CPUs attention over the packed row costs more than padding."""

    def problems(self) -> list[str]:
        out = []
        count_ok = self.val_set_size >= 1 and self.val_set_size == int(self.val_set_size)
        if not (0 <= self.val_set_size < 1 or count_ok):
            out.append(f"val_set_size={self.val_set_size}: use a fraction in [0, 1) or a whole count >= 1")
        if not 8 <= self.cutoff_len <= 131072:
            out.append(f"cutoff_len={self.cutoff_len}: must be between 8 and 131072")
        return out


@dataclass
class LoraSettings:
    lora_r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Linear layers to adapt (e.g. q_proj,v_proj), or all-linear (QLoRA's finding: adapting every
    linear layer matches full fine-tuning far better than q/v alone)."""

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.lora_r <= 1024:
            out.append(f"lora_r={self.lora_r}: must be between 1 and 1024")
        if self.lora_alpha <= 0:
            out.append(f"lora_alpha={self.lora_alpha}: must be positive")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if not self.lora_target_modules:
            out.append("lora_target_modules is empty: name layers such as q_proj,v_proj or all-linear")
        return out


@dataclass
class TrainConfig:
    base_model: str | None = None
    """Base model folder or hub id; default: $BASE_MODEL, else the embedded model in weights/."""
    output_dir: str = "outputs/lora-alpaca"
    """Where the adapter folder is written (atomically, at the end)."""
    batch_size: int = 8
    """Effective batch size in examples; gradient accumulation = batch_size / (micro_batch_size * world)."""
    micro_batch_size: int = 4
    """Examples per forward pass (per process)."""
    num_epochs: float | None = None
    """Passes over the training split. Unset or auto (the default): 3000 examples' worth (3 to 30
    epochs, at least 60 steps), stopping early once the training answers are recalled (see
    stop_patience). A number is exact. Ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means use num_epochs."""
    learning_rate: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_ratio: float = 0.05
    """Share of the steps spent warming up the learning rate linearly."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay on LoRA weights."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    seed: int = 42
    """Seed for the split, shuffling, LoRA init and dropout; same seed, same adapter."""
    dtype: Dtype = "auto"
    """Compute dtype: auto = bf16 where the device supports it, else fp32 (fp16 only on request)."""
    quantization: Quantization = "auto"
    """Load the base in 8-bit or 4-bit (QLoRA, nf4) through bitsandbytes (CUDA or CPU). auto: the
    memory plan's choice on a GPU, 4-bit only when bf16 does not fit even with checkpointing (see
    `python -m finetune plan`); none on a CPU."""
    gradient_checkpointing: bool | None = None
    """Recompute activations in the backward pass to save memory. Unset or auto: on when the memory
    plan says training does not fit the GPU without it."""
    logging_steps: int = 1
    """Print a step line every N optimizer steps."""
    eval_steps: int = 0
    """Evaluate (validation loss, recall) every N steps; 0: ten times a run with num_epochs auto,
    else only at the end."""
    eval_recall: int = 16
    """Training records whose answers each evaluation checks for greedy recall (exact match and
    token accuracy); 0 turns recall off."""
    stop_patience: int = 3
    """With num_epochs auto: stop once every checked answer is recalled exactly, or after this many
    evaluations without better recall; then keep the best evaluation's adapter. 0: run the budget."""
    eval_generate: int = 20
    """Validation records to also answer greedily at the end (base vs adapter exact match, F1); 0 skips."""
    save_steps: int = 0
    """Write a resumable checkpoint every N steps (0: never)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder to resume from, or "latest" for the newest under output_dir."""
    wandb_project: str = ""
    """Log to Weights & Biases under this project (only when set)."""
    wandb_run_name: str = ""
    wandb_watch: str = ""
    wandb_log_model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        problems = self.data.problems() + self.lora.problems()
        if self.micro_batch_size < 1:
            problems.append(f"micro_batch_size={self.micro_batch_size}: must be >= 1")
        if self.batch_size < self.micro_batch_size:
            problems.append(
                f"batch_size={self.batch_size} is smaller than micro_batch_size={self.micro_batch_size}:"
                " raise batch_size or lower micro_batch_size"
            )
        if self.num_epochs is not None and self.num_epochs <= 0 and self.max_steps <= 0:
            problems.append(f"num_epochs={self.num_epochs}: use a number > 0, auto, or max_steps > 0")
        for name in ("eval_steps", "eval_recall", "stop_patience"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must be >= 0")
        if self.max_steps < 0:
            problems.append(f"max_steps={self.max_steps}: must be >= 0")
        if not 0 < self.learning_rate < 1:
            problems.append(f"learning_rate={self.learning_rate}: must be in (0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        _check(problems)


MIN_TEMPERATURE = 1e-6
# Bounds on what one request may ask of the engine (predict.py declares the same to Cog's schema).
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    """Tokens to generate at most."""
    temperature: float = 0.1
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 0.75
    """Nucleus sampling: keep the smallest token set with this much probability."""
    top_k: int = 40
    """Keep only the k most likely tokens (0 disables)."""
    repetition_penalty: float = 1.0
    """Penalty > 1 discourages repeating tokens already in the text."""
    stop_sequences: list[str] = field(default_factory=list)
    """Stop generating when any of these strings appears (it is not returned)."""
    seed: int | None = None
    """Sampling seed for reproducible output."""

    def __post_init__(self) -> None:
        problems = []
        if self.seed is not None and (type(self.seed) is not int or not 0 <= self.seed <= MAX_SEED):
            problems.append(f"seed = {str(self.seed)[:40]}: use a whole number from 0 to {MAX_SEED}")
        stops = self.stop_sequences
        if len(stops) > MAX_STOP_SEQUENCES or any(len(x) > MAX_STOP_CHARS for x in stops):
            problems.append(
                f"stop_sequences: at most {MAX_STOP_SEQUENCES} strings of at most {MAX_STOP_CHARS} characters"
            )
        _check(problems)

    @property
    def samples(self) -> bool:
        """Sampling, not greedy. Below 1e-6 the temperature is greedy in all but name, and divides
        fp32 logits into inf from about 1e-38 on, so it decodes greedily."""
        return self.temperature >= MIN_TEMPERATURE


def field_default(cls: type, name: str):
    """The default of a dataclass field, for entry points that must not copy numbers."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__} has no field {name}")


def field_doc(cls: type, name: str) -> str:
    """The docstring written under a dataclass field (used for --help and cog.Input descriptions)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == name
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            return " ".join(str(nxt.value.value).split())
    return ""


def parse_list(text: str) -> list[str]:
    """'[q_proj,v_proj]', "['q_proj', 'v_proj']" or 'q_proj,v_proj'."""
    items = [s.strip().strip("'\"") for s in text.strip().strip("[]").split(",")]
    return [s for s in items if s]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
