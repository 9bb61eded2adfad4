"""Loading the base model and tokenizer (device, dtype, quantization), attaching a new LoRA, and
loading saved adapters safely.

Quantization (`8bit`, `4bit`: QLoRA's nf4 with double quantization) goes through bitsandbytes, on a
CUDA GPU or on a CPU (its CPU backend, a native library in the same wheel). Two things of that CPU
backend (bitsandbytes 0.50) shape what is here: on CPUs with AVX512-BF16 a 4-bit layer repacks its
weight for a bf16 kernel, in place, on its first forward pass outside training (see
`limit_cpu_repacking`); and its 8-bit layers outside training cast activations to float16 to
quantize them (LLM.int8()), as on a GPU."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LoraSettings
from ..errors import UserError

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Config fields that must agree between the base an adapter was trained on and the one it runs on.
IDENTITY_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


# bitsandbytes' loggers that speak on every run of this project, and why they are quieted to errors:
BNB_QUIET = (
    # At import (peft imports bitsandbytes), on CPUs with AVX512-BF16: the optional `kernels`
    # package is missing, which would fetch a faster 4-bit CPU kernel from the Hugging Face Hub at
    # run time. The wheel's own kernel runs instead; a server should not download code.
    "bitsandbytes.backends.cpu.ops",
    # On every forward pass of every 8-bit layer outside training: "inputs will be cast from
    # float32 to float16" (LLM.int8() quantizes float16 activations), once per layer and token.
    "bitsandbytes.autograd._functions",
)
# A 4-bit weight repacked for bitsandbytes' bf16 CPU kernel comes in blocks of this many outputs.
BNB_CPU_BLOCK_N = 32


class ModelError(UserError, RuntimeError):
    """The model, adapter or device setting cannot be used; the message says why and what to do."""


def quiet_bitsandbytes() -> None:
    for name in BNB_QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)


quiet_bitsandbytes()


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run several times faster than fp32 on such CPUs."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """How weights are stored and which dtype matmuls run in."""

    weights: torch.dtype
    compute: torch.dtype

    @property
    def autocast(self) -> bool:
        return self.compute != self.weights


def pick_precision(requested: str, device: torch.device, training: bool) -> Precision:
    """auto: bf16 on GPUs that support it; on CPUs with fast bf16, bf16 autocast for training
    (fp32 trainable weights; the trainer stores the frozen base in bf16); fp32 otherwise, which
    keeps CPU inference exact. bfloat16 on a CPU: the same for training, bf16 weights for inference
    (half the memory, ~35 % faster prefill on AMX). fp16 only when asked (training then needs loss
    scaling)."""
    if requested == "float32":
        return Precision(torch.float32, torch.float32)
    if requested == "float16":
        if device.type != "cuda":
            raise ModelError("dtype float16 is only supported on CUDA; use bfloat16 or float32 on CPU")
        return Precision(torch.float16, torch.float16)
    if requested == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ModelError("this GPU has no bfloat16 support; use dtype float16 or float32")
        if device.type == "cpu" and not cpu_has_fast_bf16():
            # Honoured (it halves the memory), but the user asked for speed they will not get.
            print(
                "warning: dtype bfloat16 on a CPU without AMX or AVX512-BF16: bf16 matmuls of many "
                "rows (prompts, training) run several times slower than fp32 here (measured on an "
                "AVX2 CPU: 3.4x for 56 rows); auto (fp32, int8 decoding) is faster",
                file=sys.stderr,
                flush=True,
            )
        if device.type == "cpu" and training:
            return Precision(torch.float32, torch.bfloat16)
        return Precision(torch.bfloat16, torch.bfloat16)
    if device.type == "cuda":
        return (
            Precision(torch.bfloat16, torch.bfloat16)
            if torch.cuda.is_bf16_supported()
            else Precision(torch.float32, torch.float32)
        )
    if training and cpu_has_fast_bf16():
        return Precision(torch.float32, torch.bfloat16)
    return Precision(torch.float32, torch.float32)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        # LLaMA's sentencepiece tokenizers have no pad token; unk (or eos) is safe because labels
        # are masked with IGNORE_INDEX, never by comparing to the pad id.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_base(
    path: str,
    device: torch.device,
    precision: Precision,
    quantization: str = "none",
    attn_implementation: str = "sdpa",
) -> Any:
    """The base model on `device`; with quantization 8bit/4bit its linear layers (not the embeddings
    or the vocabulary projection) are bitsandbytes layers."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": precision.weights, "attn_implementation": attn_implementation}
    if quantization != "none":
        kwargs["quantization_config"] = bitsandbytes_config(quantization, device, precision)
        # The whole model on the one device: bitsandbytes' CPU backend, or the GPU.
        kwargs["device_map"] = {"": "cpu" if device.type == "cpu" else (device.index or 0)}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "none":
        model.to(device)
    elif device.type == "cpu":
        limit_cpu_repacking(model, training=False)
    return model


