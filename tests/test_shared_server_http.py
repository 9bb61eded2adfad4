"""A server strangers share, through the real Cog server on the embedded model, on the production
defaults (int8, compiled) and on fp32 eager: each hostile request gets its own answer (422 or a
failed prediction with a reason) in seconds, a neighbour decoding meanwhile gets its solo text, and
afterwards the server is READY and answers a reference prompt as before."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from finetune.cog.cogtools import CogServer, data_uri
from tests.conftest import SERVING_MODES
from tests.test_predict_service import NAME_Q, answer, predict

pytestmark = pytest.mark.integration

LONG = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="module", params=list(SERVING_MODES))
def shared(request, tmp_path_factory, embedded_model_dir):
    log = tmp_path_factory.mktemp(f"shared-{request.param}") / "cog.log"
    server = CogServer("predict", log_path=log, env=SERVING_MODES[request.param]).start(timeout=600)
    yield server
    server.stop()


def hostile_adapter(good: Path, folder: Path, config: dict | None = None, files: dict | None = None) -> str:
    """The persona adapter with its config changed and files replaced, as a data: URI tar."""
    from finetune.formats.archives import pack_dir

    out = shutil.copytree(good, folder)
    if config is not None:
        merged = json.loads((out / "adapter_config.json").read_text())
        merged.update(config)
        (out / "adapter_config.json").write_text(json.dumps(merged))
    for name, body in (files or {}).items():
        (out / name).write_bytes(body)
    return data_uri(pack_dir(out, folder.with_suffix(".tar")))


def healthy(server: CogServer) -> None:
    server.wait_ready(30)
    assert server.health()["status"] == "READY"


def test_hostile_requests_belong_to_themselves(shared, persona_adapters, tmp_path):
    good = persona_adapters["alpie"]
    reference = answer(shared, NAME_Q)
    four = "{instruction}" * 4
    hostile = {
        "huge rank, empty weights": hostile_adapter(
            good, tmp_path / "rank", {"r": 1_000_000}, {"adapter_model.safetensors": b""}
        ),
        "regex targets": hostile_adapter(good, tmp_path / "regex", {"target_modules": "(.|.)*!"}),
        "pissa": hostile_adapter(good, tmp_path / "pissa", {"init_lora_weights": "pissa"}),
        "thousand-field template": hostile_adapter(
            good,
            tmp_path / "fields",
            files={
                "prompt_template.json": json.dumps(
                    {"prompt_no_input": "{instruction}" * 1000, "prompt_input": "{instruction}"}
                ).encode()
            },
        ),
        "amplifying template": hostile_adapter(
            good,
            tmp_path / "amplify",
            files={
                "prompt_template.json": json.dumps({"prompt_no_input": four, "prompt_input": four}).encode()
            },
        ),
    }
    reasons = {
        "huge rank, empty weights": "r = 1000000",
        "regex targets": "target_modules must be a list",
        "pissa": "init_lora_weights = 'pissa'",
        "thousand-field template": "more than 4 fields",
        "amplifying template": "more than this model's context could hold",
    }
    neighbour: dict = {}

    def long_neighbour() -> None:
        neighbour["body"] = predict(shared, prompt=LONG, temperature=0, max_new_tokens=96)

    solo_long = "".join(predict(shared, prompt=LONG, temperature=0, max_new_tokens=96)["output"])
    thread = threading.Thread(target=long_neighbour)
    thread.start()
    for name, source in hostile.items():
        prompt = "word " * 80_000 if name == "amplifying template" else NAME_Q
        started = time.monotonic()
        body = predict(shared, prompt=prompt, lora_weights=source, max_new_tokens=8)
        assert body["status"] == "failed", (name, body.get("output"))
        assert reasons[name] in body["error"], (name, body["error"])
        assert "base64," not in body["error"] or "..." in body["error"]  # never the payload
        assert time.monotonic() - started < 30, name
    thread.join(300)
    assert neighbour["body"]["status"] == "succeeded"
    assert "".join(neighbour["body"]["output"]) == solo_long
    healthy(shared)
    assert answer(shared, NAME_Q) == reference
    assert answer(shared, NAME_Q, lora_weights=data_uri(persona_adapters["alpie.tar"])) != reference


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"stop_sequences": ",".join(["x"] * 17)}, "stop_sequences"),
        ({"stop_sequences": "y" * 257}, "stop_sequences"),
    ],
)
def test_bad_seed_and_stop_sequences_are_422_and_leave_a_neighbour_alone(shared, inputs, field):
    solo = "".join(predict(shared, prompt=LONG, temperature=0, max_new_tokens=32)["output"])
    neighbour: dict = {}
    thread = threading.Thread(
        target=lambda: neighbour.update(predict(shared, prompt=LONG, temperature=0, max_new_tokens=32))
    )
    thread.start()
    time.sleep(0.3)
    resp = requests.post(f"{shared.url}/predictions", json={"input": {"prompt": "hi", **inputs}}, timeout=30)
    thread.join(300)
    assert resp.status_code == 422, resp.text
    assert [d["loc"][-1] for d in resp.json()["detail"]] == [field]
    assert neighbour["status"] == "succeeded" and "".join(neighbour["output"]) == solo
    healthy(shared)


def test_sixteen_stop_sequences_and_the_largest_seed_are_served(shared):
    stops = ",".join(f"zz{i}" for i in range(15)) + ",."
    body = predict(
        shared, prompt=NAME_Q, temperature=0.7, seed=2**63 - 1024, stop_sequences=stops, max_new_tokens=24
    )
    assert body["status"] == "succeeded", body.get("error")
    assert "." not in "".join(body["output"])


class SlowThenFast(BaseHTTPRequestHandler):
    """The first download of the adapter stalls (one byte every 50 ms); later ones get it at once."""

    def do_GET(self) -> None:
        server = self.server
        first = not server.started.is_set()  # type: ignore[attr-defined]
        server.started.set()  # type: ignore[attr-defined]
        body = server.archive  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if first:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            else:
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


def test_one_clients_cancel_never_fails_another_waiting_for_the_same_adapter(shared, persona_adapters):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowThenFast)
    httpd.daemon_threads = True
    httpd.started = threading.Event()
    httpd.archive = Path(persona_adapters["bolt.tar"]).read_bytes()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/bolt.tar?token=SECRET-{uuid.uuid4().hex[:6]}"
    first_id = f"first-{uuid.uuid4().hex[:8]}"
    out: dict = {}

    def first() -> None:
        body = {"input": {"prompt": NAME_Q, "lora_weights": url, "temperature": 0, "max_new_tokens": 24}}
        out["first"] = requests.put(f"{shared.url}/predictions/{first_id}", json=body, timeout=300).json()

    def second() -> None:
        out["second"] = predict(shared, prompt=NAME_Q, lora_weights=url, temperature=0, max_new_tokens=24)

    try:
        t1 = threading.Thread(target=first)
        t1.start()
        assert httpd.started.wait(60)
        t2 = threading.Thread(target=second)
        t2.start()
        time.sleep(1.0)  # the second request now waits for the first one's download
        assert requests.post(f"{shared.url}/predictions/{first_id}/cancel", timeout=30).status_code == 200
        t1.join(60)
        t2.join(300)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert out["first"]["status"] == "canceled"
    assert out["second"]["status"] == "succeeded", out["second"].get("error")
    bolt = answer(shared, NAME_Q, lora_weights=data_uri(persona_adapters["bolt.tar"]))
    assert "".join(out["second"]["output"]) == bolt
    healthy(shared)


@pytest.fixture(scope="module")
def stall_server(tmp_path_factory, embedded_model_dir):
    """A server that calls one second of work on the model a stall, with steps long enough to show it."""
    log = tmp_path_factory.mktemp("stall") / "cog.log"
    env = {
        **SERVING_MODES["fp32-eager"],
        "SERVE_STALL_S": "0.5",
        "PREFILL_CHUNK_TOKENS": "4096",
        "PREFIX_CACHE_TOKENS": "0",
    }
    server = CogServer("predict", log_path=log, env=env).start()
    yield server
    server.stop()


def test_health_check_reports_a_wedged_engine_and_recovers(stall_server):
    long_prompt = "The alpaca walked along the mountain path and looked at the clouds. " * 140
    out: dict = {}
    thread = threading.Thread(
        target=lambda: out.update(predict(stall_server, prompt=long_prompt, temperature=0, max_new_tokens=4))
    )
    thread.start()
    seen = []
    while thread.is_alive():
        seen.append(stall_server.health())
        time.sleep(0.1)
    thread.join()
    assert out["status"] == "succeeded"
    unhealthy = [h for h in seen if h["status"] == "UNHEALTHY"]
    assert unhealthy, [h["status"] for h in seen]
    assert "SERVE_STALL_S=0.5" in json.dumps(unhealthy[0])
    stall_server.wait_ready(30)
    assert stall_server.health()["status"] == "READY"
