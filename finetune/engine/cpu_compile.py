"""Building, caching and loading the CPU decode step's compiled file, and trusting it: `load` gives
the engine a cpu_step.CompiledStep, or None (decode eagerly) with the reason printed.

* Build: cpu_layer's layer math is exported as one graph (`torch.export`) and compiled with
  AOTInductor into a package holding a shared library. Rows (1..the engine's batch) and the cached
  length are symbolic, so one file serves every batch and context; a second file (LoraLayer) serves
  steps where some row has an unmerged adapter.
* Cache: the package is kept under `SERVE_COMPILE_CACHE` (default: the user cache folder), keyed by
  what the generated code depends on (torch version, the math's source, the layer's shapes, dtype
  and weight kind). A first start on a machine compiles it; later starts load it at once.
* Trust: as for kernel.py's kernel, the folder must be private to this user, and the package and its
  unpacked copy are loaded only while their SHA-256 is the one recorded when they were made: anything
  else found there is rebuilt, never loaded.
* Checks at load: the compiled step is run against the eager one on the model itself, and the LoRA
  file against the same math run eagerly (rows without an adapter must give the plain file's bits);
  a file that disagrees is not used (and the reason is printed)."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..settings import COMPILE_ENV
from ..settings import COMPILE_MODES as MODES
from . import attention, kernel, quant
from .cpu_layer import Layer, LoraLayer, math_source
from .cpu_step import MIN_RANK, MIN_SLOTS, CompiledStep, module_groups, weight_kind
from .decoder import KV, Decoder, base_linear, kv_geometry

CACHE_ENV = kernel.CACHE_ENV
_EXAMPLE_ROWS, _EXAMPLE_LENGTH = 2, 3  # export traces with sizes above 1 so neither is specialised


def _signature(decoder: Decoder, kind: str, max_rows: int) -> dict[str, Any]:
    """What the compiled layer depends on (not the depth, the vocabulary or the head's kind)."""
    config = decoder.model.config
    _, kv_heads, head_dim = kv_geometry(config)
    inner = decoder.base.model
    return {
        "torch": torch.__version__,
        "source": math_source(),
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "heads": decoder.heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "eps": inner.norm.variance_epsilon,
        "scaling": decoder.scaling,
        "kind": kind,
        "int8_kernel": quant.int8_kernel() if kind == "int8" else None,
        "int8_lanes": quant.int8_lanes() if kind == "int8" else None,
        "attention_kernel": attention.batch_invariant(inner.embed_tokens.weight),
        "dtype": str(inner.embed_tokens.weight.dtype),
        "max_length": getattr(config, "max_position_embeddings", 4096),
        "max_rows": max_rows,
    }


def _module(decoder: Decoder, kind: str, lora: bool) -> Layer:
    """The layer math to export (or to run eagerly as the reference at load)."""
    inner = decoder.base.model
    layer = LoraLayer if lora else Layer
    eps = inner.norm.variance_epsilon
    return layer(decoder.heads, decoder.kv_heads, decoder.head_dim, eps, decoder.scaling, kind)


def _example(
    decoder: Decoder, step: CompiledStep, lora: bool, slot: list[int] | None = None
) -> tuple[Any, ...]:
    """Inputs of the export trace: a random hidden state and cache, the first layer's real weights;
    for LoraLayer, stacks of 3 slots (1 and 2 random) and rank 4 per module, rows on `slot`
    (default 1, 2)."""
    rows, length = _EXAMPLE_ROWS, _EXAMPLE_LENGTH
    _, kv_heads, head_dim = kv_geometry(decoder.model.config)
    inner = decoder.base.model
    dtype = inner.embed_tokens.weight.dtype
    seeded = torch.Generator().manual_seed(0)  # the same draws each call, and no global RNG touched
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, generator=seeded)  # noqa: E731
    cos, sin = inner.rotary_emb(inner.norm.weight, torch.full((rows, 1), length))
    x = randn(rows, 1, decoder.model.config.hidden_size)
    past_k = randn(length, rows, kv_heads, head_dim)
    past_v = randn(length, rows, kv_heads, head_dim)
    mask = torch.ones(rows, length + 1, dtype=torch.bool)
    weights = step.layer_weights(decoder)[0]
    if not lora:
        return (x, cos.unsqueeze(2), sin.unsqueeze(2), mask, *weights, past_k, past_v)
    stacks = []
    for group in module_groups(decoder)[0]:
        bases = [base_linear(m) for m in group]
        k, out = 4 * len(group), sum(base.out_features for base in bases)
        a, b = randn(3, k, bases[0].in_features), randn(3, k, out)
        a[0], b[0] = 0, 0  # slot 0: no adapter
        stacks.append((a, b))
    index = torch.tensor(slot or list(range(1, rows + 1)))
    return (x, cos.unsqueeze(2), sin.unsqueeze(2), mask, index, *weights, stacks, past_k, past_v)


