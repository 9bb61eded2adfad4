"""How fast the int8 decode kernels stream weights: ours (finetune/engine/kernels/int8_linear.cpp) against
torch's `aten._weight_int8pack_mm` and fp32 `F.linear`, in one run.

    .venv/bin/python bench/kernels.py [--threads 2] [--layers 30]
    FINETUNE_INT8_ISA=generic .venv/bin/python bench/kernels.py   # a narrower path of ours

One pass multiplies 1 (or 8) rows with every linear layer of the 135M model's decoder shape
(q/k/v fused, o, gate/up fused, down) for `--layers` layers, different weights per layer, so
that they come from memory as in decoding, not from the cache. Prints ms per pass, the bytes of
weights streamed per second, and the ratios against torch's int8 kernel."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.engine import kernel, quant

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # [out, in]


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernel.available():
        sys.exit("the int8 kernel could not be built here (see above)")
    torch.manual_seed(0)
    fp32 = [[torch.randn(n, k) * 0.02 for n, k in SHAPES] for _ in range(args.layers)]
    ours = [[quant._quantize_int8(w) for w in layer] for layer in fp32]
    # torch's kernel takes one bf16 scale per row
    theirs = [
        [(q, (w.abs().amax(1) / 127).bfloat16()) for w, (q, _) in zip(a, b, strict=True)]
        for a, b in zip(fp32, ours, strict=True)
    ]
    params = args.layers * sum(n * k for n, k in SHAPES)
    print(
        f"{args.layers} layers of {SHAPES}, {params / 1e6:.0f}M weights, {args.threads} threads; "
        f"ours runs its {kernel.isa()} code (FINETUNE_INT8_ISA=avx2|generic caps it)"
    )
    print("| rows | kernel | ms per pass | GB/s of weights | × torch int8 |")
    print("|---:|---|---:|---:|---:|")
    for rows in (1, 8):
        seconds = measure(rows, fp32, ours, theirs, args.reps)
        base = seconds["torch int8 (_weight_int8pack_mm)"]
        for name, t in seconds.items():
            width = 4 if name.startswith("fp32") else 1
            print(f"| {rows} | {name} | {1000 * t:.2f} | {params * width / t / 1e9:.1f} | {base / t:.2f} |")


def measure(rows: int, fp32: list, ours: list, theirs: list, reps: int) -> dict[str, float]:
    x = {k: torch.randn(rows, k) for _, k in SHAPES}
    xb = {k: v.bfloat16() for k, v in x.items()}
    runs = {
        "fp32 F.linear": lambda: [F.linear(x[w.shape[1]], w) for layer in fp32 for w in layer],
        "torch int8 (_weight_int8pack_mm)": lambda: [
            torch.ops.aten._weight_int8pack_mm(xb[q.shape[1]], q, s) for layer in theirs for q, s in layer
        ],
        "ours int8": lambda: [
            torch.ops.finetune.int8_linear(x[q.shape[1]], q, s) for layer in ours for q, s in layer
        ],
    }
    return {name: timed(fn, reps) for name, fn in runs.items()}


if __name__ == "__main__":
    main()
