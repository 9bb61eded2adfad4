"""The compiled decode step (cpu_step.py, built and loaded by cpu_compile.py, SERVE_COMPILE=auto): the same greedy tokens as the eager
step alone and in padded batches, for fp32, int8 and int4 weights; adapters compiled whether merged
at setup or per request, alone or mixed in one batch; a cached file loads without compiling; a
planted package or unpacked folder is rebuilt, never loaded, and a failed rebuild means eager
decoding with a reason; stop sequences and cancel on the compiled path; the embedded model through
the real Cog server. The rest of the suite runs with SERVE_COMPILE=off (conftest) so that it compiles nothing."""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.config import GenerationSettings
from finetune.data.encoding import encode_prompt
from finetune.engine import cpu_compile, kernel, quant
from finetune.engine.requests import Request
from finetune.engine.scheduler import Engine, EngineLimits
from finetune.serving.server import ModelServer
from tests.test_decoder import padded_and_alone
from tests.test_native import planted_library, publish_bytes

GREEDY16 = GenerationSettings(max_new_tokens=16, temperature=0)
PROMPTS = [
    "What is two plus two? Think step by step.",
    "The capital of France is",
    "Alpacas live in the Andes. Give three tips for staying healthy.",
    "中国的首都是北京。",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("compiled")
    patch = pytest.MonkeyPatch()
    patch.setenv(cpu_compile.CACHE_ENV, str(folder))
    patch.setenv(cpu_compile.COMPILE_ENV, "auto")
    request.addfinalizer(patch.undo)
    return folder


class Counting:
    """The compiled runner, counting its calls (to tell which steps it ran)."""

    def __init__(self, runner) -> None:
        self.runner, self.calls = runner, 0

    def __call__(self, *args):
        self.calls += 1
        return self.runner(*args)


def tiny(tiny_model_dir, kind: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    if kind != "none":
        assert quant.quantize(model, kind) > 0
    return model, tokenizer


def run(engine: Engine, tokenizer, texts: list[str], settings=GREEDY16) -> list[list[int]]:
    requests = [engine.submit(Request(encode_prompt(tokenizer, t), settings)) for t in texts]
    for _ in range(500):
        engine.step()
        if all(r.done for r in requests):
            break
    return [list(r.generated) for r in requests]


# int4 (an option, not the default) compiles a third file: ~30 s with the test below.
@pytest.mark.parametrize("kind", ["none", "int8", "int4"])
def test_compiled_steps_give_the_eager_tokens_alone_and_in_padded_batches(cache, tiny_model_dir, kind):
    model, tokenizer = tiny(tiny_model_dir, kind)
    eager = Engine(model, tokenizer, EngineLimits())
    want = [run(eager, tokenizer, [p])[0] for p in PROMPTS]
    engine = Engine(model, tokenizer, EngineLimits())
    step = cpu_compile.load(engine.decoder(), engine.device, engine.limits.max_batch, adapters=False)
    assert step is not None and step.kind == kind and step.path.parent == cache and step.lora_runner is None
    engine.compiled = step
    step.runner = counting = Counting(step.runner)
    alone = [run(engine, tokenizer, [p])[0] for p in PROMPTS]
    assert counting.calls >= sum(len(t) for t in alone) - len(PROMPTS)  # every decode step compiled
    # Prompts of different lengths: a batch with left padding, rows joining and leaving.
    together = run(engine, tokenizer, PROMPTS)
    assert together == alone
    if kind == "int4" and quant.int8_kernel() != "finetune":
        # torch's int4 kernel: bf16 activations through fused loops round differently from the eager
        # ops (measured 1.0 here). Ours is the same op compiled or not.
        agree = [
            sum(a == b for a, b in zip(x, y, strict=True)) / len(x) for x, y in zip(alone, want, strict=True)
        ]
        assert sum(agree) / len(agree) >= 0.75, agree
    else:
        assert alone == want


# int8 and int4, as test_decoder's: fp32's GEMM sums a row differently at another row count.
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compiled_rows_decode_to_the_same_bits_in_a_padded_batch_as_alone(cache, tiny_model_dir, kind):
    model, tokenizer = tiny(tiny_model_dir, kind)
    engine = Engine(model, tokenizer, EngineLimits())
    decoder = engine.decoder()
    step = cpu_compile.load(decoder, engine.device, engine.limits.max_batch, adapters=False)
    assert step is not None

    def forward(ids, positions, kv, mask):
        logits = step.forward(decoder, ids, positions, kv, mask)
        assert logits is not None  # the compiled step ran
        return logits

    rows = [encode_prompt(tokenizer, p) for p in PROMPTS]
    batched, alone = padded_and_alone(forward, decoder, rows, [7, 11, 13, 17])
    for i in range(len(rows)):
        assert torch.equal(batched[i], alone[i]), i


def test_a_cached_file_loads_at_once_and_a_planted_one_is_not_loaded(
    cache, tiny_model_dir, capfd, tmp_path, monkeypatch
):
    model, tokenizer = tiny(tiny_model_dir, "none")
    engine = Engine(model, tokenizer, EngineLimits())
    first = cpu_compile.load(engine.decoder(), engine.device, 8)
    capfd.readouterr()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # where torch's loader would extract the package
    started = time.perf_counter()
    again = cpu_compile.load(engine.decoder(), engine.device, 8)
    assert again is not None and again.path == first.path and time.perf_counter() - started < 5
    assert "building" not in capfd.readouterr().err
    assert list(scratch.iterdir()) == []  # loaded from the cache's unpacked copy: nothing left behind
    # A real package of another graph (the LoRA file, or another test's) planted in place of this
    # one: not loaded but rebuilt, and a rebuild that fails means eager decoding, with the reason.
    other = next(p for p in sorted(cache.glob("decode-*.pt2")) if p != first.path)
    good = first.path.read_bytes()
    loads = []
    monkeypatch.setattr(cpu_compile, "_load_runner", lambda path: loads.append(path) or load_runner(path))
    try:
        first.path.write_bytes(other.read_bytes())
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_compile, "_compile", fail)
            assert cpu_compile.load(engine.decoder(), engine.device, 8, adapters=False) is None
        err = capfd.readouterr().err
        assert f"compile cache: {first.path} is not what this user built there" in err
        assert "decoding eagerly: compiling failed (RuntimeError: no C++ compiler here)" in err
        assert loads == []
    finally:
        first.path.write_bytes(good)
    # The recorded bytes back: they load again, at once.
    assert cpu_compile.load(engine.decoder(), engine.device, 8, adapters=False) is not None
    assert loads == [first.path] and "building" not in capfd.readouterr().err
    assert cpu_compile.load(engine.decoder(), engine.device, 8, mode="off") is None
    # A server without room for per-request adapters never has an unmerged one: no second file.
    fixed = ModelServer(base_model=str(tiny_model_dir), dtype="float32", cache_size=0)
    assert fixed.engine.compiled is not None and fixed.engine.compiled.lora_runner is None
    bf16 = Engine(model.to(torch.bfloat16), tokenizer, EngineLimits())
    assert cpu_compile.load(bf16.decoder(), bf16.device, 8) is None
    assert "decoding eagerly: the compiled step covers fp32 and low-bit weights" in capfd.readouterr().err
    with pytest.raises(ValueError, match="SERVE_COMPILE='yes': use one of auto, off"):
        cpu_compile.load(engine.decoder(), engine.device, 8, mode="yes")


load_runner = cpu_compile._load_runner


def fail(*args):
    raise RuntimeError("no C++ compiler here")


@pytest.fixture(scope="module")
def genuine(cache, tiny_model_dir):
    """The tiny fp32 model's engine and its plain compiled package in the module's cache (compiled
    once for the module), with the package's bytes and its unpacked folder."""
    model, tokenizer = tiny(tiny_model_dir, "none")
    engine = Engine(model, tokenizer, EngineLimits())
    step = cpu_compile.load(engine.decoder(), engine.device, 8, adapters=False)
    assert step is not None
    data = step.path.read_bytes()
    folder = step.path.with_name(f"{step.path.stem}.{hashlib.sha256(data).hexdigest()[:16]}")
    assert kernel.verified(folder) is not None
    return SimpleNamespace(engine=engine, tokenizer=tokenizer, path=step.path, data=data, folder=folder)


def _swap_library(package: bytes, library: bytes) -> bytes:
    """The package with its compiled library replaced: a real package that runs other code."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(package)) as source, zipfile.ZipFile(out, "w") as planted:
        names = [i.filename for i in source.infolist() if i.filename.endswith(".so")]
        assert len(names) == 1, names
        for info in source.infolist():
            planted.writestr(info, library if info.filename in names else source.read(info))
    return out.getvalue()


def _compile_again(genuine, rebuilt: list[Path]):
    """cpu_compile._compile without inductor's tens of seconds: the genuine package's bytes, published
    as _compile publishes what it builds."""

    def compile_(decoder, signature, step, path, lora):
        rebuilt.append(path)
        publish_bytes(genuine.data, path)

    return compile_


def test_a_planted_package_is_rebuilt_not_loaded(genuine, tmp_path, monkeypatch, capfd):
    """The package at the step's name is the genuine one with its library swapped for a real shared
    object that leaves a marker when loaded, in place of the bytes recorded there: the step is
    rebuilt and loaded from the rebuilt bytes, the planted library never runs, and the step decodes
    as the eager one does."""
    marker = tmp_path / "loaded-the-planted-library"
    library = planted_library(tmp_path, marker).read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv(cpu_compile.CACHE_ENV, str(cache))
    path = cache / genuine.path.name
    publish_bytes(genuine.data, path)
    path.write_bytes(_swap_library(genuine.data, library))
    rebuilt: list[Path] = []
    monkeypatch.setattr(cpu_compile, "_compile", _compile_again(genuine, rebuilt))
    engine = genuine.engine
    capfd.readouterr()
    step = cpu_compile.load(engine.decoder(), engine.device, 8, adapters=False)
    err = capfd.readouterr().err
    assert not marker.exists()
    assert step is not None and step.path == path and rebuilt == [path], err
    assert f"compile cache: {path} is not what this user built there" in err and "building" in err
    assert path.read_bytes() == genuine.data
    assert kernel.verified(path) == hashlib.sha256(genuine.data).hexdigest()
    eager = Engine(engine.model, genuine.tokenizer, EngineLimits())
    fast = Engine(engine.model, genuine.tokenizer, EngineLimits())
    fast.compiled = step
    assert run(fast, genuine.tokenizer, PROMPTS[:2]) == run(eager, genuine.tokenizer, PROMPTS[:2])


@pytest.mark.parametrize("where", ["private", "group-writable"])
def test_a_planted_unpacked_folder_is_never_loaded(genuine, tmp_path, monkeypatch, capfd, where):
    """Beside the genuine, recorded package, its unpacked folder with one file changed: the library
    swapped for one that leaves a marker when loaded. In a private cache, recorded as another
    build's folder: it is unpacked anew from the package. In a group-writable cache, recorded as
    its own (whoever can write the folder can write the manifest): the cache is not used at all,
    and the step is built in a private folder of the process's own. Either way the planted library
    never runs and the step works (checked against the eager one at load)."""
    marker = tmp_path / "loaded-the-planted-library"
    library = planted_library(tmp_path, marker).read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv(cpu_compile.CACHE_ENV, str(cache))
    publish_bytes(genuine.data, cache / genuine.path.name)
    folder = cache / genuine.folder.name

    def plant(unpacked: Path) -> None:
        (so,) = unpacked.rglob("*.so")
        so.write_bytes(library)

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        shutil.copytree(genuine.folder, Path(tmp) / "copy")
        if where == "group-writable":  # planted, then recorded as its own
            plant(Path(tmp) / "copy")
        kernel.publish(Path(tmp) / "copy", folder)
    if where == "private":  # recorded, then one file's bytes changed
        plant(folder)
        assert kernel.verified(folder) is None and kernel.digest(folder) is not None
    else:
        assert kernel.verified(folder) is not None
        cache.chmod(0o770)
    rebuilt: list[Path] = []
    monkeypatch.setattr(cpu_compile, "_compile", _compile_again(genuine, rebuilt))
    monkeypatch.setattr(kernel, "_fallbacks", {})
    engine = genuine.engine
    capfd.readouterr()
    step = cpu_compile.load(engine.decoder(), engine.device, 8, adapters=False)
    err = capfd.readouterr().err
    assert not marker.exists()
    assert step is not None, err
    (so,) = folder.rglob("*.so")
    (good,) = genuine.folder.rglob("*.so")
    if where == "private":  # the package was fine: unpacked anew, nothing compiled
        assert step.path.parent == cache and rebuilt == []
        assert f"compile cache: {folder} is not what this user built there" in err
        assert so.read_bytes() == good.read_bytes() and kernel.verified(folder) == kernel.digest(
            genuine.folder
        )
    else:  # nothing in the folder used, nothing written to it
        assert step.path.parent != cache and [p.parent for p in rebuilt] == [step.path.parent]
        assert f"compile cache: not using {cache}" in err
        assert so.read_bytes() == library


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_adapters_compiled_merged_per_request_and_mixed_give_the_eager_text(
    cache, tiny_model_dir, tmp_path, monkeypatch
):
    from finetune.model.loading import ModelError
    from tests.test_engine import make_adapter, serve, together

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    setup = str(make_adapter(tiny_model_dir, tmp_path / "setup", seed=1))
    # Other ranks and targets than the setup adapter's (rank 4 on q, v, down): the stacks pad them.
    wide = str(make_adapter(tiny_model_dir, tmp_path / "wide", seed=2, r=16, targets=ALL_LINEAR))
    mlp = str(make_adapter(tiny_model_dir, tmp_path / "mlp", seed=3, r=8, targets=ALL_LINEAR[3:6]))
    asks = [(PROMPTS[2], None), (PROMPTS[1], wide), (PROMPTS[2], mlp), (PROMPTS[3], wide), (PROMPTS[1], None)]
    for adapter in (setup, None):  # a trained version (setup adapter merged when alone), a bare base
        server = ModelServer(base_model=str(tiny_model_dir), adapter=adapter, dtype="float32")
        step = server.engine.compiled
        assert step is not None and step.lora_runner is not None and server.merged == (adapter is not None)
        plain, lora = step.runner, step.lora_runner = Counting(step.runner), Counting(step.lora_runner)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv(cpu_compile.COMPILE_ENV, "off")
            eager = ModelServer(base_model=str(tiny_model_dir), adapter=adapter, dtype="float32")
        assert eager.engine.compiled is None
        want = [serve(eager, p, lora) for p, lora in asks]
        assert all(want) and want[1] != want[4]  # a per-request adapter changes the text
        for (prompt, source), text in zip(asks, want, strict=True):
            calls = plain.calls, lora.calls
            assert serve(server, prompt, source) == text, (adapter, source)
            # Merged or no adapter: the plain file; a per-request adapter: the LoRA file.
            assert (plain.calls > calls[0], lora.calls > calls[1]) == (source is None, source is not None)
        # All five in one batch: base or merged-adapter rows beside rows on two per-request adapters.
        calls = lora.calls
        assert together(server, asks) == want
        assert lora.calls > calls
    # PEFT cannot batch DoRA with other adapters: refused with a reason, and the server goes on.
    dora = str(make_adapter(tiny_model_dir, tmp_path / "dora", seed=4, dora=True))
    with pytest.raises(ModelError, match="DoRA adapters .* cannot share a batch"):
        serve(server, PROMPTS[1], dora)
    assert together(server, asks) == want


def test_bad_compile_setting_stops_setup_with_a_reason(tiny_model_dir, monkeypatch):
    from finetune.model.loading import ModelError

    monkeypatch.setenv(cpu_compile.COMPILE_ENV, "always")
    with pytest.raises(ModelError, match="SERVE_COMPILE='always': use one of auto, off"):
        ModelServer(base_model=str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def embedded(cache, embedded_model_dir):
    """The default on a CPU: int8 weights, the decode step compiled; the tests' adapters are local
    folders, which the server's settings allow from the start."""
    from dataclasses import replace

    from finetune.settings import ServeSettings

    settings = replace(ServeSettings.from_env(), allow_local_lora_weights=True)
    return ModelServer(
        base_model=str(embedded_model_dir), dtype="float32", quantization="auto", settings=settings
    )


def greedy_tokens(server: ModelServer, prompt: str) -> tuple[list[int], list[int]]:
    """The prompt's ids and 16 greedy tokens after it."""
    ids = encode_prompt(
        server.tokenizer, server.resolve_template("auto", None).render(prompt, "", server.tokenizer)
    )
    request = Request(ids, GREEDY16)
    server.engine.submit(request)
    server.compute.wake()
    list(server._chunks(request))
    return ids, list(request.generated)


def parted_at_a_tie(server: ModelServer, ids: list[int], want: list[int], got: list[int]) -> bool:
    """`got` is `want`, or leaves it where `server`'s logits (teacher-forced on `want`) put the
    runner-up within 0.1 of the top token."""
    i = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None)
    if i is None:
        return len(got) == len(want)
    sequence = torch.tensor([ids + want[: i + 1]])

    @torch.no_grad()
    def margin() -> float:
        with quant.prefill():
            top = server.model(sequence).logits[0, -2].topk(2).values
        return float(top[0] - top[1])

    return server.compute.call(margin) < 0.1