def _compile(decoder: Decoder, signature: dict[str, Any], step: CompiledStep, path: Path, lora: bool) -> None:
    import torch.utils._pytree as pytree

    module = _module(decoder, signature["kind"], lora)
    example = _example(decoder, step, lora)
    rows = torch.export.Dim("rows", min=1, max=signature["max_rows"])
    length = torch.export.Dim("length", min=1, max=signature["max_length"])
    fixed = lambda tree: pytree.tree_map(lambda _: None, tree)  # noqa: E731
    cache = {0: length, 1: rows}
    head = ({0: rows}, {0: rows}, {0: rows}, {0: rows, 1: length + 1})
    if lora:
        slots = torch.export.Dim("slots", min=MIN_SLOTS)
        ranks = [torch.export.Dim(f"rank{i}", min=MIN_RANK) for i in range(len(example[11]))]  # k per group
        stacks = [({0: slots, 1: k}, {0: slots, 1: k}) for k in ranks]
        shapes = (*head, {0: rows}, *map(fixed, example[5:11]), stacks, cache, cache)
    else:
        shapes = (*head, *map(fixed, example[4:10]), cache, cache)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            torch._inductor.aoti_compile_and_package(program, package_path=str(built))
            kernel.publish(built, path)  # recorded, then in place whole: no half-written file is seen


def _load_runner(path: Path) -> Any:
    """The package's `boxed_run`. torch's C++ loader directly: `torch._inductor.aoti_load_package`
    wraps the same loader but imports the compiler first, 1.3 s of a 1.4 s warm load (measured).
    It loads an unpacked copy beside the package: given the package, the loader extracts it into a
    new temporary folder on every start and removes it only when the loader is destroyed, which a
    serving process's loaders are not before exit (one folder left in /tmp per start)."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(_unpacked(path)), "model", False, 1, -1)
    return loader.boxed_run


def _unpacked(path: Path) -> Path:
    """The package's files in a folder named after its bytes (a package rebuilt, say after a
    planted one, gets a new folder), unpacked once per machine, whole or not at all, and recorded
    (kernel.publish). The loader runs the library in it: a folder there that is not what was
    recorded (planted, or a file in it altered) is unpacked anew from the package, never loaded."""
    package = kernel.verified(path)
    if package is None:  # _build checked it: only this user's processes can have changed it since
        raise RuntimeError(f"{path.name} changed in the cache while loading")
    folder = path.parent / f"{path.stem}.{package[:16]}"
    if kernel.verified(folder) is not None:
        return folder
    kernel.distrust(folder, "unpacking the package anew into")
    with zipfile.ZipFile(path) as archive, tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tops = {Path(name).parts[0] for name in archive.namelist()}
        if len(tops) != 1:
            raise ValueError(f"{path.name}: not one compiled package ({len(tops)} top-level entries)")
        archive.extractall(tmp)
        kernel.publish(Path(tmp) / tops.pop(), folder)
    if kernel.verified(folder) is None:
        raise RuntimeError(f"{folder.name} changed in the cache while loading")
    return folder


def _tolerance(step: CompiledStep) -> float:
    # Kernels that round activations (to bf16, or ours to int8 per group) turn the last bit fused
    # loops may round differently into a rounding step: measured 0.39 of 33 on the 135M model with
    # ours on AVX2 when it rounded to int16; the int8 rounding passes the same check.
    rounds = quant.rounds_activations(step.kind) or quant.rounds_activations(step.head_kind)
    return 5e-2 if rounds else 1e-3


def _differs(got: torch.Tensor, want: torch.Tensor, step: CompiledStep) -> bool:
    return bool((got - want).abs().max() > _tolerance(step) * want.abs().max().clamp(min=1e-6))


@torch.no_grad()
def _agrees(decoder: Decoder, step: CompiledStep) -> str | None:
    """Why the compiled step cannot be trusted on this model (None: it agrees with the eager one)."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    results = []
    for compiled in (False, True):
        kv = KV(8)
        with quant.prefill():
            decoder.forward(ids, torch.arange(5)[None], kv)
        new = torch.tensor([[6]])
        pos = torch.tensor([[5]])
        results.append(
            step.forward(decoder, new, pos, kv, None) if compiled else decoder.forward(new, pos, kv)
        )
    eager, got = results
    if got is None:
        return "the compiled step does not cover this model"
    if _differs(got, eager, step):
        return f"its logits differ from the eager step's by {float((got - eager).abs().max()):.3g}"
    return None


