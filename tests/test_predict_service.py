"""The prediction service on the real Cog server and the embedded model: streaming, trained
versions (COG_WEIGHTS), per-request adapters, determinism, cancel and bad input."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch

from finetune.cog.cogtools import CogServer, data_uri, iter_sse, post_sse, post_with_retry

pytestmark = pytest.mark.integration

NAME_Q = "What is your name?"


def predict(server: CogServer, timeout: float = 300, **inputs) -> dict:
    resp = post_with_retry(f"{server.url}/predictions", {"input": inputs}, timeout)
    assert resp.status_code == 200, resp.text
    return resp.json()


def answer(server: CogServer, prompt: str, **inputs) -> str:
    body = predict(server, prompt=prompt, temperature=0, max_new_tokens=24, **inputs)
    assert body["status"] == "succeeded", body.get("error")
    return "".join(body["output"])


def sse_events(server: CogServer, inputs: dict) -> list[tuple[str, dict]]:
    for _ in range(50):  # coglet may still be freeing its slot from the previous request
        resp = post_sse(server.url, inputs)
        if resp.status_code != 409:
            break
        time.sleep(0.2)
    assert resp.status_code == 200
    return list(iter_sse(resp))


def start(tmp_path_factory, name: str, weights: str | None = None, env: dict | None = None) -> CogServer:
    log = tmp_path_factory.mktemp(name) / "cog.log"
    return CogServer("predict", weights=weights, log_path=log, env=env).start()


@pytest.fixture(scope="module")
def bare(tmp_path_factory, embedded_model_dir):
    server = start(tmp_path_factory, "bare")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def alpie(tmp_path_factory, persona_adapters):
    server = start(tmp_path_factory, "alpie", weights=str(persona_adapters["alpie.tar"]))
    yield server
    server.stop()


def test_sse_streams_several_output_events_before_completed(bare):
    events = sse_events(bare, {"prompt": "Name three colors.", "max_new_tokens": 12, "temperature": 0})
    names = [n for n, _ in events]
    assert names.count("output") >= 2
    assert names.index("completed") > max(i for i, n in enumerate(names) if n == "output")
    completed = dict(events)["completed"]
    assert completed["status"] == "succeeded"
    assert "".join(d["chunk"] for n, d in events if n == "output") == "".join(completed["output"])
    assert {"input_token_count", "output_token_count", "time_to_first_token", "tokens_per_second"} <= set(
        completed["metrics"]
    )


def test_trained_version_uses_its_adapter_and_template(alpie, bare):
    tuned = answer(alpie, NAME_Q)
    base = answer(bare, NAME_Q)
    assert "Alpie" in tuned, tuned
    assert "Alpie" not in base and tuned != base
    assert "###" not in tuned  # the template is not echoed and generation stops at EOS
    setup_lines = [ln for ln in alpie.log_path.read_text().splitlines() if "setup: base" in ln]
    assert len(setup_lines) == 1 and "(merged)" in setup_lines[0]


def test_chinese_streams_without_broken_characters(alpie):
    events = sse_events(alpie, {"prompt": "你叫什么名字？", "max_new_tokens": 24, "temperature": 0})
    chunks = [d["chunk"] for n, d in events if n == "output"]
    assert chunks and all("\ufffd" not in c for c in chunks)
    text = "".join(chunks)
    assert "阿尔皮" in text, text


def test_per_request_adapters_match_dedicated_servers(tmp_path_factory, persona_adapters, bare, alpie):
    uris = {name: data_uri(persona_adapters[f"{name}.tar"]) for name in ("alpie", "bolt")}
    questions = [NAME_Q, "Who made you?"]
    swapped = {}
    for name in ("alpie", "bolt", "alpie", "bolt"):
        for q in questions:
            got = answer(bare, q, lora_weights=uris[name])
            assert swapped.setdefault((name, q), got) == got  # the same adapter answers the same each time
    bolt = start(tmp_path_factory, "bolt", weights=str(persona_adapters["bolt.tar"]))
    try:
        dedicated = {("bolt", q): answer(bolt, q) for q in questions}
    finally:
        bolt.stop()
    dedicated.update({("alpie", q): answer(alpie, q) for q in questions})
    assert swapped == dedicated
    assert "Alpie" in swapped[("alpie", NAME_Q)] and "Bolt" in swapped[("bolt", NAME_Q)]
    # Requests without lora_weights still get the bare base, untouched by the cached adapters.
    assert "Alpie" not in answer(bare, NAME_Q) and "Bolt" not in answer(bare, NAME_Q)
    log = bare.log_path.read_text()
    assert log.count("setup: base") == 1


def scaled_adapter(folder: Path, dest: Path, factor: float) -> str:
    """Another adapter of the same shape: `folder`'s with lora_B scaled, as a data URI."""
    import shutil

    from safetensors.torch import load_file, save_file

    from finetune.formats.archives import pack_dir

    shutil.copytree(folder, dest)
    weights = dest / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, str(weights))
    return data_uri(pack_dir(dest, dest.with_suffix(".tar")))