def test_embedded_model_compiled_gives_the_eager_text_and_stops_and_cancels(embedded, embedded_model_dir):
    assert embedded.engine.compiled is not None and embedded.quantization == "int8"
    prompts = [
        "Tell me something about alpacas.",
        "What is the capital of France?",
        "请用中文介绍一下你自己。",
    ]
    got = ["".join(embedded.generate(p, settings=GREEDY16)) for p in prompts]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cpu_compile.COMPILE_ENV, "off")
        eager = ModelServer(base_model=str(embedded_model_dir), dtype="float32", quantization="auto")
    if quant.rounds_activations("int8"):
        # int8 activations (off AVX-512): a last-bit difference of the fused step's x can move a
        # rounding step, so the texts may part, but only where eager's top two logits nearly tie.
        for p in prompts:
            ids, want = greedy_tokens(eager, p)
            assert parted_at_a_tie(eager, ids, want, greedy_tokens(embedded, p)[1]), p
    else:
        assert got == ["".join(eager.generate(p, settings=GREEDY16)) for p in prompts]
    stop = got[1].split()[2]
    stopped = "".join(
        embedded.generate(
            prompts[1], settings=GenerationSettings(max_new_tokens=16, temperature=0, stop_sequences=[stop])
        )
    )
    assert stopped == got[1][: got[1].index(stop)]
    chunks = embedded.generate(prompts[0], settings=GenerationSettings(max_new_tokens=200, temperature=0))
    next(chunks)
    chunks.close()  # what a cancelled prediction does
    assert "".join(embedded.generate(prompts[1], settings=GREEDY16)) == got[1]
    assert not embedded.engine.busy


