"""The quality half of the quant section, alone and in minutes: held-out loss and greedy agreement
of int8 (or int4) decoding against fp32, the same measurements as bench/quant_worker.py (every
held-out row through the low-bit kernels; greedy tokens over 4 prompts, position by position), on
the random adapter the serving sections use when no training section made one.

    FINETUNE_INT8_ISA=avx2 .venv/bin/python -m bench.quant_quality [--mode int8] [--tokens 128]

FINETUNE_INT8_ISA picks which of our int8 kernel's paths runs (avx2: int8 activations)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import setup_torch
from bench.infer_worker import random_adapter
from bench.quant_worker import HELDOUT, PROMPTS, SETTINGS, greedy_ids, heldout_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="int8", choices=["int8", "int4", "bf16"])
    parser.add_argument("--tokens", type=int, default=128, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--heldout",
        type=Path,
        default=HELDOUT,
        help="an Alpaca JSON file whose responses' loss is measured (default: the demo's 20 held-out rows)",
    )
    parser.add_argument("--rows", type=int, help="only its first ROWS records")
    args = parser.parse_args()
    setup_torch("cpu", args.threads)
    from finetune.engine import kernel
    from finetune.model.weights import resolve_base_model
    from finetune.serving.server import ModelServer

    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(random_adapter(resolve_base_model(None), Path(tmp) / "random-adapter"))
        out = {}
        for mode in ("fp32", args.mode):
            server = ModelServer(adapter=adapter, **SETTINGS[mode])

            def quality(server: ModelServer = server) -> tuple[float, dict[str, list[int]]]:
                return heldout_loss(server, args.heldout, args.rows), {
                    p: greedy_ids(server, p, args.tokens) for p in PROMPTS
                }

            out[mode] = server.compute.call(quality)
            server = None
    (fp32_loss, fp32_ids), (loss, ids) = out["fp32"], out[args.mode]
    shares = [
        sum(a == b for a, b in zip(fp32_ids[p], ids[p], strict=False)) / len(fp32_ids[p]) for p in PROMPTS
    ]
    result = {
        "mode": args.mode,
        "heldout": f"{args.heldout.name}[:{args.rows}]" if args.rows else args.heldout.name,
        "int8_isa": kernel.isa(),
        "heldout_loss_fp32": round(fp32_loss, 5),
        "heldout_loss": round(loss, 5),
        "vs_fp32_percent": round(100 * (loss / fp32_loss - 1), 3),
        "greedy_agreement": round(sum(shares) / len(shares), 4),
        "agreement_per_prompt": [round(s, 3) for s in shares],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
