"""Helpers shared by the bench workers: where data and weights are, threads, clocks, memory, and a
compact summary of a torch.profiler run."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# The real data set lives beside the project (never copied into it); tests' sample data otherwise.
REAL_DATA = ROOT.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
SAMPLE_DATA = ROOT / "data" / "sample_alpaca.json"
# The compared LoRA, pinned (the classic alpaca-lora one) rather than read from the project's
# defaults, so that a change of defaults does not silently change what the bench compares.
BENCH_LORA = {
    "lora_r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "v_proj"],
}

# The serving benches send Alpaca-templated prompts, as their recorded baselines did: `auto` would
# give the bare base its own chat template, whose prompts and answers differ in length.
ALPACA = {"prompt_template": "alpaca"}


def data_path() -> Path:
    """$BENCH_DATA (a machine without ../shared), else the real data set when it is there, else the sample."""
    if os.environ.get("BENCH_DATA"):
        return Path(os.environ["BENCH_DATA"])
    return REAL_DATA if REAL_DATA.is_file() else SAMPLE_DATA


def setup_torch(device: str, threads: int) -> None:
    """Pin the thread count in every measured process (the bench machine is shared and small)."""
    import torch

    if device == "cpu" and threads > 0:
        torch.set_num_threads(threads)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# Operator families, for a profile that reads at a glance: (family, substrings, exact aten names).
_FAMILIES = (
    ("matmul", ("gemm", "addmm", "bmm", "matmul", "linear", "cutlass", "xmma"), {"aten::mm"}),
    ("attention", ("attention", "sdpa", "flash", "fmha"), set()),
    ("loss/softmax", ("cross_entropy", "log_softmax", "nll_loss", "softmax"), set()),
    ("copy/cast", ("copy", "clone", "contiguous"), {"aten::cat", "aten::to", "aten::index", "aten::fill_"}),
    ("optimizer", ("adam", "foreach"), set()),
)


def op_family(name: str) -> str:
    lowered = name.lower()
    for family, parts, exact in _FAMILIES:
        if lowered in exact or any(p in lowered for p in parts):
            return family
    return "elementwise/other"


def profile_summary(prof: Any, wall_s: float, device: str, top: int = 10) -> dict[str, Any]:
    """Top operators by self time, their share of all operator time, and totals per family."""
    use_cuda = device == "cuda"
    rows = []
    for evt in prof.key_averages():
        self_us = evt.self_device_time_total if use_cuda else evt.self_cpu_time_total
        if self_us > 0:
            rows.append((evt.key, self_us, evt.count))
    total = sum(r[1] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[1])
    families: dict[str, float] = {}
    for name, us, _ in rows:
        families[op_family(name)] = families.get(op_family(name), 0.0) + us
    return {
        "clock": "self device (CUDA) time" if use_cuda else "self CPU time",
        "wall_ms": round(wall_s * 1000, 1),
        "op_total_ms": round(total / 1000, 1),
        "top_ops": [
            {"op": name, "self_ms": round(us / 1000, 2), "share_pct": round(100 * us / total, 1), "calls": n}
            for name, us, n in rows[:top]
        ],
        "families_pct": {
            k: round(100 * v / total, 1) for k, v in sorted(families.items(), key=lambda kv: -kv[1])
        },
    }
