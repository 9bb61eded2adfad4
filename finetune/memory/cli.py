"""`python -m finetune plan`: the memory planner's command (plan.py) with tables or JSON, and an exit
status a script can test: 0 when every plan shown fits, 1 when one does not, 2 on bad input."""

from __future__ import annotations

import argparse
import json
import sys

from .plan import (
    DEFAULT_CUTOFF,
    DEFAULT_MICRO_BATCH,
    DEFAULT_R,
    DEFAULT_TARGETS,
    DTYPES,
    QUANTIZATIONS,
    PlanError,
    load_config,
    parse_memory,
    plan_serving,
    plan_training,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune plan",
        description="Will LoRA training and serving of this model fit on this GPU, and with which settings? "
        "Estimated from the model's config.json alone (no weights, no GPU). Exit status: 0 when every "
        "plan shown fits, 1 when one does not (--serve_rows 0 plans training alone), 2 on bad input.",
    )
    add = parser.add_argument
    add("--base_model", required=True, help="a model folder, a config.json file or a hub id")
    add(
        "--gpu_memory",
        help="the GPU's memory: 24GiB, 24GB, 80G (GB and G are 10^9 bytes; a card sold as 24 GB has 24GiB); "
        "unset: no limit, the estimate alone",
    )
    add("--micro_batch_size", type=int, default=DEFAULT_MICRO_BATCH, help="default %(default)s")
    add("--cutoff_len", type=int, default=DEFAULT_CUTOFF, help="tokens per example; default %(default)s")
    add("--lora_r", type=int, default=DEFAULT_R, help="default %(default)s")
    add(
        "--lora_target_modules",
        default=",".join(DEFAULT_TARGETS),
        help="all-linear or names such as q_proj,v_proj; default %(default)s",
    )
    add("--dtype", default="auto", help=f"{', '.join(DTYPES)}; auto: bfloat16 on a GPU")
    add("--quantization", default="auto", help=f"{', '.join(QUANTIZATIONS)}; auto: the fastest that fits")
    add("--gradient_checkpointing", default="auto", help="auto, true or false; auto: the fastest that fits")
    add("--world_size", type=int, default=1, help="GPUs under torchrun, one process each")
    add("--strategy", default="auto", help="ddp, fsdp or auto (ddp when the whole model fits each GPU)")
    add(
        "--serve_rows",
        type=int,
        default=None,
        help="requests decoded together; default the engine's, 0: no serving plan",
    )
    add(
        "--serve_tokens",
        type=int,
        default=None,
        help="the KV cache budget in token slots (rows x length); default what the server takes on this GPU",
    )
    add("--json", action="store_true", help="print JSON (fits, peak_bytes, settings, training, serving)")
    return parser


def _checkpointing(text: str) -> str | bool:
    from ..config import parse_bool

    if text.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise PlanError(f"--gradient_checkpointing {text!r}: use auto, true or false") from None


def main(argv: list[str] | None = None) -> int:
    from ..config import parse_list
    from ..errors import user_errors

    args = _parser().parse_args(argv)
    try:
        memory = parse_memory(args.gpu_memory)
        config = load_config(args.base_model)
        targets = parse_list(args.lora_target_modules)
        plans = [
            plan_training(
                config,
                gpu_memory=memory,
                micro_batch_size=args.micro_batch_size,
                cutoff_len=args.cutoff_len,
                lora_r=args.lora_r,
                lora_target_modules=targets,
                dtype=args.dtype,
                quantization=args.quantization,
                gradient_checkpointing=_checkpointing(args.gradient_checkpointing),
                world_size=args.world_size,
                strategy=args.strategy,
            )
        ]
        if args.serve_rows != 0:
            plans.append(
                plan_serving(
                    config,
                    gpu_memory=memory,
                    max_rows=args.serve_rows,
                    max_tokens=args.serve_tokens,
                    quantization=args.quantization,
                    dtype=args.dtype,
                )
            )
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fits = all(p.fits for p in plans)
    if args.json:
        first = plans[0].to_json()
        out = {"fits": fits, "peak_bytes": first["peak_bytes"], "settings": first["settings"]}
        print(json.dumps(out | {p.kind: p.to_json() for p in plans}, indent=2))
    else:
        print("\n\n".join(p.table() for p in plans))
    return 0 if fits else 1
