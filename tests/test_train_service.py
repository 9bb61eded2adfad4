"""The training endpoint on the real Cog server: POST /trainings -> weights archive -> a trained
version on a predictor; async webhooks, validation, bad data and cancel. And the training service
in-process on the tiny model: a SIGTERM keeps a checkpoint that `resume_from` finishes, and no
training leaves anything behind in the temporary folder."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from coglet import CancelationException
from conftest import PERSONAS

from finetune.cog.cogtools import CogServer, data_uri, post_with_retry, save_data_uri
from finetune.cog.service_train import ResumeError, run_training, sweep
from finetune.config import DataConfig, LoraSettings, TrainConfig
from finetune.data.records import DatasetError
from finetune.training import trainer as engine
from finetune.training.stopping import TrainingStopped

integration = pytest.mark.integration  # starts the real Cog server

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
    env = {"TMPDIR": str(tmp), "TRAINING_CHECKPOINT_DIR": str(scratch / "checkpoints")}
    server = CogServer("train", log_path=scratch / "cog.log", env=env).start()
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


def wait_for_log(log: Path, *needles: str, timeout: float = 240) -> bool:
    """Whether one line of the server's log holds every needle within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(all(n in line for n in needles) for line in log.read_text().splitlines()):
            return True
        time.sleep(0.2)
    return False


@integration
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


@integration
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


@integration
def test_out_of_range_hyperparameters_are_422(trainer, persona_file):
    resp = post_training(
        trainer, {"train_data": data_uri(persona_file), "lora_rank": 0, "learning_rate": 5.0}
    )
    assert resp.status_code == 422
    assert {d["loc"][-1] for d in resp.json()["detail"]} == {"lora_rank", "learning_rate"}


@integration
def test_bad_dataset_fails_with_record_numbers_before_any_model_load(trainer, scratch):
    bad = scratch / "bad.json"
    bad.write_text(
        json.dumps([{"instruction": "q", "output": "a"}] * 4 + [{"instruction": "q", "output": ""}])
    )
    body = post_training(trainer, {"train_data": data_uri(bad)}).json()
    assert body["status"] == "failed"
    assert "record 5" in body["error"] and "empty" in body["error"]
    # A failed training's response may come without its logs: read them in the server's log.
    logs = [line for line in (scratch / "cog.log").read_text().splitlines() if f'"{body["id"]}"' in line]
    assert any("if it is stopped by SIGTERM" in line for line in logs)  # the training's first line
    assert not any("Loading weights" in line or "trainable" in line for line in logs)


@integration
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
        return {p for p in (scratch / "tmp").rglob("*") if p.name.startswith(("training", "weights"))}

    thread = threading.Thread(target=long_training)
    thread.start()
    log = scratch / "cog.log"
    # Step 2 of this training: one log line names both.
    assert wait_for_log(log, f'"{tid}"', "step 2/500")
    assert requests.post(f"{trainer.url}/trainings/{tid}/cancel", timeout=30).status_code == 200
    thread.join(timeout=120)
    assert result["body"]["status"] == "canceled"
    assert "step 499/500" not in log.read_text()
    # Its start removed the last training's archive (read by then), and it left none of its own;
    # nor a checkpoint: only a SIGTERM keeps one.
    assert {p for p in scratch_files() if p.is_file()} == set()
    assert list((scratch / "checkpoints").iterdir()) == []
    # coglet answers the cancelled request a moment before it frees the training slot, so the
    # server reads BUSY for that moment (CI saw it once); it must be READY again soon after.
    trainer.wait_ready(timeout=30)
    again = post_training(trainer, {"train_data": data_uri(persona_file), **FAST, "max_steps": 1}).json()
    assert again["status"] == "succeeded"


def worker_pid(server: CogServer) -> int:
    """coglet's worker: the server's child process, which runs train()."""
    assert server.proc is not None
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat_file.read_text().rsplit(")", 1)[1].split()[1]) == server.proc.pid:
                return int(stat_file.parent.name)
    raise AssertionError(f"the Cog server {server.proc.pid} has no worker process")


