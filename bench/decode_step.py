"""Where one decode step of the served model goes (issue: the step's overhead beside weight
streaming): the embedded model as the server sets it up (int8, or `--quant int4`; the compiled
step), at 1 and 8 rows after a prompt of `--context` tokens, against the same step's weights
multiplied alone through our kernels (the floor the step cannot go under at their speed), and
against this machine's memory read rate (the floor no kernel reading these bytes can go under).

    .venv/bin/python -m bench.decode_step [--threads 2] [--context 48] [--profile]
    FINETUNE_INT8_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python -m bench.decode_step  # AVX2 only

Prints ms per step, the time in the kernel's products, what is left, bytes of weights read per step
and the GB/s they stream at; `--profile` adds torch.profiler's table of one step's operators."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch


def median_ms(fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def read_rate(megabytes: int = 512) -> float:
    """GB/s of a sum over a buffer far larger than the caches: what memory delivers to these threads."""
    buf = torch.ones(megabytes * 2**20 // 4)
    ms = median_ms(lambda: buf.sum(), 7)
    return buf.numel() * 4 / ms / 1e6


def weight_products(step: Any, rows: int) -> tuple[Any, int]:
    """A pass over every product the compiled step makes (each layer's fused groups, then the head),
    with inputs of the right widths, and the bytes of weights (and scales) it reads."""
    from finetune.engine import quant

    embed, layers, norm, head = step._inputs
    mats = [t for layer in layers for t in layer if t.dtype in (torch.int8, torch.uint8)]
    scales = [  # int8 in lanes: [N / 8, groups, 8]
        t for layer in layers for t in layer if t.dim() >= 2 and t.dtype in (torch.float32, torch.bfloat16)
    ]
    pairs = list(zip(mats, scales, strict=True)) + [tuple(head)]

    def width(q: torch.Tensor, s: torch.Tensor) -> int:
        if q.dtype == torch.uint8:
            return s.shape[1] * 2  # int4: [N / 8, K / 2] scales
        return q.shape[1] * 4 if q.dim() == 3 else q.shape[1]  # int8 in lanes: [N / 8, K / 4, 32]

    xs = {width(q, s): torch.randn(rows, width(q, s)) for q, s in pairs}
    nbytes = sum(q.numel() * q.element_size() + s.numel() * s.element_size() for q, s in pairs)
    kinds = {torch.int8: "int8", torch.uint8: "int4"}

    def run() -> None:
        for q, s in pairs:
            quant._matmul(kinds[q.dtype], xs[width(q, s)], q, s)

    return run, nbytes


def measure_rows(decoder: Any, step: Any, rows: int, args: argparse.Namespace) -> list[str]:
    """One table row (and the profile, if asked) for a step of `rows` rows after `--context` tokens."""
    from finetune.engine.decoder import KV

    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (rows, args.context))
    kv = KV(args.context + 8)
    decoder.forward(ids, torch.arange(args.context).expand(rows, -1), kv)
    new, at = ids[:, -1:], torch.full((rows, 1), args.context)

    def one_step() -> None:
        kv.length = args.context  # the same cache length every time
        assert step.forward(decoder, new, at, kv, None) is not None

    step_ms = median_ms(one_step, args.reps)
    products, nbytes = weight_products(step, rows)
    kernel_ms = median_ms(products, args.reps)
    lines = [
        f"| {rows} | {step_ms:.2f} | {kernel_ms:.2f} | {step_ms - kernel_ms:.2f} | "
        f"{nbytes / 1e6:.0f} | {nbytes / step_ms / 1e6:.1f} |"
    ]
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                one_step()
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=48, help="tokens in the cache before the step")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quant", default="int8", choices=["int8", "int4"], help="SERVE_QUANT of the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from finetune.engine import kernel
    from finetune.serving.server import ModelServer

    server = ModelServer(quantization=args.quant, cache_size=0)
    engine = server.engine

    def measure() -> list[str]:
        decoder, step = engine.decoder(), engine.compiled
        assert decoder is not None and step is not None and step._prepare(decoder) is not None
        lines = [
            f"{args.quant}; int8 kernel: {kernel.isa()}; {args.threads} threads; context {args.context} tokens; "
            f"memory read rate {read_rate():.1f} GB/s",
            "| rows | step ms | kernel's products ms | rest ms | weight MB a step | GB/s in the step |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for rows in (1, 8):
            lines += measure_rows(decoder, step, rows, args)
        return lines

    print("\n".join(server.compute.call(measure)))


if __name__ == "__main__":
    main()
