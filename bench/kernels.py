"""How fast the low-bit kernels multiply: our int8 and int4 (finetune/engine/kernels/) against
torch's `aten._weight_int8pack_mm` and fp32 `F.linear`, and against ours at an earlier commit, in
one run.

    .venv/bin/python bench/kernels.py [--threads 2] [--layers 30] [--rows 1,8,64,512]
    FINETUNE_INT8_ISA=avx2 .venv/bin/python bench/kernels.py --against HEAD~3   # old vs new, AVX2 code

One pass multiplies `rows` rows (1 or 8: decoding a batch; 16 to 512: a prompt) with every linear
layer of the 135M model's decoder shape (q/k/v fused, o, gate/up fused, down) for `--layers`
layers, different weights per layer, so that they come from memory as in decoding, not from the
cache. The kernels run in turn, rep by rep, so that a busy machine slows them alike; the ratios
are what to read. Prints ms per pass, the bytes of weights (scales included) streamed per second,
and each kernel's time against fp32's.

`--against REV` builds the kernel's source at git revision REV (its op renamed, into a temporary
folder) and runs it too, with the same FINETUNE_INT8_ISA cap: old against new in one process.
`--threads 1 --cpu-time` times the thread's CPU seconds instead of wall seconds: on a machine busy
with other jobs, a measure of the work, not of the memory or the machine's other cores."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.engine import kernel, quant

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]


def build_against(rev: str, folder: Path) -> Callable:
    """Our int8 kernel as it was at `rev` (its source and the headers it includes), as a torch op of
    its own (namespace finetune_against)."""
    for path in (kernel.SOURCES[0], *kernel.HEADERS):
        done = subprocess.run(
            ["git", "show", f"{rev}:{path.relative_to(ROOT).as_posix()}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:  # a header may not exist yet at an older revision
            (folder / path.name).write_text(done.stdout)
    src, lib = folder / kernel.SOURCES[0].name, folder / "against.so"
    if not src.is_file():
        sys.exit(f"{rev} has no {kernel.SOURCES[0].name}")
    source = src.read_text()
    for macro in ("TORCH_LIBRARY(", "TORCH_LIBRARY_IMPL("):
        source = source.replace(f"{macro}finetune,", f"{macro}finetune_against,")
    src.write_text(source)
    compiler = kernel.os.environ.get(kernel.CXX_ENV) or "c++"
    done = subprocess.run(kernel._command(compiler, (src,), lib), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"building the kernel of {rev} failed: {done.stderr[-500:]}")
    torch.ops.load_library(str(lib))
    return torch.ops.finetune_against.int8_linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rows", default="1,8,64,512", help="comma-separated row counts")
    parser.add_argument("--against", metavar="REV", help="also run our kernel as of this git revision")
    parser.add_argument("--no-torch-int8", action="store_true", help="skip torch's int8 kernel")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="with --threads 1: time the thread's CPU seconds, not wall seconds (a busy machine)",
    )
    args = parser.parse_args()
    if args.cpu_time and args.threads != 1:
        sys.exit("--cpu-time measures one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    if not kernel.available():
        sys.exit("the int8 kernel could not be built here (see above)")
    torch.manual_seed(0)
    fp32 = [[torch.randn(n, k) * 0.02 for n, k in SHAPES] for _ in range(args.layers)]
    ours = [[quant._quantize_int8(w) for w in layer] for layer in fp32]
    # Off AVX-512 quant packs int8 in lanes (int8_lanes_linear); the plain [out, in] layout of
    # int8_linear runs beside it, on the same numbers.
    rows_layout = [[quant._int8_codes(w) for w in layer] for layer in fp32]
    ours4 = [[quant._quantize_int4(w) for w in layer] for layer in fp32]
    # torch's kernel takes one bf16 scale per row
    theirs = [
        [(q, (w.abs().amax(1) / 127).bfloat16()) for w, (q, _) in zip(a, b, strict=True)]
        for a, b in zip(fp32, rows_layout, strict=True)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        against = build_against(args.against, Path(tmp)) if args.against else None
        params = args.layers * sum(n * k for n, k in SHAPES)
        size = {"ours int8": _bytes(ours), "ours int4": _bytes(ours4), "torch int8": _bytes(theirs)}
        print(
            f"{args.layers} layers of {SHAPES}, {params / 1e6:.0f}M weights, {args.threads} threads; "
            f"ours runs its {kernel.isa()} code (FINETUNE_INT8_ISA=avx2|generic caps it)"
        )
        print("| rows | kernel | ms per pass | GB/s of weights | × fp32 |")
        print("|---:|---|---:|---:|---:|")
        for rows in (int(r) for r in args.rows.split(",")):
            runs = kernels(rows, fp32, ours, rows_layout, ours4, theirs, against, not args.no_torch_int8)
            reps = max(3, args.reps * 8 // max(8, rows))  # fewer reps where a pass is long
            seconds = alternate(runs, reps, time.thread_time if args.cpu_time else time.perf_counter)
            base = seconds["fp32 F.linear"]
            for name, t in seconds.items():
                weights = next((b for key, b in size.items() if name.startswith(key)), params * 4)
                print(
                    f"| {rows} | {name} | {1000 * t:.2f} | {weights / t / 1e9:.1f} | {base / t:.2f} |",
                    flush=True,
                )


def _bytes(layers: list) -> int:
    return sum(t.numel() * t.element_size() for layer in layers for copy in layer for t in copy)


def kernels(
    rows: int,
    fp32: list,
    ours: list,
    rows_layout: list,
    ours4: list,
    theirs: list,
    against: Callable | None,
    torch_int8: bool,
) -> dict[str, Callable]:
    x = {k: torch.randn(rows, k) for _, k in SHAPES}
    xb = {k: v.bfloat16() for k, v in x.items()}
    runs = {
        "fp32 F.linear": lambda: [F.linear(x[w.shape[1]], w) for layer in fp32 for w in layer],
        "ours int8": lambda: [
            quant._matmul("int8", x[k], *copy)
            for layer in ours
            for (_, k), copy in zip(SHAPES, layer, strict=True)
        ],
        "ours int4": lambda: [
            torch.ops.finetune.int4_linear(x[s.shape[1] * 2], q, s) for layer in ours4 for q, s in layer
        ],
    }
    if quant.int8_lanes():
        runs["ours int8, [out, in] layout"] = lambda: [
            torch.ops.finetune.int8_linear(x[q.shape[1]], q, s) for layer in rows_layout for q, s in layer
        ]
    if against is not None:  # weights of its own: none of them still in the cache from the run before
        copies = [[(q.clone(), s.clone()) for q, s in layer] for layer in rows_layout]
        runs["ours int8 (--against)"] = lambda: [
            against(x[q.shape[1]], q, s) for layer in copies for q, s in layer
        ]
    if torch_int8:
        runs["torch int8 (_weight_int8pack_mm)"] = lambda: [
            torch.ops.aten._weight_int8pack_mm(xb[q.shape[1]], q, s) for layer in theirs for q, s in layer
        ]
    return runs


def alternate(runs: dict[str, Callable], reps: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds of each, the kernels taking turns within every rep."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            started = clock()
            fn()
            times[name].append(clock() - started)
    return {name: statistics.median(t) for name, t in times.items()}


if __name__ == "__main__":
    main()