@integration
def test_a_sigterm_to_the_cog_worker_keeps_a_checkpoint_that_resume_from_finishes(
    tmp_path, tiny_model_dir, tiny_data
):
    # coglet runs train() off its worker's main thread, which stays in native code: Python's own
    # SIGTERM handling never reaches the training there, and the signal used to kill the worker.
    tmp, checkpoints = tmp_path / "tmp", tmp_path / "checkpoints"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp), "TRAINING_CHECKPOINT_DIR": str(checkpoints), "BASE_MODEL": str(tiny_model_dir)}
    inputs = {
        "train_data": data_uri(tiny_data),
        "max_steps": 12,
        "batch_size": 4,
        "micro_batch_size": 2,
        "val_set_size": 0,
        "lora_rank": 4,
        "seed": 1,
    }
    log = tmp_path / "cog.log"
    with CogServer("train", log_path=log, env=env) as server:
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(body=post_training(server, inputs).json()))
        thread.start()
        assert wait_for_log(log, "step 2/12")
        os.kill(worker_pid(server), signal.SIGTERM)
        thread.join(timeout=300)
        stopped = result["body"]
        assert stopped["status"] == "failed", stopped
        found = re.search(
            r"stopped by SIGTERM after step (\d+).* resume_from=([0-9a-f]{32}) ", stopped["error"]
        )
        assert found, stopped["error"]
        step, run_id = int(found[1]), found[2]
        # Said up front too (the server's log: a failed training's response may come without logs).
        assert f"training {run_id}: if it is stopped by SIGTERM" in log.read_text()
        assert 2 <= step < 12 and f"step {step + 1}/12" not in log.read_text()
        kept = checkpoints / run_id / "adapter-checkpoints"
        assert [p.name for p in kept.iterdir()] == [f"checkpoint-{step:07d}"]
        server.wait_ready(timeout=30)  # the worker lives on: its training slot too
        resumed = post_training(server, {**inputs, "resume_from": run_id}).json()
        assert resumed["status"] == "succeeded", resumed.get("error")
        assert resumed["output"]["steps"] == 12 and f"resuming at step {step}" in resumed["logs"]
        assert list(checkpoints.iterdir()) == []
        assert [p.name for p in tmp.rglob("*") if p.is_file()] == ["weights.tar"]


# --- the service in-process, on the tiny model -------------------------------------------------


