"""The compute ceiling: dense matmul GFLOP/s in fp32 and bf16, measured on this machine now."""

from __future__ import annotations

import time
from typing import Any


def matmul_gflops(device: str, dtype: Any, n: int, reps: int) -> float:
    """Best of `reps` timed n x n x n products (2 n^3 FLOPs each), after one warm-up."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def measure(device: str, n: int, reps: int, rounds: int = 2) -> dict[str, Any]:
    """fp32 and bf16 alternate round by round, so a busy moment does not hit only one of them."""
    import torch

    from finetune.model.loading import cpu_has_fast_bf16

    # Without AMX or AVX512-BF16, torch's CPU bf16 GEMM is a slow fallback (0.14 GFLOP/s measured on
    # an AVX2 EPYC: one 2048^3 product took 2 minutes, and the bench sat ~50 minutes in this
    # function). Training runs fp32 there anyway; one small product says how slow bf16 is.
    slow_bf16 = device == "cpu" and not cpu_has_fast_bf16()
    bf16_n, bf16_reps = (256, 1) if slow_bf16 else (n, reps)
    samples: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        samples["fp32"].append(matmul_gflops(device, torch.float32, n, reps))
        samples["bf16"].append(matmul_gflops(device, torch.bfloat16, bf16_n, bf16_reps))
    return {
        "n": n,
        "bf16_n": bf16_n,
        "reps": reps,
        "rounds": rounds,
        "fp32_gflops": round(max(samples["fp32"]), 1),
        "bf16_gflops": round(max(samples["bf16"]), 1),
        "samples": {k: [round(x, 1) for x in v] for k, v in samples.items()},
        "tf32": bool(device == "cuda" and torch.backends.cuda.matmul.allow_tf32),
    }
