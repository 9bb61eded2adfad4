"""The prediction service behind predict.py: one resident base model, a setup adapter (merged for
speed while it is the only one in use; never on a bitsandbytes base, SERVE_QUANT=bnb8|bnb4) and an
LRU cache of per-request adapters (adapter_cache.py), set up from the settings (settings.py)."""

from __future__ import annotations

import queue
import sys
import threading
import types
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from ..config import DataConfig, GenerationSettings, field_default
from ..data import prompts
from ..data.encoding import encode_prompt
from ..engine import quant
from ..engine.decoder import PEFT_BASE, kv_geometry
from ..engine.fast_paths import load_step
from ..engine.quant import describe_quantization, pick_quantization
from ..engine.requests import DONE, GenerationError, GenerationStats, Request, context_length
from ..engine.scheduler import KV_MEMORY_SHARE, Engine, EngineLimits
from ..formats.archives import Limits
from ..formats.weights_sources import materialize, redact
from ..model.adapter_folder import CARD_JSON, template_from_adapter
from ..model.adapter_limits import AdapterBounds, AdapterRefused, check_adapter, linear_shapes, read_json
from ..model.loading import (
    ModelError,
    attach_adapter,
    check_adapter_dir,
    check_identity,
    load_base,
    load_tokenizer,
    pick_device,
    pick_precision,
)
from ..model.weights import resolve_base_model
from ..settings import BNB_MODES, MAX_BATCH_ENV, QUANT_ENV, STALL_ENV, ServeSettings, SettingsError
from ..workdirs import owned_workdir
from .adapter_cache import AdapterCache, LoadedAdapter, remove_files
from .compute_thread import POLL_S, ComputeThread

MIN_HEAD = 16  # template heads shorter than this are prefilled with the rest of the prompt
SETUP_NAME = "setup"
# The operator's adapter (COG_WEIGHTS) is held to the archive defaults; a request's to tighter ones
# (adapter_cache.REQUEST_LIMITS).
SETUP_LIMITS = Limits()
DEFAULT_ADAPTER_DIR = Path("weights") / "adapter"
# The operator's adapter may be as large as train.py trains; a stranger's is held to less.
SETUP_BOUNDS = AdapterBounds(max_rank=1024)
REQUEST_BOUNDS = AdapterBounds()


