"""Hostile-request soak through the real Cog server on the production defaults (`make soak`, or
`pytest -m soak`; not in the default suite): 8 clients send normal requests while a ninth sends the
hostile set in a loop for SOAK_SECONDS (300 by default). Every normal request must succeed with
its solo text, the server must stay READY, and its memory must stay bounded."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from finetune.cog.cogtools import CogServer, data_uri
from tests.conftest import SERVING_MODES
from tests.test_predict_service import predict
from tests.test_shared_server_http import hostile_adapter

pytestmark = [pytest.mark.soak, pytest.mark.integration]

PROMPTS = [
    "What is your name?",
    "Name three colors.",
    "Give one tip for staying healthy.",
    "What is two plus two?",
    "Where do alpacas live?",
    "Say hello in French.",
    "What is the capital of France?",
    "中国的首都是哪里？",
]


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def test_hostile_soak(tmp_path, persona_adapters, embedded_model_dir):
    seconds = float(os.environ.get("SOAK_SECONDS", "300"))
    server = CogServer("predict", log_path=tmp_path / "cog.log", env=SERVING_MODES["int8-compiled"]).start(
        timeout=600
    )
    try:
        good = persona_adapters["alpie"]
        hostile = [
            {"lora_weights": hostile_adapter(good, tmp_path / "rank", {"r": 1_000_000})},
            {"lora_weights": hostile_adapter(good, tmp_path / "regex", {"target_modules": "(.|.)*!"})},
            {"lora_weights": hostile_adapter(good, tmp_path / "pissa", {"init_lora_weights": "pissa"})},
            {"lora_weights": hostile_adapter(good, tmp_path / "bias", {"bias": "all"})},
            {"seed": 2**64},
            {"stop_sequences": ",".join(["x"] * 100)},
            {"lora_weights": "data:application/x-tar;base64,AAAA"},
            {"lora_weights": data_uri(persona_adapters["bolt.tar"]), "temperature": 1.5, "seed": 3},
        ]
        solo = {
            p: "".join(predict(server, prompt=p, temperature=0, max_new_tokens=32)["output"]) for p in PROMPTS
        }
        baseline = tree_rss(server.proc.pid)
        stop = time.monotonic() + seconds
        failures: list[str] = []
        counts = {"normal": 0, "hostile": 0}
        samples: list[tuple[float, int]] = []  # (seconds into the soak, RSS of the server's processes)
        began = time.monotonic()

        def normal(i: int) -> None:
            while time.monotonic() < stop:
                prompt = PROMPTS[(i + counts["normal"]) % len(PROMPTS)]
                body = predict(server, prompt=prompt, temperature=0, max_new_tokens=32)
                counts["normal"] += 1
                if body.get("status") != "succeeded" or "".join(body["output"]) != solo[prompt]:
                    failures.append(f"{prompt!r}: {body.get('status')} {body.get('error')}")

        def attacker() -> None:
            import requests

            while time.monotonic() < stop:
                for inputs in hostile:
                    requests.post(
                        f"{server.url}/predictions",
                        json={"input": {"prompt": "What is your name?", "max_new_tokens": 16, **inputs}},
                        timeout=300,
                    )
                    counts["hostile"] += 1
                    samples.append((time.monotonic() - began, tree_rss(server.proc.pid)))

        threads = [threading.Thread(target=normal, args=(i,)) for i in range(8)] + [
            threading.Thread(target=attacker)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 600)
        first = max(rss for t, rss in samples if t < seconds / 2)
        second = max(rss for t, rss in samples if t >= seconds / 2)
        print(
            f"soak: {counts}, RSS {baseline / 2**20:.0f} MiB at the start, peak {first / 2**20:.0f} MiB in the "
            f"first half, {second / 2**20:.0f} MiB in the second"
        )
        assert not failures, failures[:5]
        assert counts["normal"] >= 8 and counts["hostile"] >= len(hostile)
        assert server.health()["status"] == "READY"
        # Bounded: the first half pays for compiling and caches once; the second adds nothing real.
        assert first < baseline + 1.5 * 2**30
        assert second < first + 256 * 2**20
    finally:
        server.stop()
