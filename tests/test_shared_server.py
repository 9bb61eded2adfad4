"""A server strangers share (issue: no request may crash, wedge, slow or corrupt the others), in
process on the tiny model: adapters outside the served whitelist are refused before PEFT sees them
and leave the base weights bit-identical; templates cannot amplify a prompt; one request's failure
(accepting it, sampling it, its forward pass, its cleanup) is its own; the queue and the adapters
in use are bounded; a waiter for another request's download keeps its own fate."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from finetune.config import ConfigError, GenerationSettings
from finetune.model.loading import ModelError
from tests.test_engine import GREEDY, PROMPTS, make_adapter, outcomes_together, serve


@pytest.fixture(scope="module")
def good(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("good") / "a", seed=5)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import os

    from finetune.serving.server import ModelServer

    os.environ["ALLOW_LOCAL_LORA_WEIGHTS"] = "1"
    try:
        return ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    finally:
        del os.environ["ALLOW_LOCAL_LORA_WEIGHTS"]


@pytest.fixture
def local_lora(monkeypatch):
    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")


def base_digest(server) -> str:
    """A hash of every base (non-LoRA) tensor of the served model."""

    def digest():
        h = hashlib.sha256()
        for name, t in sorted(server.model.state_dict().items()):
            if "lora_" not in name:
                h.update(name.encode())
                h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    return server.compute.call(digest)


def variant(good: Path, folder: Path, **changes) -> Path:
    out = shutil.copytree(good, folder)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


HOSTILE_CONFIGS = {
    "huge rank": ({"r": 1_000_000}, "r = 1000000: use a whole number from 1 to 256"),
    "regex targets": ({"target_modules": "(.|.)*!"}, "target_modules must be a list of module names"),
    "unknown target": ({"target_modules": ["q_proj", "nope"]}, r"target_modules \['nope'\] are not linear"),
    "pissa": ({"init_lora_weights": "pissa"}, "init_lora_weights = 'pissa'"),
    "olora": ({"init_lora_weights": "olora"}, "init_lora_weights = 'olora'"),
    "not lora": ({"peft_type": "IA3"}, "only LORA adapters are served"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "bias": ({"bias": "all"}, "bias"),
    "layers pattern": ({"layers_to_transform": [0], "layers_pattern": "layers"}, "layers_to_transform"),
    "rank pattern": ({"rank_pattern": {".*": 1000}}, "rank_pattern"),
    "dora": ({"use_dora": True}, "DoRA adapters .* cannot share a batch"),
    "layer replication": ({"layer_replication": [[0, 2]]}, "layer_replication"),
    "alpha": ({"lora_alpha": 1e300}, "lora_alpha"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_an_adapter_outside_the_whitelist_is_refused_and_changes_nothing(
    server, good, tmp_path, local_lora, case
):
    from peft import PeftModel

    changes, message = HOSTILE_CONFIGS[case]
    before = base_digest(server)
    was_peft = isinstance(server.model, PeftModel)
    reference = serve(server, PROMPTS[1])
    bad = variant(good, tmp_path / "bad", **changes)
    started = time.monotonic()
    with pytest.raises(ModelError, match=message):
        serve(server, PROMPTS[1], str(bad))
    assert time.monotonic() - started < 5  # refused from its files, not after PEFT built it
    assert base_digest(server) == before
    assert isinstance(server.model, PeftModel) == was_peft  # a refused adapter never becomes the model
    assert not any(server.workdir.iterdir())
    assert serve(server, PROMPTS[1]) == reference
    assert serve(server, PROMPTS[1], str(good)) != reference  # the good one still loads


def test_a_refused_first_adapter_leaves_the_base_unwrapped(tiny_model_dir, good, tmp_path, local_lora):
    from peft import PeftModel

    from finetune.serving.server import ModelServer

    fresh = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    before = base_digest(fresh)
    with pytest.raises(ModelError, match="only LORA"):
        serve(fresh, PROMPTS[0], str(variant(good, tmp_path / "ia3", peft_type="IA3")))
    assert not isinstance(fresh.model, PeftModel)
    assert base_digest(fresh) == before


def _rewrite_tensors(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def test_safetensors_must_hold_exactly_the_configured_tensors(server, good, tmp_path, local_lora):
    before = base_digest(server)
    tensors = _tensors(good)
    name = next(iter(tensors))
    # A base weight smuggled beside the LoRA tensors would be loaded over the shared base.
    planted = shutil.copytree(good, tmp_path / "planted")
    q = server.compute.call(lambda: server.model.get_input_embeddings().weight.detach().clone())
    _rewrite_tensors(planted, {**tensors, "base_model.model.model.embed_tokens.weight": torch.zeros_like(q)})
    wrong_shape = shutil.copytree(good, tmp_path / "shape")
    _rewrite_tensors(wrong_shape, {**tensors, name: torch.zeros(9, 9)})
    missing = shutil.copytree(good, tmp_path / "missing")
    _rewrite_tensors(missing, {k: v for k, v in tensors.items() if k != name})
    ints = shutil.copytree(good, tmp_path / "ints")
    _rewrite_tensors(ints, {**tensors, name: tensors[name].to(torch.int32)})
    huge_header = shutil.copytree(good, tmp_path / "header")
    (huge_header / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    for folder, message in [
        (planted, "unexpected tensors"),
        (wrong_shape, "must be a float tensor of shape"),
        (missing, "missing"),
        (ints, "must be a float tensor"),
        (huge_header, "no valid header"),
    ]:
        with pytest.raises(ModelError, match=message):
            serve(server, PROMPTS[1], str(folder))
    assert base_digest(server) == before


@pytest.mark.parametrize("name", ["adapter_config.json", "training_card.json", "prompt_template.json"])
def test_every_json_file_of_an_adapter_is_read_under_a_byte_cap(server, good, tmp_path, local_lora, name):
    folder = shutil.copytree(good, tmp_path / "big")
    path = folder / name
    body = path.read_text() if path.exists() else "{}"
    path.write_text(body[:-1] + " " * (1 << 20) + "}")  # valid JSON, just over 1 MB
    with pytest.raises(ModelError, match=f"{name} is over 1024 KB"):
        serve(server, PROMPTS[1], str(folder))


def test_a_template_cannot_amplify_a_prompt(server, good, tmp_path, local_lora):
    from finetune.data.prompts import TemplateError, template_from_dict

    with pytest.raises(TemplateError, match="more than 4 fields"):
        template_from_dict({"prompt_no_input": "{instruction}" * 1000, "prompt_input": "{instruction}"}, "x")
    with pytest.raises(TemplateError, match="over 16384 characters"):
        template_from_dict(
            {"prompt_no_input": "{instruction}" + "x" * 20_000, "prompt_input": "{instruction}"}, "x"
        )
    # Four fields are allowed, and the rendered text is checked before anything tokenizes it.
    folder = shutil.copytree(good, tmp_path / "four")
    four = "{instruction}" * 4
    (folder / "prompt_template.json").write_text(json.dumps({"prompt_no_input": four, "prompt_input": four}))
    calls = []
    tokenizer = server.tokenizer
    original = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text) if isinstance(text, str) else 0)
        return original(self, text, *args, **kwargs)

    long_prompt = "word " * (server.max_prompt_chars // 20 + 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(tokenizer), "__call__", counting)
        with pytest.raises(Exception, match="more than this model's context could hold"):
            "".join(server.generate(long_prompt, lora_weights=str(folder), settings=GREEDY))
    assert not [n for n in calls if n > server.max_prompt_chars]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seed": 2**64}, "seed = 18446744073709551616"),
        ({"seed": -1}, "seed = -1"),
        ({"stop_sequences": ["x"] * 17}, "at most 16 strings"),
        ({"stop_sequences": ["x" * 257]}, "of at most 256 characters"),
    ],
)
def test_generation_settings_are_bounded(changes, message):
    with pytest.raises(ConfigError, match=message):
        GenerationSettings(**changes)


def test_any_error_accepting_a_request_fails_it_alone(server, monkeypatch):
    import finetune.engine.scheduler as engine_module

    solo = [serve(server, p) for p in PROMPTS[:3]]
    original = engine_module.logits_processors

    def flaky(settings):
        if settings.top_k == 7:
            raise OverflowError("a crafted setting")
        return original(settings)

    monkeypatch.setattr(engine_module, "logits_processors", flaky)
    bad = GenerationSettings(max_new_tokens=16, temperature=0.5, top_k=7)
    with pytest.raises(OverflowError, match="a crafted setting"):
        "".join(server.generate(PROMPTS[0], settings=bad, prompt_template="none"))
    assert [serve(server, p) for p in PROMPTS[:3]] == solo
    assert not server.engine.busy


def nan_adapter(model_dir: Path, folder: Path) -> Path:
    make_adapter(model_dir, folder, seed=9)
    tensors = _tensors(folder)
    _rewrite_tensors(
        folder, {k: torch.full_like(v, float("nan")) if "lora_B" in k else v for k, v in tensors.items()}
    )
    return folder


def test_one_rows_sampling_failure_fails_that_row_only(server, tiny_model_dir, good, tmp_path, local_lora):
    nan = str(nan_adapter(tiny_model_dir, tmp_path / "nan"))
    asks = [(PROMPTS[0], None), (PROMPTS[1], str(good)), (PROMPTS[2], None)]
    solo = [serve(server, p, lora) for p, lora in asks]
    sampled = GenerationSettings(max_new_tokens=16, temperature=0.7, seed=1)
    out: dict[str, object] = {}

    def hostile() -> None:
        try:
            out["nan"] = "".join(
                server.generate(PROMPTS[3], settings=sampled, prompt_template="none", lora_weights=nan)
            )
        except Exception as exc:
            out["nan"] = exc

    t = threading.Thread(target=hostile)
    t.start()
    results = outcomes_together(server, asks)
    t.join(60)
    assert results == solo
    assert isinstance(out["nan"], Exception)
    assert "sampling failed" in str(out["nan"]) or "probability" in str(out["nan"])


def test_one_rows_forward_failure_fails_that_row_only(server, good, local_lora, monkeypatch):
    from finetune.serving.adapter_cache import adapter_key, normalise_source

    bad = adapter_key(normalise_source(str(good)))
    asks = [(PROMPTS[0], None), (PROMPTS[1], str(good)), (PROMPTS[2], None), (PROMPTS[4], None)]
    solo = [serve(server, p) for p, _ in asks[::2]] + [serve(server, PROMPTS[4])]
    engine = server.engine
    original = engine._forward

    def failing(adapters, *args, **kwargs):
        if bad in adapters and args[0].shape[1] == 1:  # decode steps with the bad adapter's row
            raise RuntimeError("this adapter's forward failed")
        return original(adapters, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", failing)
    outcomes = outcomes_together(server, asks)
    assert isinstance(outcomes[1], Exception) and "forward failed" in str(outcomes[1])
    assert [outcomes[0], outcomes[2], outcomes[3]] == solo
    monkeypatch.undo()
    assert not engine.busy


def test_a_failing_cleanup_does_not_stop_the_engine(server):
    from finetune.engine.requests import Request

    solo = serve(server, PROMPTS[1])
    ids = server.tokenizer(PROMPTS[0])["input_ids"]

    def broken(_):
        raise RuntimeError("cleanup failed")

    request = Request(ids, GREEDY, on_finish=broken)
    server.engine.submit(request)
    server.compute.wake()
    deadline = time.monotonic() + 30
    while not request.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.done and server.compute.alive()
    assert serve(server, PROMPTS[1]) == solo


def test_the_waiting_queue_is_bounded(tiny_model_dir):
    from finetune.engine.scheduler import EngineLimits
    from finetune.serving.server import ModelServer

    small = ModelServer(
        base_model=str(tiny_model_dir),
        dtype="float32",
        limits=EngineLimits(max_batch=1, max_waiting=2, prefix_tokens=0),
    )
    long = GenerationSettings(max_new_tokens=100, temperature=0)
    # Hold the compute thread so that all four arrive in one step: two wait (one of them is admitted at
    # once), the other two are refused.
    busy = threading.Thread(target=lambda: small.compute.call(time.sleep, 0.5))
    busy.start()
    streams = [small.generate(PROMPTS[i], settings=long, prompt_template="none") for i in range(4)]
    busy.join()
    outcomes: list[object] = []
    for s in streams:
        try:
            outcomes.append("".join(s))
        except Exception as exc:
            outcomes.append(exc)
    assert [isinstance(o, Exception) for o in outcomes] == [False, False, True, True]
    assert "2 requests are already waiting to start" in str(outcomes[3])
    assert "".join(small.generate(PROMPTS[0], settings=long, prompt_template="none")) == outcomes[0]


def test_the_adapters_in_use_are_bounded(tiny_model_dir, good, tmp_path, local_lora, monkeypatch):
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("MAX_ADAPTERS_IN_USE", "1")
    small = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=11)
    hold = threading.Event()
    long = GenerationSettings(max_new_tokens=400, temperature=0)
    first = small.generate(
        PROMPTS[2], settings=long, prompt_template="none", lora_weights=str(good), cancel=hold
    )
    with pytest.raises(Exception, match="MAX_ADAPTERS_IN_USE=1"):
        serve(small, PROMPTS[1], str(other))
    hold.set()
    "".join(first)
    assert serve(small, PROMPTS[1], str(other))  # free again once the first request ended


def test_adapter_keys_are_full_digests_of_the_normalised_source(tmp_path):
    from finetune.serving.adapter_cache import adapter_key, normalise_source

    assert len(adapter_key("x")) == 1 + 64
    assert normalise_source(" HTTPS://Example.COM/a/B.tar?x=Y ") == "https://example.com/a/B.tar?x=Y"
    assert normalise_source(str(tmp_path / "a" / ".." / "b")) == str((tmp_path / "b").resolve())
    assert adapter_key(normalise_source("https://h/a")) != adapter_key(normalise_source("https://h/A"))


def test_a_waiter_survives_the_first_clients_cancel_and_can_cancel_itself(server, good, monkeypatch):
    """Two requests for one slow adapter: the first is cancelled while downloading; the second, which
    waited for it, loads the adapter itself. A third waiter cancels its own wait."""
    from finetune.formats.weights_sources import DownloadStopped
    from finetune.serving import adapter_cache

    source = "https://adapters.invalid/slow.tar"
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_materialize(src, workdir, limits, allow_local=False, cancel=None):
        calls.append(src)
        started.set()
        while not release.is_set():
            if cancel is not None and cancel.is_set():
                raise DownloadStopped("stopped")
            time.sleep(0.02)
        dest = workdir / f"copy{len(calls)}"
        shutil.copytree(good, dest)
        return dest

    monkeypatch.setattr(adapter_cache, "materialize", slow_materialize)
    first_cancel, third_cancel = threading.Event(), threading.Event()
    out: dict[str, object] = {}

    def ask(name: str, cancel: threading.Event | None) -> None:
        try:
            out[name] = "".join(
                server.generate(
                    PROMPTS[1], settings=GREEDY, prompt_template="none", lora_weights=source, cancel=cancel
                )
            )
        except BaseException as exc:
            out[name] = exc

    t1 = threading.Thread(target=ask, args=("first", first_cancel))
    t1.start()
    assert started.wait(10)
    t2 = threading.Thread(target=ask, args=("second", None))
    t3 = threading.Thread(target=ask, args=("third", third_cancel))
    t2.start()
    t3.start()
    time.sleep(0.3)
    third_cancel.set()
    t3.join(5)
    assert not t3.is_alive() and isinstance(out["third"], DownloadStopped)
    first_cancel.set()
    t1.join(5)
    assert isinstance(out["first"], DownloadStopped)
    time.sleep(0.3)
    release.set()
    t2.join(30)
    assert isinstance(out["second"], str) and out["second"] == serve(server, PROMPTS[1], source)
    assert len(calls) == 2  # the waiter's own load


def test_the_compute_thread_survives_a_failing_step_and_reports_a_stall(monkeypatch):
    from finetune.serving.compute_thread import ComputeThread

    compute = ComputeThread()
    failures = []

    def bad_step() -> bool:
        failures.append(1)
        raise RuntimeError("a bug in a step")

    compute.add_loop(bad_step)
    compute.wake()
    assert compute.call(lambda: 41 + 1) == 42
    assert failures and compute.alive()
    seen = []
    t = threading.Thread(target=lambda: compute.call(time.sleep, 0.6))
    t.start()
    time.sleep(0.3)
    seen.append(compute.stalled_for())
    t.join()
    assert 0.2 < seen[0] < 0.6 and compute.stalled_for() == 0.0


def test_a_wedged_server_reports_why(server, monkeypatch):
    from dataclasses import replace

    assert server.health_problem() is None
    monkeypatch.setattr(server, "settings", replace(server.settings, stall_s=0.2))
    t = threading.Thread(target=lambda: server.compute.call(time.sleep, 0.6))
    t.start()
    time.sleep(0.4)
    problem = server.health_problem()
    t.join()
    assert problem and "SERVE_STALL_S=0.2" in problem
    assert server.health_problem() is None