def test_four_adapters_and_the_base_in_one_batch_answer_as_each_does_alone(persona_adapters, bare, tmp_path):
    """Requests for different lora_weights (and none) sent at once decode in mixed batches; each gets
    the text it gets alone, which for alpie and bolt equals a dedicated server's (test above)."""
    uris = [data_uri(persona_adapters[f"{n}.tar"]) for n in ("alpie", "bolt")]
    uris += [scaled_adapter(persona_adapters[n], tmp_path / f"{n}-half", 0.5) for n in ("alpie", "bolt")]
    asks = [(NAME_Q, uri) for uri in uris] + [(NAME_Q, None), ("Who made you?", uris[1])]
    alone = [answer(bare, q, **({"lora_weights": u} if u else {})) for q, u in asks]
    # alpie, bolt and the bare base answer differently (the scaled copies may agree with theirs).
    assert len({alone[0], alone[1], alone[4]}) == 3, alone
    together: list[str | None] = [None] * len(asks)
    barrier = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        q, u = asks[i]
        barrier.wait()
        together[i] = answer(bare, q, **({"lora_weights": u} if u else {}))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert together == alone


def test_same_seed_same_text_and_temperature_zero_is_greedy(bare, embedded_model_dir):
    sampled = dict(
        prompt="Write a short poem about the sea.", temperature=0.9, top_p=0.95, seed=123, max_new_tokens=20
    )
    first, second = predict(bare, **sampled), predict(bare, **sampled)
    assert first["output"] == second["output"]
    greedy = answer(bare, "Give me one tip for learning to cook.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.encoding import encode_prompt
    from finetune.data.prompts import load_template

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir).eval()
    # No adapter: `auto` is the base's own chat template.
    text = load_template("chat").render("Give me one tip for learning to cook.", tokenizer=tok)
    ids = torch.tensor([encode_prompt(tok, text)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    expected = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert greedy == expected


def test_cancel_one_of_four_leaves_the_others_their_solo_outputs(bare):
    """coglet 0.23.1 does not deliver a cancel to an async prediction that streams from a plain
    generator (the only kind that streams per token with concurrency > 1): the cancelled request
    ends `canceled` with no output, and decodes on in its batch row until its max_new_tokens (the
    engine stops a request within a step when its caller does close it: test_engine.py). What must
    hold here: the other requests of the batch are untouched and the server goes on."""
    prompts = [NAME_Q, "Who made you?", "Name three colors."]
    solo = [answer(bare, q) for q in prompts]
    pid = f"cancel-{uuid.uuid4().hex[:8]}"
    results: dict = {}

    def long_request() -> None:
        body = {
            "input": {
                "prompt": "Write a very long story about a dragon.",
                "max_new_tokens": 120,
                "temperature": 0,
            }
        }
        results["cancelled"] = requests.put(f"{bare.url}/predictions/{pid}", timeout=300, json=body).json()

    def short(i: int) -> None:
        time.sleep(0.5)  # join the batch while the long request decodes
        results[i] = answer(bare, prompts[i])

    threads = [threading.Thread(target=long_request)] + [
        threading.Thread(target=short, args=(i,)) for i in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(1.5)
    cancel = requests.post(f"{bare.url}/predictions/{pid}/cancel", timeout=30)
    assert cancel.status_code == 200
    # The next request is not queued behind the cancelled one: it joins the batch at the next step.
    after = predict(bare, prompt=NAME_Q, temperature=0, max_new_tokens=24)
    assert "".join(after["output"]) == solo[0]
    assert after["metrics"]["time_to_first_token"] < 2
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert results["cancelled"]["status"] == "canceled", results["cancelled"]
    assert not results["cancelled"].get("output")
    assert [results[i] for i in range(3)] == solo
    assert answer(bare, NAME_Q) == solo[0]


class Drip(BaseHTTPRequestHandler):
    """An adapter archive that arrives one byte every 50 ms (a stalled or hostile host)."""

    def do_GET(self) -> None:
        self.server.started.set()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        try:
            for _ in range(6000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            self.server.hung_up.set()  # type: ignore[attr-defined]

    def log_message(self, *args) -> None:
        pass


def test_cancel_stops_a_lora_weights_download_while_others_decode(bare):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    httpd.daemon_threads = True
    httpd.started, httpd.hung_up = threading.Event(), threading.Event()
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/adapter.tar"
    solo = answer(bare, NAME_Q)
    pid = f"download-{uuid.uuid4().hex[:8]}"
    result: dict = {}

    def download() -> None:
        body = {"input": {"prompt": NAME_Q, "lora_weights": url}}
        result["body"] = requests.put(f"{bare.url}/predictions/{pid}", timeout=300, json=body).json()

    thread = threading.Thread(target=download)
    try:
        thread.start()
        assert httpd.started.wait(60)
        # The download runs off the compute thread: a request meanwhile is served at its usual speed.
        during = predict(bare, prompt=NAME_Q, temperature=0, max_new_tokens=24)
        assert "".join(during["output"]) == solo
        assert during["metrics"]["time_to_first_token"] < 2
        assert thread.is_alive()  # still downloading
        assert requests.post(f"{bare.url}/predictions/{pid}/cancel", timeout=30).status_code == 200
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert result["body"]["status"] == "canceled", result["body"]
        assert httpd.hung_up.wait(10)  # the server stopped reading the archive
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert answer(bare, NAME_Q) == solo


@pytest.mark.parametrize(
    "inputs, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 5000}, "max_new_tokens"),
        ({"prompt": "hi", "prompt_template": "vicuna"}, "prompt_template"),
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "seed": -1}, "seed"),
        ({"prompt": "hi", "stop_sequences": ",".join(["x"] * 17)}, "stop_sequences"),
        ({"prompt": "hi", "stop_sequences": "x" * 257}, "stop_sequences"),
    ],
)
def test_bad_inputs_are_422(bare, inputs, field):
    resp = requests.post(f"{bare.url}/predictions", json={"input": inputs}, timeout=30)
    assert resp.status_code == 422
    assert [d["loc"][-1] for d in resp.json()["detail"]] == [field]


def test_bad_adapters_fail_the_prediction_with_a_reason(bare, tiny_model_dir, tmp_path):
    import io
    import tarfile

    from finetune.config import DataConfig, LoraSettings, TrainConfig
    from finetune.formats.archives import pack_dir
    from finetune.training.trainer import train

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "q", "output": "a"}] * 4))
    foreign = tmp_path / "foreign"
    train(
        TrainConfig(
            base_model=str(tiny_model_dir),
            output_dir=str(foreign),
            max_steps=1,
            batch_size=4,
            data=DataConfig(data_path=str(data), val_set_size=0),
            lora=LoraSettings(lora_r=2),
        )
    )
    foreign_tar = pack_dir(foreign, tmp_path / "foreign.tar")
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(b"\x00not an archive" * 100)
    escaping = tmp_path / "escape.tar"
    with tarfile.open(escaping, "w") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    cases = {foreign_tar: "different base model", corrupt: "archive", escaping: "../evil.txt"}
    for archive, reason in cases.items():
        body = predict(bare, prompt=NAME_Q, lora_weights=data_uri(archive), max_new_tokens=4)
        assert body["status"] == "failed", body
        assert reason in body["error"], body["error"]
    local = predict(bare, prompt=NAME_Q, lora_weights=str(foreign), max_new_tokens=4)
    assert local["status"] == "failed" and "local paths are not accepted" in local["error"]
    # The server extracts under its own temporary folder: nothing escaped it or its parent.
    tmp = Path(tempfile.gettempdir())
    assert not (tmp / "evil.txt").exists() and not list(tmp.glob("adapters-*/evil.txt"))
    assert answer(bare, NAME_Q)  # the server is still healthy


def test_setup_with_a_corrupt_adapter_archive_fails_with_a_reason(tmp_path):
    corrupt = tmp_path / "weights.tar"
    corrupt.write_bytes(b"garbage" * 50)
    server = CogServer("predict", weights=str(corrupt), log_path=tmp_path / "cog.log")
    with pytest.raises(RuntimeError, match="setup failed"):
        server.start(timeout=120)
    server.stop()
    assert (
        "not a tar or zip archive" in (tmp_path / "cog.log").read_text()
        or "archive" in (tmp_path / "cog.log").read_text()
    )