def engine_limits(
    model: Any, device: torch.device, settings: ServeSettings, gpu_budget: Callable[[int], int] | None = None
) -> EngineLimits:
    """The engine's limits from the settings; an unset KV budget sized for the machine: on a GPU
    what the serving plan leaves (`gpu_budget(max_batch)`, which counts the graph pools and
    activations too), else a quarter of the memory available after loading the model; at most
    max_batch full contexts."""
    max_batch = settings.max_batch
    full = max_batch * context_length(model)
    if settings.kv_tokens is not None:
        budget = settings.kv_tokens  # the operator's, as given
    elif device.type == "cuda" and gpu_budget is not None:
        budget = min(gpu_budget(max_batch), full)
    else:
        free = (
            torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
        )
        budget = min(int(free * KV_MEMORY_SHARE) // kv_bytes_per_token(model), full)
    return EngineLimits(
        max_batch=max_batch,
        kv_tokens=budget,
        prefill_chunk=settings.prefill_chunk,
        queue_timeout_s=settings.queue_timeout_s,
        prefix_tokens=settings.prefix_tokens,
        max_waiting=settings.max_waiting,
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def kv_bytes_per_token(model: Any) -> int:
    layers, kv_heads, head_dim = kv_geometry(model.config)
    return 2 * layers * kv_heads * head_dim * model.get_input_embeddings().weight.element_size()


class ModelServer:
    """One resident base model serving many requests at once through the engine (scheduler.py): the
    setup adapter merged while it is the only one in use, per-request adapters in an LRU cache,
    rows of one batch on different adapters."""

    def __init__(
        self,
        base_model: str | None = None,
        adapter: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        cache_size: int | None = None,
        compute: ComputeThread | None = None,
        limits: EngineLimits | None = None,
        quantization: str | None = None,
        settings: ServeSettings | None = None,
    ) -> None:
        """`settings`: read from the environment once when not given. `dtype`, `quantization` and
        `cache_size` override its fields, `device` (any torch device) its device and `limits` the
        engine limits it would give. A bad setting stops setup with a ModelError, as any other."""
        try:
            settings = settings or ServeSettings.from_env()
            self.settings = replace(
                settings,
                dtype=dtype or settings.dtype,
                quantization=quantization or settings.quantization,
                adapter_cache_size=settings.adapter_cache_size if cache_size is None else cache_size,
            )
        except SettingsError as exc:
            raise ModelError(str(exc)) from None
        wanted = None if self.settings.device == "auto" else self.settings.device
        self.device = pick_device(device or wanted)
        self.precision = pick_precision(self.settings.dtype, self.device, training=False)
        mode = self.settings.quantization
        self.quantization = pick_quantization(mode, self.device, self.precision.weights)
        self.base_path = resolve_base_model(base_model)
        if mode == "auto" and self.device.type == "cuda":
            self.quantization = self._planned_quantization()
        # Downloaded adapters live here; they leave with the server, or at the latest when the process
        # exits (the compute thread's loop keeps a serving server alive until then). A server killed
        # by a signal leaves its folder to the next one to remove.
        self.workdir = owned_workdir(self, "adapters-")
        self.adapters = AdapterCache(self.workdir, self.settings, self._load_adapter)
        self._encode_lock = threading.Lock()
        self.setup_adapter: LoadedAdapter | None = None
        self.merged = False
        # A bitsandbytes base never merges: its adapters stay beside it (see pick_quantization).
        self.mergeable = self.quantization not in BNB_MODES
        self._mode: tuple[Any, ...] | None = None  # how the model is set up for the last forward pass
        self._base_weights: BaseWeights | None = None
        # Bumped each time an adapter name is attached: a name may come back with other weights
        # (the same lora_weights URL after an eviction), and cached prompt heads must not outlive them.
        self._generation: dict[str, int] = {}
        # A template's head ids, with or without input.
        self._heads: dict[tuple[prompts.PromptTemplate, bool], list[int]] = {}
        # Every torch call of this server runs on this thread (see compute_thread.py for why); a process
        # that runs other torch work beside the server passes one thread for all of it.
        self.compute = compute or ComputeThread()
        self.compute.call(self._setup, adapter, limits)
        self.compute.add_loop(self.engine.step)

    def _setup(self, adapter: str | None, limits: EngineLimits | None) -> None:
        self.tokenizer = load_tokenizer(self.base_path)
        bnb = BNB_MODES.get(self.quantization, "none")
        self.model: Any = load_base(self.base_path, self.device, self.precision, bnb).eval()
        flatten_head_input(self.model)
        if self.quantization in ("int8", "int4"):
            quant.quantize(self.model, self.quantization)  # before any adapter: the bare base's copies
        self.linears = linear_shapes(self.model)  # what an adapter may target
        # No token stands for more characters than its own text (twice that, for normalizers that
        # merge characters), so a longer prompt cannot fit the context: refused before tokenizing it.
        longest = max(len(t) for t in self.tokenizer.get_vocab())
        self.max_prompt_chars = 2 * longest * context_length(self.model)
        if adapter:
            folder = materialize(adapter, self.workdir, SETUP_LIMITS, allow_local=True)
            self.setup_adapter = self._attach(folder, SETUP_NAME, adapter, SETUP_BOUNDS)
            self.mergeable = self.mergeable and self._room_to_unmerge()
            if self.mergeable:
                self._merge()
        self.engine = Engine(
            self.model,
            self.tokenizer,
            limits or engine_limits(self.model, self.device, self.settings, self._gpu_budget),
            self._prepare,
        )
        self.engine.prefix_tag = self._prefix_tag
        compile_mode = self.settings.compile
        if not self.mergeable and compile_mode != "off":
            compile_mode = "off"  # neither the compiled step nor CUDA graphs cover bitsandbytes layers
            print(
                f"setup: {QUANT_ENV}={self.quantization}: a bitsandbytes base, so adapters stay "
                "unmerged and decoding runs eagerly (no compiled step, no CUDA graphs)",
                file=sys.stderr,
                flush=True,
            )
        # With no room for per-request adapters (ADAPTER_CACHE_SIZE=0), the setup adapter stays merged:
        # no step ever has an unmerged adapter, so no second file is compiled.
        self.engine.compiled = load_step(
            self.engine.decoder(),
            self.device,
            self.engine.limits.max_batch,
            compile_mode,
            adapters=self.settings.adapter_cache_size > 0,
            kv_tokens=self.engine.limits.kv_tokens,
        )
        self._warm_up()
        print(
            f"setup: base {self.base_path} on {self.device} ({self.precision.weights}, "
            f"{describe_quantization(self.quantization)}); "
            f"adapter {adapter or 'none'}{' (merged)' if self.merged else ''}; "
            f"batch {self.engine.limits.max_batch}, KV cache {self.engine.limits.kv_tokens} tokens",
            file=sys.stderr,
            flush=True,
        )

    def _planned_quantization(self) -> str:
        """SERVE_QUANT=auto on a GPU: the base in its dtype where the memory plan leaves room for a
        full-context KV cache, else a bitsandbytes base (bnb8, then bnb4), chosen before loading."""
        from ..memory.plan import PlanError, serving_quantization

        total = torch.cuda.get_device_properties(self.device).total_memory
        try:
            mode = serving_quantization(
                self.base_path,
                gpu_memory=total,
                max_rows=self.settings.max_batch,
                dtype=str(self.precision.weights).removeprefix("torch."),
                adapters=self.settings.adapter_cache_size,
                cuda_graphs=self.settings.compile != "off",
            )
        except PlanError as exc:
            raise ModelError(f"{exc}; use a GPU with more memory, or a smaller {MAX_BATCH_ENV}") from None
        if mode != "none":
            print(
                f"setup: {QUANT_ENV}=auto: the base does not fit in {self.precision.weights} with a full "
                f"KV cache, so it loads as {mode} (bitsandbytes)",
                file=sys.stderr,
                flush=True,
            )
        return mode

    def _gpu_budget(self, max_batch: int) -> int:
        """The KV budget the serving plan leaves on this GPU (weights, adapters, graph pools and
        activations counted); the plan is logged, and a model the GPU cannot serve stops setup."""
        from ..memory.plan import largest_kv_budget, plan_serving

        options: dict[str, Any] = {
            "max_rows": max_batch,
            "dtype": str(self.precision.weights).removeprefix("torch."),
            "quantization": {"bnb8": "8bit", "bnb4": "4bit"}.get(self.quantization, "none"),
            "adapters": self.settings.adapter_cache_size,
            "cuda_graphs": self.settings.compile != "off" and self.quantization not in BNB_MODES,
        }
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = largest_kv_budget(self.model.config, gpu_memory=total, **options)
        plan = plan_serving(self.model.config, gpu_memory=total, max_tokens=max(budget, 64), **options)
        print(f"setup: memory plan\n{plan.table()}", file=sys.stderr, flush=True)
        if budget == 0:
            raise ModelError(
                f"this GPU cannot serve the model with room for a KV cache: {plan.reason}; "
                f"use {QUANT_ENV}=bnb4 or bnb8, a smaller {MAX_BATCH_ENV}, or a GPU with more memory"
            )
        return budget

    def _room_to_unmerge(self) -> bool:
        """On a GPU a merge is undone from a copy of the base weights kept beside them (re-reading
        gigabytes from disk on the compute thread would stall every stream for seconds). Without room
        for that copy next to the KV cache, the setup adapter stays unmerged: it decodes eagerly beside
        the base, and per-request adapters never wait for an unmerge."""
        if self.device.type != "cuda":
            return True
        copy = sum(layer.get_base_layer().weight.nbytes for _, layer in _lora_layers(self.model))
        free = torch.cuda.mem_get_info(self.device)[0]
        room = int(free * (1 - KV_MEMORY_SHARE) * 0.5)  # half of what the KV cache leaves: activations
        if copy <= room:
            return True
        print(
            f"setup: the setup adapter stays unmerged: undoing a merge needs a copy of the base weights "
            f"it adapts ({copy / 2**30:.1f} GiB), more than the GPU has room for ({room / 2**30:.1f} GiB)",
            file=sys.stderr,
            flush=True,
        )
        return False

    def _warm_up(self) -> None:
        # The first forward pass pays for kernel selection and allocation; pay it in setup, not in
        # the first user's time to first token.
        # Through the template requests get by default, so that its head is cached for the first user.
        settings = GenerationSettings(max_new_tokens=2, temperature=0)
        adapter = SETUP_NAME if self.setup_adapter else None
        template = self.resolve_template(prompts.AUTO, self.setup_adapter)
        ids, head = self._encode("Hello", "", template)
        request = Request(ids, settings, adapter=adapter, head=head)
        "".join(self.engine.drive(self.engine.submit(request)))

    def health_problem(self) -> str | None:
        """Why this server cannot serve now (None: it can). Cheap: it never waits for the compute thread."""
        if not self.compute.alive():
            return "the model's compute thread has stopped; restart the server"
        stalled = self.compute.stalled_for()
        limit = self.settings.stall_s
        if stalled > limit:
            return f"one step of the model has run for {stalled:.0f} s (limit {STALL_ENV}={limit:g})"
        return None

    # -- adapters ---------------------------------------------------------------------------
    def _attach(self, folder: Path, name: str, source: str, bounds: AdapterBounds) -> LoadedAdapter:
        """Load an extracted adapter folder into the model (compute thread). Everything in the folder
        is checked before PEFT sees any of it (adapter_limits.py); a refused adapter changes nothing."""
        from peft import PeftModel

        try:
            check_adapter_dir(folder)
            card_path = folder / CARD_JSON
            if card_path.is_file():  # first: "trained on another base" says more than its shapes do
                card = read_json(card_path, CARD_JSON)
                identity = card.get("base_model", {}) if isinstance(card, dict) else {}
                check_identity(identity if isinstance(identity, dict) else {}, self.model, redact(source))
            config = check_adapter(folder, self.linears, bounds)
            template = template_from_adapter(folder)
        except (AdapterRefused, ModelError, prompts.TemplateError) as exc:
            # Strangers could otherwise fill the disk one request at a time.
            remove_files(self.workdir, folder)
            raise ModelError(f"adapter {redact(source)}: {exc}") from None
        except BaseException:
            remove_files(self.workdir, folder)
            raise
        if self.merged:
            self._unmerge()  # PEFT would unmerge by subtraction to add a layer's new adapter
        try:
            first = not isinstance(self.model, PeftModel)
            self.model = attach_adapter(self.model, folder, name, config)
            if first and hasattr(self, "engine"):
                self.engine.model = self.model
                self.engine.prefixes.forget()  # the base now runs through LoRA layers
        except BaseException:
            if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                self.model.delete_adapter(name)
            remove_files(self.workdir, folder)
            raise
        finally:
            self._mode = None
        self.model.eval()
        self._generation[name] = self._generation.get(name, 0) + 1
        return LoadedAdapter(name, folder, template)

    def _load_adapter(self, folder: Path, name: str, source: str) -> LoadedAdapter:
        return self.compute.call(self._attach, folder, name, source, REQUEST_BOUNDS)

    def _acquire(self, source: str | None, cancel: threading.Event) -> LoadedAdapter | None:
        """The adapter a request needs, loaded and counted as in use (None: the bare base; no
        lora_weights: the setup adapter). Downloading and extracting run on the caller's thread,
        so the engine keeps decoding other requests meanwhile (adapter_cache.py)."""
        return self.adapters.acquire(source, cancel) if source else self.setup_adapter

    def _release(self, adapter: LoadedAdapter | None) -> None:
        """A request that used `adapter` has finished (compute thread): unload what the cache evicts."""
        if adapter is None or adapter is self.setup_adapter:
            return
        evicted = self.adapters.release(adapter)
        if evicted and self.merged:
            self._unmerge()  # PEFT unmerges by subtraction when it re-points a merged model's layers
        for old in evicted:
            self.engine.prefixes.forget(old.name)
            self.model.delete_adapter(old.name)
            self._mode = None
            self.adapters.discard(old)

    # -- the model for one forward pass (the engine's prepare hook, compute thread) -----------
    def _prepare(self, adapters: list[str | None]) -> dict[str, Any]:
        wanted = set(adapters)
        if self.setup_adapter is not None and self.mergeable:
            only_setup = wanted == {SETUP_NAME} and self.engine.active_adapters() <= {SETUP_NAME}
            if self.merged and not only_setup:
                self._unmerge()
            elif only_setup and not self.merged:
                self._merge()
        if self.merged:
            return {}
        if len(wanted) > 1:
            mode: tuple[Any, ...] = ("mixed",)
            if self._mode != mode:
                self.model.base_model.enable_adapter_layers()
                self._mode = mode
            return {"adapter_names": [a or PEFT_BASE for a in adapters]}
        (only,) = wanted
        if self._mode != ("one", only) and hasattr(self.model, "peft_config"):
            if only is None:
                self.model.base_model.disable_adapter_layers()
            else:
                self.model.base_model.enable_adapter_layers()
                self.model.set_adapter(only)
            self._mode = ("one", only)
        return {}

    def _prefix_tag(self, adapter: str | None) -> tuple[bool, int]:
        """The weights a prefill on `adapter` runs on now (after _prepare): the setup adapter merged
        into the base gives other bits than the same adapter beside it."""
        return (self.merged, self._generation.get(adapter, 0) if adapter else 0)

    def _merge(self) -> None:
        """Fold the setup adapter into the base weights: while it is the only adapter in use, a
        trained version decodes at the base model's speed."""
        if self._base_weights is None:
            self._base_weights = BaseWeights(self.base_path, self.model, read_back=self.device.type == "cpu")
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(SETUP_NAME)
        self.model.merge_adapter([SETUP_NAME])
        quant.use_merged(self._base_weights.base_layers())
        self.merged, self._mode = True, None

    def _unmerge(self) -> None:
        # Subtracting the adapter again would leave the rounding of W + BA - BA in the base (in
        # bf16 a visible drift); the base weights are put back as they were loaded instead.
        assert self._base_weights is not None
        self._base_weights.restore(self.model)
        quant.use_base(self._base_weights.base_layers())
        self.merged, self._mode = False, None

    # -- generation -------------------------------------------------------------------------
    def resolve_template(self, name: str, adapter: LoadedAdapter | None) -> prompts.PromptTemplate | None:
        if name == prompts.RAW:
            return None
        if name == prompts.AUTO:
            own = adapter.template if adapter else None
            return prompts.auto_template(
                own, self.tokenizer, field_default(DataConfig, "prompt_template_name")
            )
        return prompts.load_template(name)

    def generate(
        self,
        prompt: str,
        input: str = "",
        settings: GenerationSettings | None = None,
        prompt_template: str = prompts.AUTO,
        lora_weights: str | None = None,
        stats: GenerationStats | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Queue one request and return its text chunks as they are produced. Setting `cancel`
        (or closing the iterator early) cancels the request, its adapter download included."""
        settings = settings or GenerationSettings()
        cancel = cancel or threading.Event()
        if not prompt.strip():
            raise ValueError("prompt is empty: send the instruction or question as `prompt`")
        adapter = self._acquire(lora_weights, cancel)
        try:
            template = self.resolve_template(prompt_template, adapter)
            ids, head = self._encode(prompt, input, template)
        except BaseException:
            self.compute.call(self._release, adapter)
            raise
        request = Request(
            ids,
            settings,
            adapter=adapter.name if adapter else None,
            head=head,
            stats=stats or GenerationStats(),
            cancel=cancel,
            on_finish=lambda _: self._release(adapter),
        )
        self.engine.submit(request)
        self.compute.wake()
        return self._chunks(request)

    def _encode(
        self, prompt: str, input: str, template: prompts.PromptTemplate | None
    ) -> tuple[list[int], int]:
        """A request's prompt ids, and how many of them are its template's head: the tokens every
        prompt of that template starts with (the text before the instruction), which the engine
        prefills once per adapter and then reuses."""
        if template is None:
            text = f"{prompt}\n\n{input}" if input else prompt
        else:
            text = template.render(prompt, input, self.tokenizer)
        if len(text) > self.max_prompt_chars:
            raise GenerationError(
                f"the prompt is {len(text):,} characters with its template, more than this model's context "
                f"could hold ({self.max_prompt_chars:,}): shorten the prompt or input"
            )
        with self._encode_lock:
            ids = encode_prompt(self.tokenizer, text)
            if template is None:
                return ids, 0
            key = (template, bool(input))  # a frozen dataclass: hashable by its fields
            if key not in self._heads:
                # The ids two different instructions share; their text can end mid-token, so the head
                # is what a request's own ids have in common with these.
                a, b = (
                    encode_prompt(self.tokenizer, template.render(x, "y" if input else "", self.tokenizer))
                    for x in "xz"
                )
                if len(self._heads) >= 64:
                    self._heads.clear()
                self._heads[key] = a[: common_prefix(a, b)]
            head = common_prefix(self._heads[key], ids)
            # A short head saves little when reused and costs a pass over the weights when not.
            return ids, head if head >= MIN_HEAD else 0

    def _chunks(self, request: Request) -> Iterator[str]:
        # A caller on the compute thread itself (a tool that runs all its torch work there) steps
        # the engine; any other waits, waking every POLL_S so a Cog cancel can land in it.
        try:
            if threading.get_ident() == self.compute.ident:
                yield from self.engine.drive(request)
                return
            while True:
                try:
                    item = request.outbox.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not request.done:
                request.cancel.set()
                self.compute.wake()


class BaseWeights:
    """The base weights under the LoRA layers, as loaded, to undo a merge exactly: on a CPU read back
    from the checkpoint's safetensors (no memory kept); a copy taken before merging on a GPU (a
    device copy takes milliseconds, a read from disk seconds) or when the base did not come from a
    local safetensors folder."""

    def __init__(self, base_path: str, model: Any, read_back: bool = True) -> None:
        self.targets = {_checkpoint_key(name): layer for name, layer in _lora_layers(model)}
        self.files: dict[str, Path] = {}
        folder = Path(base_path)
        if read_back and folder.is_dir():
            from safetensors import safe_open

            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    self.files.update({k: path for k in f.keys() if k in self.targets})  # noqa: SIM118
        self.copies: dict[str, torch.Tensor] = {}
        if set(self.files) != set(self.targets):
            self.files = {}
            self.copies = {
                k: layer.get_base_layer().weight.detach().clone() for k, layer in self.targets.items()
            }

    def base_layers(self) -> list[torch.nn.Linear]:
        return [layer.get_base_layer() for layer in self.targets.values()]

    def restore(self, model: Any) -> None:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for key, path in self.files.items():
            by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key in keys:
                    weight = self.targets[key].get_base_layer().weight
                    weight.data.copy_(f.get_tensor(key).to(weight.dtype))
        for key, saved in self.copies.items():
            self.targets[key].get_base_layer().weight.data.copy_(saved)
        for layer in self.targets.values():
            layer.merged_adapters.clear()


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _checkpoint_key(module_name: str) -> str:
    """PEFT's module name -> the base checkpoint's tensor name."""
    return module_name.removeprefix("base_model.model.") + ".weight"


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