def test_embedded_model_per_request_adapters_compiled_give_the_eager_text(
    embedded, embedded_model_dir, persona_adapters, monkeypatch
):
    """The default (int8, compiled) with trained adapters per request: each request's text is the
    eager server's, alone and in one batch with the bare base."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    step = embedded.engine.compiled
    assert step.lora_runner is not None
    lora = step.lora_runner = Counting(step.lora_runner)
    alpie, bolt = str(persona_adapters["alpie"]), str(persona_adapters["bolt"])
    asks = [("What is your name?", alpie), ("What is your name?", bolt), ("What is your name?", None)]
    asks += [("你叫什么名字？", alpie), ("Who made you?", bolt)]
    settings = GenerationSettings(max_new_tokens=24, temperature=0)

    def ask(server: ModelServer, question: str, source: str | None) -> str:
        return "".join(server.generate(question, settings=settings, lora_weights=source))

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(cpu_compile.COMPILE_ENV, "off")
        eager = ModelServer(base_model=str(embedded_model_dir), dtype="float32", quantization="auto")
    want = [ask(eager, *a) for a in asks]
    assert "Alpie" in want[0] and "Bolt" in want[1] and "Alpie" not in want[2] and "Bolt" not in want[2]
    solo = [ask(embedded, *a) for a in asks]
    if quant.rounds_activations("int8"):
        # int8 activations: the fused step's last bits can break a near tie the other way (the
        # test above); each adapter still speaks as itself, and a batch gives the solo texts.
        assert "Alpie" in solo[0] and "Bolt" in solo[1] and "Alpie" not in solo[2] and "Bolt" not in solo[2]
        want = solo
    assert solo == want
    assert lora.calls > 0
    with ThreadPoolExecutor(len(asks)) as pool:
        assert list(pool.map(lambda a: ask(embedded, *a), asks)) == want
    # A cancelled request on an adapter, mid-decode in the LoRA file: the others keep their texts.
    calls = lora.calls
    chunks = embedded.generate(
        asks[0][0], settings=GenerationSettings(max_new_tokens=200, temperature=0), lora_weights=alpie
    )
    next(chunks)
    next(chunks)
    assert lora.calls > calls  # its decode steps ran in the LoRA file
    chunks.close()  # what a cancelled prediction does
    assert [ask(embedded, *a) for a in asks[:2]] == want[:2]
    assert not embedded.engine.busy


@pytest.mark.integration
def test_real_server_decodes_compiled(embedded, cache, tmp_path_factory):
    """The real Cog server with the defaults (int8, compiled) and the file the fixture compiled: it
    loads it (no second compile) and answers as the in-process server does, for several clients,
    over SSE, and beside a cancelled request."""
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from tests.test_predict_service import answer, sse_events, start

    server = start(
        tmp_path_factory,
        "compiled",
        env={cpu_compile.COMPILE_ENV: "auto", cpu_compile.CACHE_ENV: str(cache), quant.QUANT_ENV: "auto"},
    )
    try:
        log = server.log_path.read_text()
        # No second compile of the step (the int8 kernel is built here when this process loaded it
        # from elsewhere first, as when tests/test_native.py runs before this file).
        assert (
            "compile: decode step ready" in log and "compile: building" not in log and "int8 decoding" in log
        )
        prompts = [
            "Tell me something about alpacas.",
            "What is the capital of France?",
            "Write a haiku about rain.",
        ]
        want = [
            "".join(embedded.generate(p, settings=GenerationSettings(max_new_tokens=24, temperature=0)))
            for p in prompts
        ]
        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda p: answer(server, p), prompts)) == want
        # SSE: the streamed chunks are the answer; a cancelled long request leaves another its text.
        events = sse_events(server, {"prompt": prompts[0], "max_new_tokens": 24, "temperature": 0})
        assert "".join(d["chunk"] for n, d in events if n == "output") == want[0]
        assert dict(events)["completed"]["status"] == "succeeded"
        pid = f"cancel-{uuid.uuid4().hex[:8]}"
        body = {
            "input": {
                "prompt": "Write a very long story about a dragon.",
                "max_new_tokens": 200,
                "temperature": 0,
            }
        }
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(requests.put, f"{server.url}/predictions/{pid}", json=body, timeout=300)
            time.sleep(1.0)
            assert requests.post(f"{server.url}/predictions/{pid}/cancel", timeout=30).status_code == 200
            assert answer(server, prompts[1]) == want[1]
            assert long.result().json()["status"] == "canceled"
    finally:
        server.stop()
