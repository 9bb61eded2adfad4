"""Hardening against hostile inputs and faults: pickles that would run code are refused on every
path that reads .bin/.pt/.pth files, training survives SIGTERM and resumes exactly, unwritable
outputs fail before training starts, and the context and dataset limits fail with a reason."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import train_llama_sentencepiece
from safetensors.torch import load_file

from finetune.__main__ import main as finetune_main
from finetune.cog.cogtools import data_uri
from finetune.config import GenerationSettings
from finetune.engine.requests import GenerationError, GenerationStats
from finetune.formats.archives import pack_dir
from finetune.formats.weights_sources import WeightsSourceError, materialize
from finetune.model.adapter_folder import convert_pickled_adapter
from finetune.model.loading import ModelError, check_adapter_dir
from finetune.serving.server import ModelServer
from finetune.training import cli
from finetune.training.trainer import checkpoint_root, train

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT = 300


# --- helpers -----------------------------------------------------------------------------------


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file appears only if code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> Path:
    """A file in torch's own zip format, so torch.load gets as far as the unpickler."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"base_model.model.lora_A.weight": torch.zeros(2, 2), "x": Payload(marker)}, path)
    return path


def run_module(*args: str, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# The tiny model's settings, as in tests/test_trainer.py.
TINY_FLAGS = {
    "micro_batch_size": 2,
    "batch_size": 4,
    "cutoff_len": 256,
    "val_set_size": 4,
    "learning_rate": 1e-2,
    "lora_r": 4,
    "logging_steps": 1,
}


def tiny_args(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    paths = ["--base_model", str(model_dir), "--data_path", str(data), "--output_dir", str(out)]
    return [*paths, *(x for k, v in TINY_FLAGS.items() for x in (f"--{k}", str(v))), *extra]


def stray(folder: Path) -> list[str]:
    """Temporary names the trainer and writers use; none may survive a run, failed or not."""
    return sorted(
        p.name
        for p in folder.rglob(".*")
        if ".tmp" in p.name or ".write-test" in p.name or p.name.endswith((".old", ".partial"))
    )


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A valid (untrained) PEFT adapter for the tiny model: config + safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def pickled_adapter(tmp_path, tiny_adapter, marker) -> Path:
    """adapter_config.json next to a malicious adapter_model.bin, and no safetensors."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_adapter / "adapter_config.json", folder)
    plant_pickle(folder / "adapter_model.bin", marker)
    return folder


# --- 1. no untrusted unpickling ------------------------------------------------------------------


def test_the_payload_is_live(tmp_path, marker):
    """Control: the planted file does run code when unpickled, so "no marker" below means something."""
    path = plant_pickle(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_predictor_refuses_a_pickled_adapter(tmp_path, tiny_model_dir, pickled_adapter, marker):
    with pytest.raises(ModelError, match="pickled adapter_model.bin; pickles can run code") as info:
        check_adapter_dir(pickled_adapter)
    assert "python -m finetune convert-adapter --input" in str(info.value)
    # COG_WEIGHTS (setup) path.
    with pytest.raises(ModelError, match="pickles can run code"):
        ModelServer(base_model=str(tiny_model_dir), adapter=str(pickled_adapter))
    # Per-request path, as a stranger sends it: an archive in a data URI.
    server = ModelServer(base_model=str(tiny_model_dir))
    uri = data_uri(pack_dir(pickled_adapter, tmp_path / "pickled.tar"))
    with pytest.raises(ModelError, match="pickles can run code"):
        list(server.generate("hi", lora_weights=uri))
    # ... and never a local path, which would let any caller probe the server's disk.
    with pytest.raises(WeightsSourceError, match="local paths are not accepted"):
        list(server.generate("hi", lora_weights=str(pickled_adapter)))
    settings = GenerationSettings(max_new_tokens=2, temperature=0)
    stats = GenerationStats()
    "".join(server.generate("hi", settings=settings, stats=stats))
    # Still serving: 2 tokens, or EOS before them (never EOS at any length).
    assert (stats.stop_reason, stats.output_token_count) in {("length", 2), ("eos", 0), ("eos", 1)}
    assert not marker.exists()


def test_a_refused_per_request_adapter_leaves_no_files(tmp_path, tiny_model_dir, pickled_adapter):
    # Every refused data: URI is extracted anew and never removed: a stranger can fill the disk.
    server = ModelServer(base_model=str(tiny_model_dir))
    uri = data_uri(pack_dir(pickled_adapter, tmp_path / "pickled.tar"))
    for _ in range(2):
        with pytest.raises(ModelError):
            server.generate("hi", lora_weights=uri)
    assert list(server.workdir.iterdir()) == []


def test_a_server_takes_its_adapter_folder_with_it(tmp_path, tiny_model_dir, pickled_adapter, monkeypatch):
    # Every server extracts adapters into a temporary folder of its own; before, each start left one
    # behind with every adapter it had downloaded.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with pytest.raises(ModelError, match="pickles can run code"):
        ModelServer(base_model=str(tiny_model_dir), adapter=str(pickled_adapter))
    gc.collect()
    assert list(scratch.iterdir()) == []  # a setup that failed
    code = "import sys; from finetune.serving.server import ModelServer; print(ModelServer(base_model=sys.argv[1]).workdir)"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)],
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    workdir = Path(done.stdout.strip().splitlines()[-1])
    assert workdir.parent == scratch and workdir.name.startswith("adapters-")
    assert not workdir.exists()  # a server that served until the process ended


def test_a_server_removes_the_folders_of_servers_killed_by_a_signal(tmp_path, tiny_model_dir, monkeypatch):
    # Cog servers are stopped with SIGTERM, and Python's default handler skips atexit: each such
    # server used to leave its adapter folder behind for good. Now the next server removes it.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    env = {**os.environ, "TMPDIR": str(scratch)}
    code = (
        "import os, signal, sys\n"
        "from finetune.serving.server import ModelServer\n"
        "server = ModelServer(base_model=sys.argv[1])\n"
        "(server.workdir / 'kept.txt').write_text('an extracted adapter')\n"
        "print(server.workdir, flush=True)\n"
        "if sys.argv[2] == 'kill':\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "sys.stdin.read()\n"
    )

    def start(how: str) -> tuple[subprocess.Popen, Path]:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tiny_model_dir), how],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return proc, Path(proc.stdout.readline().strip())

    alive, live_folder = start("serve")
    try:
        killed, dead_folder = start("kill")  # its start leaves the live server's folder alone
        assert killed.wait(timeout=120) == -signal.SIGTERM
        old = scratch / "adapters-of-an-earlier-version"  # which took no lock: no owner holds one
        old.mkdir()
        (old / "kept.txt").write_text("an extracted adapter")
        assert (dead_folder / "kept.txt").exists() and (live_folder / "kept.txt").exists()
        server = ModelServer(base_model=str(tiny_model_dir))
        assert not dead_folder.exists() and not old.exists()
        assert (live_folder / "kept.txt").exists()
        assert sorted(scratch.iterdir()) == sorted([live_folder, server.workdir])
        assert list(server.workdir.iterdir()) == []  # the lock is on the folder: nothing added inside
    finally:
        alive.communicate("", timeout=120)  # end of input: the server's process exits normally
    assert alive.returncode == 0 and not live_folder.exists()


def test_a_file_system_without_locks_still_gives_a_working_folder(tmp_path, monkeypatch):
    from finetune import workdirs

    def no_locks(fd: int, op: int) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(workdirs.fcntl, "flock", no_locks)

    class Owner:
        pass

    owner = Owner()
    folder = workdirs.owned_workdir(owner, "adapters-")
    assert folder.parent == tmp_path and list(folder.iterdir()) == []
    # Without locks no owner can be told dead, so the folder is never swept.
    assert workdirs.remove_orphans("adapters-") == [] and folder.exists()
    del owner
    gc.collect()
    assert not folder.exists()


def test_an_adapter_template_may_only_use_plain_fields(tmp_path):
    from finetune.data.prompts import TemplateError
    from finetune.model.adapter_folder import template_from_adapter

    # A per-request adapter's template is rendered with str.format: a width spec allocates at will
    # ("{instruction:>4000000000}" is 4 GB) and attribute access reads object internals.
    (tmp_path / "prompt_template.json").write_text(
        json.dumps(
            {"prompt_no_input": "{instruction}{instruction:>100000}", "prompt_input": "{input.__class__}"}
        )
    )
    with pytest.raises(TemplateError):
        template_from_adapter(tmp_path)


def test_a_pickle_beside_safetensors_is_ignored(tmp_path, tiny_model_dir, tiny_adapter, marker):
    folder = tmp_path / "both"
    shutil.copytree(tiny_adapter, folder)
    plant_pickle(folder / "adapter_model.bin", marker)
    server = ModelServer(base_model=str(tiny_model_dir), adapter=str(folder))  # PEFT reads the safetensors
    assert server.merged
    assert not marker.exists()


def test_convert_adapter_refuses_a_pickle_with_code(tiny_adapter, pickled_adapter, marker):
    result = run_module("-m", "finetune", "convert-adapter", "--input", str(pickled_adapter))
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "is not a plain tensor file and was not loaded" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (pickled_adapter / "adapter_model.safetensors").exists()
    assert not marker.exists()
    # Control: a plain tensor file from a trusted source converts and then passes the check.
    state = load_file(tiny_adapter / "adapter_model.safetensors")
    torch.save(state, pickled_adapter / "adapter_model.bin")
    converted = convert_pickled_adapter(pickled_adapter)
    check_adapter_dir(pickled_adapter)
    assert load_file(converted).keys() == state.keys()


def meta_layout(root: Path, marker: Path) -> Path:
    """Meta's download layout (tokenizer + checklists + params.json) around a malicious shard; the
    checklists match, as an attacker who ships the files would make them."""

    words = ["llama", "alpaca", "weights", "the", "quick", "brown", "fox", "2023"]
    model_bytes = train_llama_sentencepiece(
        [" ".join(words[(i + j) % len(words)] for j in range(8)) for i in range(200)], vocab_size=300
    )
    size_dir = root / "tiny"
    size_dir.mkdir(parents=True)
    (root / "tokenizer.model").write_bytes(model_bytes)
    plant_pickle(size_dir / "consolidated.00.pth", marker)
    (size_dir / "params.json").write_text(
        json.dumps(
            {"dim": 16, "n_layers": 1, "n_heads": 2, "multiple_of": 16, "norm_eps": 1e-5, "vocab_size": -1}
        )
    )
    for folder, names, checklist in (
        (root, ["tokenizer.model"], "tokenizer_checklist.chk"),
        (size_dir, ["consolidated.00.pth", "params.json"], "checklist.chk"),
    ):
        lines = [f"{hashlib.md5((folder / n).read_bytes()).hexdigest()}  {n}" for n in names]
        (folder / checklist).write_text("\n".join(lines) + "\n")
    return root


def test_convert_meta_refuses_a_pickle_with_code(tmp_path, marker, capsys):
    src = meta_layout(tmp_path / "meta", marker)
    # `python -m finetune convert-meta ...`, in this process (the subprocess start is tested above).
    code = finetune_main(
        [
            "convert-meta",
            "--input_dir",
            str(src),
            "--model_size",
            "tiny",
            "--output_dir",
            str(tmp_path / "hf"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "could not read" in err and "consolidated.00.pth as a PyTorch checkpoint" in err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta"]  # no output, no temporary folder


def test_resume_refuses_a_pickled_trainer_state(tiny_model_dir, tiny_data, tmp_path, marker, capsys):
    out = tmp_path / "adapter"
    # A real checkpoint (step 1 of 2) whose trainer_state.pt is then swapped for a malicious one,
    # as a checkpoint folder copied from elsewhere might be.
    train(
        cli.config_from_args(
            tiny_args(
                tiny_model_dir, tiny_data, out, "--max_steps", "2", "--save_steps", "1", "--val_set_size", "0"
            ),
            environ={},
        )
    )
    checkpoint = checkpoint_root(out) / "checkpoint-0000001"
    plant_pickle(checkpoint / "trainer_state.pt", marker)
    capsys.readouterr()
    code = cli.main(
        tiny_args(
            tiny_model_dir,
            tiny_data,
            tmp_path / "resumed",
            "--max_steps",
            "2",
            "--resume_from_checkpoint",
            str(checkpoint),
        )
    )
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "trainer_state.pt" in captured.err and "was not loaded" in captured.err
    assert "base " not in captured.out  # refused before any model loaded
    assert not (tmp_path / "resumed").exists()
    assert not marker.exists()


# --- 2. faults in training -----------------------------------------------------------------------


def test_sigterm_checkpoints_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    # dropout > 0: the resumed run only matches if the RNG state was saved and restored too.
    common = ["--max_steps", "6", "--lora_dropout", "0.1", "--seed", "7"]
    full = tmp_path / "full" / "adapter"
    train(cli.config_from_args(tiny_args(tiny_model_dir, tiny_data, full, *common), environ={}))

    out = tmp_path / "stopped" / "adapter"
    cmd = [sys.executable, "finetune.py", *tiny_args(tiny_model_dir, tiny_data, out, *common)]
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            stdout = ""
            assert proc.stdout is not None
            for line in proc.stdout:  # the step line is printed before the end-of-step flag check
                stdout += line
                if "| step 2/6 |" in line:
                    proc.send_signal(signal.SIGTERM)
                    break
            stdout += proc.stdout.read()
            code = proc.wait(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    err = stderr_path.read_text()
    assert code == 143, err[-2000:]
    assert "stopped by SIGTERM; resume with --resume_from_checkpoint latest" in err
    assert "Traceback" not in err
    assert not out.exists()
    checkpoints = sorted(p.name for p in checkpoint_root(out).iterdir())
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints
    stopped_at = int(checkpoints[0].removeprefix("checkpoint-"))
    assert 2 <= stopped_at < 6 and f"step {stopped_at + 1}/6" not in stdout
    assert stray(tmp_path / "stopped") == []

    resumed = run_module(
        "finetune.py",
        *tiny_args(tiny_model_dir, tiny_data, out, *common, "--resume_from_checkpoint", "latest"),
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at step {stopped_at}" in resumed.stdout
    a, b = load_file(full / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"stopped at step {stopped_at}; resumed adapter max |diff| {max_diff:.3g}")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    losses = [json.loads((d / "training_card.json").read_text())["history"]["steps"] for d in (full, out)]
    assert [s["loss"] for s in losses[1]] == pytest.approx([s["loss"] for s in losses[0]], rel=1e-5)
    assert stray(tmp_path) == []


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write to: read-only by mode, or (as root, who ignores modes)
    a system folder that refuses new entries even to root."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        if not os.access(candidate, os.W_OK) or not _can_create_in(candidate):
            return candidate
    pytest.skip("no folder on this machine refuses writes to this user")


def _can_create_in(folder: Path) -> bool:
    try:
        (folder / ".hardening-probe").mkdir()
    except OSError:
        return False
    (folder / ".hardening-probe").rmdir()
    return True


@pytest.mark.parametrize(
    "case", ["parent-is-a-file", "output-is-a-file", "checkpoints-is-a-file", "read-only"]
)
def test_unwritable_output_fails_before_training(tiny_model_dir, tiny_data, tmp_path, capsys, case):
    work = tmp_path / "work"
    work.mkdir()
    if case == "parent-is-a-file":
        (work / "file").write_text("mine")
        out = work / "file" / "adapter"
    elif case == "output-is-a-file":
        out = work / "adapter"
        out.write_text("mine")
    elif case == "checkpoints-is-a-file":
        out = work / "adapter"
        checkpoint_root(out).write_text("mine")
    else:
        out = unwritable_dir(tmp_path) / "sub" / "adapter"
    before = sorted(p.name for p in work.iterdir())
    code = cli.main(tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "2", "--save_steps", "1"))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("error: ") and "--output_dir" in captured.err, captured.err
    assert "step 1/" not in captured.out and "base " not in captured.out  # nothing trained or loaded
    assert sorted(p.name for p in work.iterdir()) == before and stray(work) == []
    assert all(p.read_text() == "mine" for p in work.rglob("*") if p.is_file())


def test_a_failed_save_keeps_the_previous_adapter_and_leaves_no_temp(
    tiny_model_dir, tiny_data, tmp_path, monkeypatch
):
    out = tmp_path / "adapter"
    args = tiny_args(tiny_model_dir, tiny_data, out, "--max_steps", "2", "--val_set_size", "0")
    train(cli.config_from_args(args, environ={}))
    previous = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    # The last thing written into the temporary folder; the rename into place never happens.
    monkeypatch.setattr("finetune.model.adapter_folder.plot_loss", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cli.config_from_args([*args, "--seed", "1"], environ={}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    assert stray(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "data.json"]


# --- 4. limits -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir) -> ModelServer:
    return ModelServer(base_model=str(tiny_model_dir))


def prompt_of(server: ModelServer, n_tokens: int) -> str:
    """Raw text that tokenizes to exactly n_tokens (BOS included)."""
    tok = server.tokenizer
    ids = tok("alpaca " * n_tokens, add_special_tokens=False)["input_ids"]
    special = len(tok("", add_special_tokens=True)["input_ids"])
    text = tok.decode(ids[: n_tokens - special])
    assert len(tok(text, add_special_tokens=True)["input_ids"]) == n_tokens
    return text


def test_prompt_over_the_context_fails_with_a_reason(tiny_server):
    assert tiny_server.model.config.max_position_embeddings == 512
    settings = GenerationSettings(max_new_tokens=1, temperature=0)
    with pytest.raises(GenerationError, match=r"the prompt is 600 tokens .* context is 512 tokens: shorten"):
        list(tiny_server.generate(prompt_of(tiny_server, 600), settings=settings, prompt_template="none"))


def test_prompt_plus_new_tokens_over_the_context_fails_with_a_reason(tiny_server):
    prompt = prompt_of(tiny_server, 500)
    with pytest.raises(
        GenerationError,
        match="max_new_tokens is 13, but this model's context is 512 tokens: "
        "shorten the prompt or lower max_new_tokens to 12",
    ):
        list(
            tiny_server.generate(
                prompt, settings=GenerationSettings(max_new_tokens=13), prompt_template="none"
            )
        )
    # Exactly at the limit is allowed.
    fits = GenerationSettings(max_new_tokens=12, temperature=0)
    stats = GenerationStats()
    "".join(tiny_server.generate(prompt, settings=fits, prompt_template="none", stats=stats))
    assert stats.input_token_count + fits.max_new_tokens == 512
    # All 12 tokens, or EOS before the 12th.
    assert (stats.stop_reason == "length" and stats.output_token_count == 12) or (
        stats.stop_reason == "eos" and stats.output_token_count < 12
    )


@pytest.mark.parametrize("case", ["record-chars", "records", "bytes"])
def test_dataset_caps_stop_training_with_a_reason(tiny_model_dir, tmp_path, capsys, case):
    """The default caps in dataset_file.py, met through the trainer (the /trainings path uses the same)."""
    if case == "record-chars":
        data = tmp_path / "data.json"
        data.write_text(
            json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "x" * 200_000}])
        )
        expected = "record 2: 200,001 characters, over the limit of 200,000 per record"
    elif case == "records":
        data = tmp_path / "data.jsonl"
        data.write_text('{"text": "a"}\n' * 1_000_001)
        expected = "more than 1,000,000 records, the limit"
    else:
        data = tmp_path / "data.json"
        with open(data, "wb") as f:  # sparse: the size is refused before a byte is read
            f.truncate(513 * 2**20)
        expected = "the file is 513.0 MiB, over the limit of 512.0 MiB"
    out = tmp_path / "adapter"
    code = cli.main(["--base_model", str(tiny_model_dir), "--data_path", str(data), "--output_dir", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert expected in captured.err, captured.err
    assert not out.exists() and not checkpoint_root(out).exists()


# --- 5. URLs: what tests/test_archives.py does not cover -----------------------------------------


class Redirects(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        target = {"/to-file": "file:///etc/passwd", "/loop": "/loop"}.get(self.path, "/missing")
        self.send_response(302)
        self.send_header("Location", target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def redirect_server(monkeypatch):
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirects)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("path", ["/to-file", "/loop"])
def test_redirects_cannot_leave_http_or_loop_forever(tmp_path, redirect_server, path):
    with pytest.raises(WeightsSourceError, match="could not download"):
        materialize(redirect_server + path, tmp_path / "work")
    assert [p.name for p in (tmp_path / "work").iterdir()] == []
