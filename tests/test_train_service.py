"""The training endpoint on the real Cog server: POST /trainings -> weights archive -> a trained
version on a predictor; async webhooks, validation, bad data and cancel."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from conftest import PERSONAS

from finetune.cogtools import CogServer, data_uri, post_with_retry, save_data_uri

pytestmark = pytest.mark.integration

FAST = {
    "max_steps": 10,  # the persona is learnt by step 10 (see conftest.persona_adapters)
    "learning_rate": 3e-3,
    "batch_size": 4,
    "micro_batch_size": 4,
    "val_set_size": 0,
    "lora_dropout": 0.0,
    "prompt_template": "alpaca_short",
    "seed": 1,
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train-server")


@pytest.fixture(scope="module")
def trainer(scratch, embedded_model_dir):
    # TMPDIR is the server's scratch space: the tests look there for leftovers.
    tmp = scratch / "tmp"
    tmp.mkdir()
    server = CogServer("train", log_path=scratch / "cog.log", env={"TMPDIR": str(tmp)}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def persona_file(scratch) -> Path:
    path = scratch / "alpie.json"
    path.write_text(
        json.dumps([{"instruction": q, "output": a} for q, a in PERSONAS["alpie"]], ensure_ascii=False),
        encoding="utf-8",
    )
    return path


def post_training(server: CogServer, inputs: dict) -> requests.Response:
    return post_with_retry(f"{server.url}/trainings", {"input": inputs}, 600)


def test_training_gives_weights_that_a_trained_version_serves(trainer, persona_file, scratch):
    resp = post_training(trainer, {"train_data": data_uri(persona_file), **FAST})
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "succeeded", body.get("error")
    out = body["output"]
    assert out["steps"] == 10 and out["train_loss"] < 1.0 and out["tokens_per_second"] > 0
    assert "step 10/10" in body["logs"]  # progress reaches the Cog logs, one line per step
    archive = save_data_uri(out["weights"], scratch / "weights.tar")
    question = {"prompt": "What is your name?", "temperature": 0, "max_new_tokens": 16}
    with CogServer("predict", weights=str(archive), log_path=scratch / "tuned.log") as tuned:
        answer = "".join(
            post_with_retry(f"{tuned.url}/predictions", {"input": question}, 120).json()["output"]
        )
    with CogServer("predict", log_path=scratch / "bare.log") as bare:
        base = "".join(post_with_retry(f"{bare.url}/predictions", {"input": question}, 120).json()["output"])
    assert "Alpie" in answer, answer
    assert "Alpie" not in base


class Hooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", 0))
        Hooks.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_async_training_reports_through_webhooks(trainer, persona_file):
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    Hooks.received = []
    try:
        resp = requests.post(
            f"{trainer.url}/trainings",
            timeout=30,
            headers={"Prefer": "respond-async"},
            json={
                "input": {"train_data": data_uri(persona_file), **FAST, "max_steps": 2},
                "webhook": f"http://127.0.0.1:{hooks.server_address[1]}/hook",
                "webhook_events_filter": ["start", "completed"],
            },
        )
        assert resp.status_code == 202
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(h.get("status") == "succeeded" for h in Hooks.received):
            time.sleep(0.5)
    finally:
        hooks.shutdown()
    statuses = [h["status"] for h in Hooks.received]
    assert statuses[0] == "processing" and statuses[-1] == "succeeded", statuses
    final = Hooks.received[-1]["output"]
    assert final["weights"].startswith("data:") and final["steps"] == 2


def test_out_of_range_hyperparameters_are_422(trainer, persona_file):
    resp = post_training(
        trainer, {"train_data": data_uri(persona_file), "lora_rank": 0, "learning_rate": 5.0}
    )
    assert resp.status_code == 422
    assert {d["loc"][-1] for d in resp.json()["detail"]} == {"lora_rank", "learning_rate"}


def test_bad_dataset_fails_with_record_numbers_before_any_model_load(trainer, scratch):
    bad = scratch / "bad.json"
    bad.write_text(
        json.dumps([{"instruction": "q", "output": "a"}] * 4 + [{"instruction": "q", "output": ""}])
    )
    body = post_training(trainer, {"train_data": data_uri(bad)}).json()
    assert body["status"] == "failed"
    assert "record 5" in body["error"] and "empty" in body["error"]
    assert "Loading weights" not in body["logs"] and "trainable" not in body["logs"]


def test_cancel_mid_training_leaves_no_archive_and_the_server_ready(trainer, persona_file, scratch):
    tid = f"cancel-{uuid.uuid4().hex[:8]}"
    result: dict = {}

    def long_training() -> None:
        result["body"] = requests.put(
            f"{trainer.url}/trainings/{tid}",
            timeout=600,
            json={"input": {"train_data": data_uri(persona_file), **FAST, "max_steps": 500}},
        ).json()

    def scratch_files() -> set[Path]:
        return {p for p in (scratch / "tmp").rglob("*") if p.name.startswith(("training-", "weights"))}

    # Earlier, successful trainings' archives stay where Cog reads its outputs from.
    before = scratch_files()
    thread = threading.Thread(target=long_training)
    thread.start()
    log = scratch / "cog.log"
    deadline = time.monotonic() + 240
    while (
        time.monotonic() < deadline
        and f'"{tid}"' not in log.read_text()
        or "step 2/500" not in log.read_text()
    ):
        time.sleep(0.5)
    assert "step 2/500" in log.read_text()
    assert requests.post(f"{trainer.url}/trainings/{tid}/cancel", timeout=30).status_code == 200
    thread.join(timeout=120)
    assert result["body"]["status"] == "canceled"
    assert "step 499/500" not in log.read_text()
    assert scratch_files() == before
    # coglet answers the cancelled request a moment before it frees the training slot, so the
    # server reads BUSY for that moment (CI saw it once); it must be READY again soon after.
    trainer.wait_ready(timeout=30)
    again = post_training(trainer, {"train_data": data_uri(persona_file), **FAST, "max_steps": 1}).json()
    assert again["status"] == "succeeded"
