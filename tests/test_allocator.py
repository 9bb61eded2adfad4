"""jemalloc for training processes (finetune/training/allocator.py): the environment it builds, a real
restart of a Python process with a preloaded library (a stand-in built here, named like jemalloc,
since CI machines need not have jemalloc), no restart loop when the library cannot be loaded, and
the hint where there is none."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cog import cogtools
from finetune.settings import JEMALLOC_ENV
from finetune.training import allocator

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import sys; from finetune.training.allocator import restart_with_jemalloc, preloaded; "
    "restart_with_jemalloc(); print('preloaded', preloaded(), sys.argv[1:])"
)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A shared library whose name says jemalloc (what `preloaded` looks for); it replaces nothing."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stand-in library")
    folder = tmp_path_factory.mktemp("malloc")
    (folder / "empty.c").write_text("int stand_in_for_jemalloc(void) { return 0; }\n")
    lib = folder / "libjemalloc-stand-in.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(folder / "empty.c")], check=True)
    return lib


def probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._TRIED)}
    return subprocess.run(
        [sys.executable, "-c", PROBE, "--flag", "value"],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_environment_gets_the_library_once(monkeypatch):
    # The choice is the new process's: TRAIN_JEMALLOC in the environment given, not this process's.
    monkeypatch.setenv(JEMALLOC_ENV, "off")
    lib = {JEMALLOC_ENV: "/opt/lib/libjemalloc.so.2"}
    env = allocator.with_jemalloc({**lib, "LD_PRELOAD": "libother.so", "A": "1"})
    assert env == {**lib, "LD_PRELOAD": "/opt/lib/libjemalloc.so.2 libother.so", "A": "1"}
    assert allocator.with_jemalloc(env) == env  # already there: not twice
    assert allocator.with_jemalloc({JEMALLOC_ENV: "off", "A": "1"}) == {JEMALLOC_ENV: "off", "A": "1"}
    assert allocator.library("off") is None


def test_the_local_training_server_gets_it_and_the_predictor_does_not(monkeypatch):
    monkeypatch.setenv(JEMALLOC_ENV, "/opt/lib/libjemalloc.so.2")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert cogtools.server_env("train", 5000)["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"
    assert "LD_PRELOAD" not in cogtools.server_env("predict", 5000)


def test_a_training_process_restarts_itself_with_the_library_preloaded(stand_in):
    done = probe({JEMALLOC_ENV: str(stand_in)})
    assert done.returncode == 0, done.stderr
    # The same arguments after the restart, and the library mapped into the process.
    assert done.stdout.strip() == "preloaded True ['--flag', 'value']"


def test_a_library_that_cannot_load_means_one_try_and_a_reason(tmp_path):
    missing = tmp_path / "libjemalloc.so.2"
    done = probe({JEMALLOC_ENV: str(missing)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "preloaded False ['--flag', 'value']"
    assert f"training with glibc's malloc: {missing} could not be preloaded" in done.stderr


def test_without_jemalloc_training_says_how_to_get_it(monkeypatch, capsys):
    if allocator.preloaded():
        pytest.skip("this test process already runs on jemalloc")
    monkeypatch.setenv(JEMALLOC_ENV, "auto")
    monkeypatch.delenv(allocator._TRIED, raising=False)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    allocator.restart_with_jemalloc()  # returns: nothing to restart with
    assert "apt install libjemalloc2" in capsys.readouterr().err
    monkeypatch.setenv(JEMALLOC_ENV, "off")
    allocator.restart_with_jemalloc()
    assert capsys.readouterr().err == ""
