"""The prediction service behind predict.py: one resident base model, a setup adapter (merged for
speed while it is the only one in use) and an LRU cache of per-request adapters."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import types
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import prompts
from .archives import Limits, materialize
from .artifacts import CARD_JSON
from .compute import ComputeThread
from .config import DataConfig, GenerationSettings, env_flag, field_default
from .inference import GenerationStats, stream_tokens
from .modeling import (
    ModelError,
    check_adapter_dir,
    check_identity,
    load_base,
    load_tokenizer,
    pick_device,
    pick_precision,
)
from .weights import resolve_base_model

ADAPTER_CACHE_ENV = "ADAPTER_CACHE_SIZE"
LOCAL_LORA_ENV = "ALLOW_LOCAL_LORA_WEIGHTS"
DTYPE_ENV = "SERVE_DTYPE"  # auto | float32 | bfloat16 | float16
DTYPES = ("auto", "float32", "bfloat16", "float16")
# An adapter is megabytes (a few GB for r=64 on all layers of a 70B); a request gets tighter
# limits than the operator's COG_WEIGHTS.
SETUP_LIMITS = Limits()
REQUEST_LIMITS = Limits(
    max_files=64, max_total_bytes=4 * 2**30, max_file_bytes=4 * 2**30, max_download_bytes=4 * 2**30
)
DEFAULT_ADAPTER_DIR = Path("weights") / "adapter"


@dataclass
class LoadedAdapter:
    name: str
    folder: Path
    template: prompts.PromptTemplate | None


def adapter_key(source: str) -> str:
    return "a" + hashlib.sha256(source.encode()).hexdigest()[:16]


class ModelServer:
    def __init__(
        self,
        base_model: str | None = None,
        adapter: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        cache_size: int | None = None,
        compute: ComputeThread | None = None,
    ) -> None:
        self.device = pick_device(device)
        dtype = dtype or os.environ.get(DTYPE_ENV) or "auto"
        if dtype not in DTYPES:
            raise ModelError(f"{DTYPE_ENV}={dtype!r} is not a dtype: use one of {', '.join(DTYPES)}")
        self.precision = pick_precision(dtype, self.device, training=False)
        self.base_path = resolve_base_model(base_model)
        self.workdir = Path(tempfile.mkdtemp(prefix="adapters-"))
        self.capacity = cache_size or int(os.environ.get(ADAPTER_CACHE_ENV, "4"))
        self.cache: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.setup_adapter: LoadedAdapter | None = None
        self.merged = False
        # Every torch call of this server runs on this thread (see compute.py for why); a process
        # that runs other torch work beside the server passes one thread for all of it.
        self.compute = compute or ComputeThread()
        self.compute.call(self._setup, adapter)

    def _setup(self, adapter: str | None) -> None:
        self.tokenizer = load_tokenizer(self.base_path)
        self.model: Any = load_base(self.base_path, self.device, self.precision).eval()
        if adapter:
            self.setup_adapter = self._load(adapter, pinned=True)
            # One fixed adapter: fold it into the base weights, so decoding costs what the base does.
            self.model.merge_adapter()
            self.merged = True
        flatten_head_input(self.model)
        self._warm_up()
        print(
            f"setup: base {self.base_path} on {self.device} ({self.precision.weights}); "
            f"adapter {adapter or 'none'}{' (merged)' if self.merged else ''}",
            file=sys.stderr,
            flush=True,
        )

    def _warm_up(self) -> None:
        # The first forward pass pays for kernel selection and allocation; pay it in setup, not in
        # the first user's time to first token.
        settings = GenerationSettings(max_new_tokens=2, temperature=0)
        for _ in stream_tokens(self.model, self.tokenizer, "Hello", settings):
            pass

    # -- adapters ---------------------------------------------------------------------------
    def _load(self, source: str, pinned: bool = False) -> LoadedAdapter:
        from peft import PeftModel

        # COG_WEIGHTS is the operator's choice; a per-request path would let any caller probe the
        # server's disk, so requests may only send URLs and data URIs unless the operator opts in.
        allow_local = pinned or env_flag(LOCAL_LORA_ENV)
        limits = SETUP_LIMITS if pinned else REQUEST_LIMITS
        folder = materialize(source, self.workdir, limits, allow_local=allow_local)
        try:
            check_adapter_dir(folder)
            card_path = folder / CARD_JSON
            if card_path.is_file():
                card = json.loads(card_path.read_text(encoding="utf-8"))
                check_identity(card.get("base_model", {}), self.model, source)
            template = prompts.template_from_adapter(folder)
            name = "setup" if pinned else adapter_key(source)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(folder), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
        except BaseException:
            # A refused adapter must not stay on disk: strangers could fill it one request at a time.
            if self.workdir in folder.parents:
                shutil.rmtree(self._extraction_root(folder), ignore_errors=True)
            raise
        self.model.eval()
        return LoadedAdapter(name, folder, template)

    def _extraction_root(self, folder: Path) -> Path:
        """The top folder materialize() created under workdir (an archive may nest one more level)."""
        return self.workdir / folder.relative_to(self.workdir).parts[0]

    def _get(self, source: str) -> LoadedAdapter:
        key = adapter_key(source)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        loaded = self._load(source)
        self.cache[key] = loaded
        while len(self.cache) > self.capacity:
            _, old = self.cache.popitem(last=False)
            self.model.delete_adapter(old.name)
            if self.workdir in old.folder.parents:
                shutil.rmtree(self._extraction_root(old.folder), ignore_errors=True)
        return loaded

    def _activate(self, lora_weights: str | None) -> LoadedAdapter | None:
        """Point the model at the adapter this request needs and return it (None: bare base)."""
        wanted = self._get(lora_weights) if lora_weights else self.setup_adapter
        if self.merged and wanted is self.setup_adapter:
            return wanted  # already folded into the weights
        if self.merged:
            # Another adapter is needed: from now on serve unmerged, so adapters switch exactly.
            self.model.unmerge_adapter()
            self.merged = False
        if wanted is None:
            if hasattr(self.model, "base_model") and hasattr(self.model, "peft_config"):
                self.model.base_model.disable_adapter_layers()
            return None
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(wanted.name)
        return wanted

    # -- generation -------------------------------------------------------------------------
    def resolve_template(self, name: str, adapter: LoadedAdapter | None) -> prompts.PromptTemplate | None:
        if name == prompts.RAW:
            return None
        if name == prompts.AUTO:
            if adapter and adapter.template:
                return adapter.template
            return prompts.load_template(field_default(DataConfig, "prompt_template_name"))
        return prompts.load_template(name)

    def generate(
        self,
        prompt: str,
        input: str = "",
        settings: GenerationSettings | None = None,
        prompt_template: str = prompts.AUTO,
        lora_weights: str | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[str]:
        settings = settings or GenerationSettings()
        if not prompt.strip():
            raise ValueError("prompt is empty: send the instruction or question as `prompt`")
        adapter = self.compute.call(self._activate, lora_weights)
        template = self.resolve_template(prompt_template, adapter)
        if template is None:
            text = f"{prompt}\n\n{input}" if input else prompt
        else:
            text = template.render(prompt, input, self.tokenizer)
        cancel = threading.Event()
        return self.compute.stream(
            lambda: stream_tokens(self.model, self.tokenizer, text, settings, stats, cancel), cancel
        )


def _flat_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).view(*x.shape[:-1], -1)


def flatten_head_input(model: Any) -> None:
    """Feed the vocabulary projection a 2-D input. On CPU, a bf16 3-D input against a frozen weight
    (every PEFT-wrapped base) takes a batched-matmul path that copies the whole 49k x 576 weight on
    each call: 80 ms of a 150 ms time to first token. Same math, same tied Parameter."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is torch.nn.Linear:
        head.forward = types.MethodType(_flat_linear, head)


def default_adapter() -> str | None:
    """An adapter folder placed under weights/adapter is served when COG_WEIGHTS is not set."""
    folder = Path(__file__).resolve().parent.parent / DEFAULT_ADAPTER_DIR
    return str(folder) if (folder / "adapter_config.json").is_file() else None
