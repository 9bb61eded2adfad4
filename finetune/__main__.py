"""`python -m finetune <command>`: one entry point for every stage."""

from __future__ import annotations

import argparse
import sys


def _fetch_default(argv: list[str]) -> int:
    from .model.weights import fetch_default

    argparse.ArgumentParser(
        prog="finetune fetch-default", description="Install the embedded default model under weights/"
    ).parse_args(argv)
    fetch_default()
    return 0


def _convert_gguf(argv: list[str]) -> int:
    from pathlib import Path

    from .model.weights import convert_gguf

    parser = argparse.ArgumentParser(
        prog="finetune convert-gguf", description="Convert a llama.cpp GGUF file into a Hugging Face folder"
    )
    parser.add_argument("--input", required=True, help="path to the .gguf file")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    print(convert_gguf(Path(args.input), Path(args.output_dir), args.dtype))
    return 0


def _convert_meta(argv: list[str]) -> int:
    from .formats.convert_meta import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from .formats.export import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from .training.cli import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from .training.evaluation import main

    return main(argv)


def _plan(argv: list[str]) -> int:
    from .memory.cli import main

    return main(argv)


def _convert_adapter(argv: list[str]) -> int:
    from pathlib import Path

    from .model.adapter_folder import convert_pickled_adapter

    parser = argparse.ArgumentParser(
        prog="finetune convert-adapter",
        description="Convert a TRUSTED adapter_model.bin to safetensors (loaded with torch.load(weights_only=True))",
    )
    parser.add_argument("--input", required=True, help="adapter folder holding adapter_model.bin")
    print(convert_pickled_adapter(Path(parser.parse_args(argv).input)))
    return 0


def _generate(argv: list[str]) -> int:
    from .config import GenerationSettings, field_default
    from .data.prompts import AUTO
    from .serving.server import ModelServer
    from .settings import DTYPES

    G = GenerationSettings
    parser = argparse.ArgumentParser(
        prog="finetune generate", description="Generate text, streamed to the terminal"
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--input", default="", help="optional Alpaca context")
    parser.add_argument("--base_model", default=None)
    parser.add_argument("--adapter", default=None, help="adapter folder, archive, URL or data URI")
    parser.add_argument("--prompt_template", default=AUTO)
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
        default = field_default(G, name)
        parser.add_argument(f"--{name}", type=type(default), default=default)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="weights dtype (default: $SERVE_DTYPE or auto = fp32 on CPU, bf16 on GPUs that have it)",
    )
    a = parser.parse_args(argv)
    server = ModelServer(base_model=a.base_model, adapter=a.adapter, dtype=a.dtype)
    settings = G(
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        repetition_penalty=a.repetition_penalty,
        stop_sequences=a.stop,
        seed=a.seed,
    )
    for chunk in server.generate(a.prompt, a.input, settings, a.prompt_template):
        print(chunk, end="", flush=True)
    print()
    return 0


COMMANDS = {
    "fetch-default": _fetch_default,
    "convert-gguf": _convert_gguf,
    "convert-meta": _convert_meta,
    "convert-adapter": _convert_adapter,
    "train": _train,
    "generate": _generate,
    "export": _export,
    "eval": _eval,
    "plan": _plan,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: python -m finetune {" + ",".join(COMMANDS) + "} [options]")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    from .errors import user_errors

    try:
        return COMMANDS[argv[0]](argv[1:])
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:
        from .training.allocator import restart_with_jemalloc

        restart_with_jemalloc()  # before torch: see allocator.py
    sys.exit(main())