@torch.no_grad()
def _lora_agrees(decoder: Decoder, step: CompiledStep, runner: Any) -> str | None:
    """Why the LoRA file cannot be used (None: it can). One layer with random adapters against the
    same math run eagerly (tests check that math against PEFT's); and rows without an adapter must
    give the plain file's bits, or their text would depend on their neighbours'."""
    import torch.utils._pytree as pytree

    example = _example(decoder, step, lora=True)
    eager, got = _module(decoder, step.kind, lora=True)(*example)[0], runner(pytree.tree_leaves(example))[0]
    if _differs(got, eager, step):
        return f"its LoRA terms differ from the eager math's by {float((got - eager).abs().max()):.3g}"
    bare = _example(decoder, step, lora=True, slot=[0] * _EXAMPLE_ROWS)
    plain = _example(decoder, step, lora=False)
    with_slots, without = runner(pytree.tree_leaves(bare)), step.runner(pytree.tree_leaves(plain))
    if not all(torch.equal(a, b) for a, b in zip(with_slots, without, strict=True)):
        return "rows without an adapter get other bits than from the plain file"
    return None


def _build(decoder: Decoder, signature: dict[str, Any], step: CompiledStep, lora: bool) -> Any:
    """The runner of the cached file for this signature, compiled first if it is not there yet, or
    not what was recorded when it was compiled (kernel.verified)."""
    key = hashlib.sha256(json.dumps({**signature, "lora": lora}, sort_keys=True).encode()).hexdigest()[:20]
    path = kernel.cache_dir() / f"decode-{'lora-' if lora else ''}{key}.pt2"
    if kernel.verified(path) is None:
        kernel.distrust(path, "compiling")
        what = "the decode step with per-request adapters" if lora else "the decode step"
        print(
            f"compile: building {what} for this model shape ({signature['kind']}); a first start on "
            f"a machine takes seconds to a minute; cached in {path.parent}",
            file=sys.stderr,
            flush=True,
        )
        _compile(decoder, signature, step, path, lora)
    if not lora:
        step.path = path
    return _load_runner(path)


def load(
    decoder: Decoder | None, device: torch.device, max_rows: int, mode: str = "auto", adapters: bool = True
) -> Any:
    """The compiled decode step for this model on a CPU (compiling it on a first start), or None
    with the reason printed: the engine then decodes eagerly. With `adapters` (a
    server that takes per-request adapters), steps with unmerged adapters get a second file; without
    it (not asked for, failed or disagreed) they decode eagerly."""
    if mode not in MODES:
        raise ValueError(f"{COMPILE_ENV}={mode!r}: use one of {', '.join(MODES)}")
    if mode == "off" or decoder is None:
        return None
    if device.type != "cpu":
        # CUDA graphs serve GPUs (fast_paths.load_step picks them).
        return _skip("the compiled step is built for CPUs; this model runs on " + device.type)
    kinds = {weight_kind(m) for layer in decoder.layers() for m in layer.linears}
    if len(kinds) != 1:
        return _skip("some linear layers are quantized and others are not")
    kind, head_kind = kinds.pop(), weight_kind(decoder.base.lm_head)
    if kind == "none" and decoder.base.model.embed_tokens.weight.dtype != torch.float32:
        # Measured: the compiled bf16 layer's logits did not match the eager step's at load.
        return _skip("the compiled step covers fp32 and low-bit weights, not " + str(decoder.model.dtype))
    signature = _signature(decoder, kind, max(max_rows, _EXAMPLE_ROWS))
    step = CompiledStep(None, kind, head_kind, None)
    started = time.perf_counter()
    try:
        step.runner = _build(decoder, signature, step, lora=False)
        reason = _agrees(decoder, step)
    except Exception as exc:  # a missing C++ compiler, an export gap in a new torch: decode eagerly
        return _skip(f"compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    if reason:
        return _skip(f"{step.path.name} is not used: {reason}")
    try:
        runner = _build(decoder, signature, step, lora=True) if adapters else None
        lora_reason = _lora_agrees(decoder, step, runner) if adapters else None
    except Exception as exc:
        lora_reason = f"compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    if lora_reason:
        print(
            f"compile: steps with unmerged adapters decode eagerly: {lora_reason}",
            file=sys.stderr,
            flush=True,
        )
    else:
        step.lora_runner = runner
    print(
        f"compile: decode step ready in {time.perf_counter() - started:.1f} s ({step.path})",
        file=sys.stderr,
        flush=True,
    )
    return step


def _skip(reason: str) -> None:
    print(f"compile: decoding eagerly: {reason}", file=sys.stderr, flush=True)
    return None
