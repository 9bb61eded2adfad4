"""This tree's serving throughput against another commit's, alternating servers in one run: what a
change to the request path costs (e.g. the hostile-request checks, against the commit before them).

    python -m bench.against_worker REF [--rounds 2] [--clients 8] [--per-client 2] [--tokens 64]

REF is checked out into a temporary git worktree; each round starts REF's server, then this tree's,
bare (no adapter) on the defaults (int8, compiled on a CPU). It prints one line per server and round (aggregate
tokens/s of `--clients` clients, p95 time to first token, share of texts equal to their solo
texts) and the ratio of the medians."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ALPACA
from bench.serve_worker import PROMPTS, run_case
from finetune.cog import cogtools

ROOT = Path(__file__).resolve().parent.parent


def schema_module(root: Path) -> str:
    """The module that writes a tree's Cog schema: finetune.cog.cogtools, or finetune.cogtools in
    trees from before the finetune/cog/ package."""
    return (
        "finetune.cog.cogtools"
        if (root / "finetune" / "cog" / "cogtools.py").is_file()
        else "finetune.cogtools"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="the commit to compare with (e.g. HEAD~3)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="against-"))
    other = work / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.ref], check=True)
    try:
        # The other tree serves the same base weights (linked), and each tree its own predictor's
        # schema, written by its own code (this process has imported one predict.py already).
        (other / "weights").mkdir(exist_ok=True)
        for entry in (ROOT / "weights").iterdir():
            if not (other / "weights" / entry.name).exists():
                (other / "weights" / entry.name).symlink_to(entry)
        cogtools.write_schema = lambda root: subprocess.run(
            [sys.executable, "-m", schema_module(Path(root)), "schema"],
            cwd=root,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        spec = {"workdir": str(work), "clients": [args.clients], "per_client": args.per_client}

        def body(i: int) -> dict:
            return {
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_new_tokens": args.tokens,
                "temperature": 0,
                **ALPACA,
            }

        results: dict[str, list[dict]] = {"ref": [], "this": []}
        for r in range(args.rounds):
            for name, root in (("ref", other), ("this", ROOT)):
                # A compile cache per tree: each tree compiles once and reuses it in later rounds.
                env = {"SERVE_COMPILE_CACHE": str(work / f"compiled-{name}")}
                case = run_case(f"{name}-{r}", {"root": root}, env, spec, body)
                row = case["rows"][0]
                results[name].append(row)
                print(
                    f"round {r} {name}: {row['tokens_per_second']} tok/s, TTFT p95 {row['ttft_ms_p95']} ms, "
                    f"same as solo {row['same_as_solo']}, errors {len(row['errors'])}",
                    flush=True,
                )
        tps = {k: statistics.median(x["tokens_per_second"] for x in v) for k, v in results.items()}
        print(
            f"{args.clients} clients: this {tps['this']:.1f} tok/s, {args.ref} {tps['ref']:.1f} tok/s, "
            f"ratio {tps['this'] / tps['ref']:.3f}"
        )
        return 0
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