def bitsandbytes_config(quantization: str, device: torch.device, precision: Precision) -> Any:
    """transformers' BitsAndBytesConfig for 8bit or 4bit (nf4, double quantization), or a ModelError
    saying why this installation or device cannot run it. The 4-bit compute dtype is the precision's
    (float32 or bfloat16 on a CPU, both of which the CPU backend computes in)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ModelError(
            f"quantization {quantization} needs the bitsandbytes package (pinned in requirements.txt): "
            "pip install bitsandbytes==0.50.2, or use quantization none"
        ) from None
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cpu", "cuda"})
    if device.type not in supported or device.type not in ("cpu", "cuda"):
        raise ModelError(
            f"quantization {quantization} runs on a CPU or a CUDA GPU (bitsandbytes), not on {device.type}; "
            "use quantization none"
        )
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=precision.compute,
        )
    raise ModelError(f"quantization {quantization!r}: use none, 8bit or 4bit")


def is_bitsandbytes_model(model: Any) -> bool:
    """The base's linear layers are bitsandbytes layers (loaded with quantization 8bit or 4bit)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def limit_cpu_repacking(model: Any, training: bool) -> int:
    """On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit layer's weight for its bf16 kernel
    on the layer's first forward pass outside training with no gradient, in place and for good. Turned
    off here where that goes wrong; returns how many layers it was turned off for:
    * a model being trained: the repacked kernel has no backward, so after one evaluation pass the
      LoRA layers below a repacked layer silently got no gradient (measured: None grads);
    * a layer whose shape the repacking cannot take (inputs a multiple of the quantization block,
      outputs of 32): it fails there. Real LLaMA shapes fit; tiny test models may not."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    off = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        block = getattr(module.weight, "blocksize", None) or 64
        fits = module.in_features % block == 0 and module.out_features % BNB_CPU_BLOCK_N == 0
        if training or not fits:
            module.support_avx512bf16_for_cpu = False
            off += 1
    return off


def add_lora(
    model: Any, lora: LoraSettings, gradient_checkpointing: bool = False, quantized: bool = False
) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Freezes the base and casts its non-quantized fp16/bf16 weights (norms, embeddings, head) to
        # fp32, on a CPU as on a GPU; checkpointing as below (non-reentrant).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets: str | list[str] = list(lora.lora_target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        unknown = [t for t in targets if t not in names]
        if unknown:
            linear = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise ModelError(
                f"lora_target_modules {unknown} not found in this model; its linear layers are {linear}"
            )
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


class FastDropout(torch.nn.Module):
    """nn.Dropout for CPU training: the same Bernoulli mask (p rounded to 1/65536) and 1/(1-p)
    scale, but four mask entries per 64-bit random word, where CPU `bernoulli_` draws a word per
    element. On LoRA inputs it was 7 % of a bench training step; this draws ~3x faster."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # int16 draws below it are dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        # Full 64-bit range: a bare random_() stays non-negative, which would bias every 4th draw.
        words = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
        draws = words.view(torch.int16)[:n].view(x.shape)
        return x * ((draws >= self.threshold).to(x.dtype) * (1 / (1 - self.p)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: Any) -> int:
    """Swap the LoRA layers' nn.Dropout for FastDropout (no weights change: dropout has none)."""
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if isinstance(table, torch.nn.ModuleDict):
            for name, dropout in table.items():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    table[name] = FastDropout(dropout.p)
                    swapped += 1
    return swapped


def load_for_training(
    path: str,
    device: torch.device,
    precision: Precision,
    lora: LoraSettings,
    gradient_checkpointing: bool = False,
    quantization: str = "none",
) -> Any:
    """The base with a new LoRA, prepared as training runs it. With autocast the frozen base is
    loaded straight into the compute dtype (no fp32 copy ever exists), which saves autocast from
    re-casting every weight on every forward pass; LoRA weights stay fp32 for the optimizer (peft
    upcasts them); with quantization, the non-quantized weights (norms, embeddings, head) go back to
    fp32 (prepare_model_for_kbit_training). On CPU the LoRA dropout is FastDropout."""
    stored = Precision(precision.compute, precision.compute) if precision.autocast else precision
    model = load_base(path, device, stored, quantization)
    if quantization != "none" and device.type == "cpu":
        limit_cpu_repacking(model, training=True)
    model.config.use_cache = False
    model = add_lora(model, lora, gradient_checkpointing, quantized=quantization != "none")
    if device.type == "cpu":
        use_fast_dropout(model)
    return model


def base_identity(model: Any, source: str) -> dict[str, Any]:
    cfg = model.config
    fields = {k: getattr(cfg, k, None) for k in IDENTITY_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "source": source,
        "name_or_path": getattr(cfg, "name_or_path", ""),
        "config_fingerprint": digest,
        **fields,
    }


def check_identity(expected: dict[str, Any], model: Any, adapter: str) -> None:
    actual = {k: getattr(model.config, k, None) for k in IDENTITY_FIELDS}
    diffs = [
        f"{k}: adapter {expected.get(k)} vs base {actual[k]}"
        for k in IDENTITY_FIELDS
        if k in expected and expected[k] != actual[k]
    ]
    if diffs:
        raise ModelError(
            f"adapter {adapter} was trained on a different base model ({expected.get('source') or expected.get('name_or_path')}) "
            f"than the one loaded ({getattr(model.config, 'name_or_path', '?')}): " + "; ".join(diffs)
        )


def attach_adapter(model: Any, folder: Path, name: str = "default", config: Any = None) -> Any:
    """Load the LoRA adapter in `folder` into `model` under `name`: a new PeftModel around a bare
    model, or one more adapter of a PeftModel. `config`: a LoraConfig to use instead of the folder's
    own (the server passes the one it built from checked values; adapter_limits.py)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if config is not None:
            model.add_adapter(name, config)
        model.load_adapter(str(folder), adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, str(folder), adapter_name=name, config=config)


def check_adapter_dir(folder: Path) -> None:
    """An adapter folder must hold safetensors weights; pickles are refused, never unpickled."""
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"{folder} is not a LoRA adapter: {ADAPTER_CONFIG} is missing")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        if (folder / "adapter_model.bin").exists():
            raise ModelError(
                f"{folder} holds a pickled adapter_model.bin; pickles can run code, so they are refused. "
                "Convert it where you trust it: `python -m finetune convert-adapter --input "
                f"{folder}` loads it with torch.load(weights_only=True) and writes {ADAPTER_WEIGHTS}."
            )
        raise ModelError(f"{folder} is not a LoRA adapter: {ADAPTER_WEIGHTS} is missing")
