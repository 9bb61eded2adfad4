"""`python -m finetune <command>`: one entry point for every stage."""

from __future__ import annotations

import argparse
import sys


def _fetch_default(argv: list[str]) -> int:
    from .weights import fetch_default

    argparse.ArgumentParser(
        prog="finetune fetch-default", description="Install the embedded default model under weights/"
    ).parse_args(argv)
    fetch_default()
    return 0


def _convert_gguf(argv: list[str]) -> int:
    from pathlib import Path

    from .weights import convert_gguf

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
    from .convert_meta import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from .export import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from .cli import main

    return main(argv)


def _convert_adapter(argv: list[str]) -> int:
    from pathlib import Path

    from .artifacts import convert_pickled_adapter

    parser = argparse.ArgumentParser(
        prog="finetune convert-adapter",
        description="Convert a TRUSTED adapter_model.bin to safetensors (loaded with torch.load(weights_only=True))",
    )
    parser.add_argument("--input", required=True, help="adapter folder holding adapter_model.bin")
    print(convert_pickled_adapter(Path(parser.parse_args(argv).input)))
    return 0


COMMANDS = {
    "fetch-default": _fetch_default,
    "convert-gguf": _convert_gguf,
    "convert-meta": _convert_meta,
    "convert-adapter": _convert_adapter,
    "train": _train,
    "export": _export,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: python -m finetune {" + ",".join(COMMANDS) + "} [options]")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    from .modeling import ModelError
    from .weights import WeightsError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (WeightsError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