@pytest.fixture
def service(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """The service's temporary folder (empty, as on a fresh server) and its checkpoint folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TRAINING_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    return tmp, tmp_path / "checkpoints"


def tiny_training(model: Path, data: Path, max_steps: int = 3) -> Callable[[str], TrainConfig]:
    """A make_config as train.py's, for a few quick steps of the tiny model."""

    def make(output_dir: str) -> TrainConfig:
        return TrainConfig(
            base_model=str(model),
            output_dir=output_dir,
            max_steps=max_steps,
            batch_size=4,
            micro_batch_size=2,
            seed=1,
            eval_recall=2,
            eval_generate=0,
            data=DataConfig(data_path=str(data), val_set_size=0),
            lora=LoraSettings(lora_r=4),
        )

    return make


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


def after_step(step: int, action: Callable[[], None]):
    """An engine._after_step that calls `action` once step `step` is done."""
    real = engine._after_step

    def hook(cfg, plan, built, run, entry, mean_loss) -> None:
        real(cfg, plan, built, run, entry, mean_loss)
        if entry["step"] == step:
            action()

    return hook


def test_a_training_stopped_by_sigterm_keeps_its_checkpoint_until_resume_from_finishes_it(
    service, tiny_model_dir, tiny_data, monkeypatch
):
    tmp, checkpoints = service
    make = tiny_training(tiny_model_dir, tiny_data)
    real = engine._after_step
    monkeypatch.setattr(engine, "_after_step", after_step(1, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    lines: list[str] = []
    with pytest.raises(TrainingStopped, match="after step 1; its checkpoint is kept") as stopped:
        run_training(make, log=lines.append)
    found = re.search(r"resume_from=([0-9a-f]{32}) ", str(stopped.value))
    assert found
    run_id = found[1]
    assert f"resume_from={run_id}" in lines[0]  # said before any signal: a kill may leave no error
    assert stat.S_IMODE(checkpoints.stat().st_mode) == 0o700  # it holds strangers' data
    kept = [p.relative_to(checkpoints).as_posix() for p in checkpoints.glob("*/*/*")]
    assert kept == [f"{run_id}/adapter-checkpoints/checkpoint-0000001"]
    assert files(tmp) == []

    monkeypatch.setattr(engine, "_after_step", real)
    summary = run_training(make, resume_from=run_id, log=lines.append)
    assert any("resuming at step 1" in line for line in lines)
    assert summary.steps == 3 and [s["step"] for s in summary.card["history"]["steps"]] == [1, 2, 3]
    assert list(checkpoints.iterdir()) == []  # finished: nothing left to resume
    assert files(tmp) == [summary.archive]
    with pytest.raises(ResumeError, match="no stopped training"):
        run_training(make, resume_from=run_id)


def test_finished_trainings_leave_nothing_but_the_last_archive_in_the_temp_folder(
    service, tiny_model_dir, tiny_data, tmp_path, monkeypatch, synced
):
    tmp, checkpoints = service
    first = run_training(tiny_training(tiny_model_dir, tiny_data, max_steps=1))
    assert files(tmp) == [first.archive] and first.archive.name == "weights.tar"
    # Flushed under a temporary name, then renamed, then its folder flushed.
    staged = [p for p in synced if p.startswith(f"{first.archive.parent}/.weights.tar.")]
    assert staged and synced.index(staged[-1]) < len(synced) - 1
    assert synced[-1] == str(first.archive.parent)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "output": ""}]))
    with pytest.raises(DatasetError):
        run_training(tiny_training(tiny_model_dir, bad))
    assert files(tmp) == []  # the next training's start removed the archive (Cog has read it)

    def cancel() -> None:
        raise CancelationException

    monkeypatch.setattr(engine, "_after_step", after_step(1, cancel))
    with pytest.raises(CancelationException):
        run_training(tiny_training(tiny_model_dir, tiny_data))
    assert files(tmp) == []
    assert list(checkpoints.iterdir()) == []  # only a SIGTERM keeps a checkpoint


def test_resume_from_takes_only_the_run_id_of_a_stopped_training(service, tmp_path):
    # Strangers call /trainings: resume_from is a name in the checkpoint folder, never a path.
    tmp, checkpoints = service

    def make(output_dir: str) -> TrainConfig:
        raise AssertionError("no training may start")

    for bad in ["latest", "../../etc", str(tmp_path), "0" * 31, "A" * 32, "0" * 32 + "/..", "0" * 32 + "\n"]:
        with pytest.raises(ResumeError, match="32 hex digits"):
            run_training(make, resume_from=bad)
    with pytest.raises(ResumeError, match="no stopped training"):
        run_training(make, resume_from="0" * 32)
    running = checkpoints / ("1" * 32)
    (running / "adapter-checkpoints" / "checkpoint-0000001").mkdir(parents=True)
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a training working in it holds it
    try:
        with pytest.raises(ResumeError, match="running now"):
            run_training(make, resume_from=running.name)
    finally:
        os.close(fd)
    assert files(tmp) == [] and [p.name for p in checkpoints.iterdir()] == [running.name]


def test_only_the_newest_stopped_trainings_are_kept(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    now = time.time()

    def stopped(digit: str, age: float) -> Path:
        folder = root / (digit * 32)
        checkpoint = folder / "adapter-checkpoints" / "checkpoint-0000001"
        checkpoint.mkdir(parents=True)
        os.utime(checkpoint, (now - age, now - age))
        return folder

    newest, newer, old, running = stopped("1", 10), stopped("2", 20), stopped("3", 30), stopped("4", 40)
    died = root / ("5" * 32)  # its process died before a checkpoint: nothing to resume
    (died / "adapter").mkdir(parents=True)
    (root / "notes.txt").write_text("not a training")
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        removed = sweep(root, keep=2)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([old, died])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [newest.name, newer.name, running.name, "notes.txt"]
    )
