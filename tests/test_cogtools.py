"""The local Cog client's report of a server start (`make predict`): how long the server took to be
ready and whether its decode step was compiled on this start or loaded from the cache, read back
from the server's log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.cog.cogtools import log_messages, setup_summary

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"


def coglet(message: str) -> str:
    """A worker's stderr line as coglet writes it into the server's log."""
    record = {
        "timestamp": "2026-01-01T00:00:00.000000Z",
        "level": "INFO",
        "fields": {"message": message, "source": "Stderr"},
        "target": "coglet::setup",
    }
    return json.dumps(record, ensure_ascii=False)


BUILDING = (
    "compile: building the decode step for this model shape (int8); a first start on a machine "
    "takes seconds to a minute; cached in cache/compiled"
)
READY = "compile: decode step ready in 37.0 s (cache/compiled/decode-0123.pt2)"
SETUP = "setup: base weights/model on cpu (torch.float32, int8 decoding); adapter none; batch 8"


def log(*messages: str) -> list[str]:
    lines = [
        '{"timestamp":"2026-01-01T00:00:00Z","level":"INFO","fields":{"message":"Running setup"},"target":"x"}',
        *map(coglet, messages),
        '{"level":"INFO","fields":{"message":"Server ready","num_slots":32},"target":"coglet"}',
    ]
    return log_messages("\n".join(lines) + "\n")


def test_log_messages_are_read_from_coglets_json_lines_and_other_lines_kept():
    text = "\n".join([coglet("setup: base x"), "plain text", "7", '{"fields": {"error": "e"}}', "{not json"])
    assert log_messages(text) == [
        "setup: base x",
        "plain text",
        "7",
        '{"fields": {"error": "e"}}',
        "{not json",
    ]


@pytest.mark.parametrize(
    "messages, want",
    [
        (
            [BUILDING, READY, SETUP],
            "server ready in 52.3 s; the decode step was compiled on this start in 37.0 s; "
            "later starts load it from the cache",
        ),
        (
            ["compile: decode step ready in 0.6 s (cache/decode-0123.pt2)", SETUP],
            "server ready in 52.3 s; the decode step was loaded from the cache in 0.6 s (compiled before)",
        ),
        (
            [
                "compile cache: not using cache/compiled: it is writable by others. Code built ...",
                BUILDING,
                READY,
            ],
            "server ready in 52.3 s; the decode step was compiled on this start in 37.0 s, in a temporary "
            "folder: later starts compile it again (see the log)",
        ),
        (
            ["compile: decoding eagerly: the compiled step is built for CPUs; this model runs on mps", SETUP],
            "server ready in 52.3 s; decoding eagerly: the compiled step is built for CPUs; this model runs on mps",
        ),
        (
            [
                "compile: decode steps run as CUDA graphs (recorded per batch and context bucket, up to 8 rows)"
            ],
            "server ready in 52.3 s; decode steps run as CUDA graphs",
        ),
        ([SETUP], "server ready in 52.3 s"),  # SERVE_COMPILE=off: nothing said about the step
    ],
)
def test_the_setup_summary_says_whether_the_decode_step_was_compiled_or_loaded(messages, want):
    assert setup_summary(log(*messages), 52.3) == want


def test_the_lines_the_summary_reads_are_the_ones_the_server_prints():
    """The summary reads the server's own log lines: a change to one of them must come here too."""
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py")))
    for said in (
        'f"compile: decode step ready in {time.perf_counter() - started:.1f} s',
        'f"compile: building {what}',
        'f"compile: decoding eagerly: {reason}"',
        'f"compile cache: not using {configured}',
        '"compile: decode steps run as CUDA graphs',
        'f"setup: base {self.base_path}',
    ):
        assert said in source, said
