"""jemalloc for training processes on Linux (`TRAIN_JEMALLOC=auto|off|LIBRARY`).

Training allocates tensors whose sizes change with every micro-batch (each batch pads to its own
longest row). glibc's malloc fragments under that: a 135M-model run with the defaults grew its
resident memory step after step (3.4 GB at step 3, 4.7 GB at step 30 on 48 GSM8K records), while a
fixed 64 KB mmap threshold, which gives every such tensor its own mapping, kept it flat at 1.0-2.9 GB
(so nothing leaks) at half the speed. jemalloc, preloaded, kept the peak at 3.1 GB and ran 1.3x as
fast as glibc (301 against 230 tokens/s, the same losses; docs/performance.md; tried and not kept: docs/decisions.md).

A malloc cannot be swapped inside a running process, so the training entry points (`finetune.py`,
`python -m finetune train`) restart themselves once with jemalloc in LD_PRELOAD before importing
torch, and the local Cog server started for training (cogtools) gets it in its environment. The
library is the system's (Debian/Ubuntu: `apt install libjemalloc2`); where it is missing, training
runs on glibc's malloc as before and says so once."""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping

from ..settings import JEMALLOC_ENV, jemalloc_from_env

_TRIED = "_TRAIN_JEMALLOC_TRIED"  # set across the restart: never restart twice


def library(choice: str) -> str | None:
    """The jemalloc to preload for a TRAIN_JEMALLOC value (settings.jemalloc_from_env): the path or
    library name it gives, none when it is `off`, else the system's, found the way the dynamic
    linker finds it (None where there is none)."""
    if choice == "off" or not sys.platform.startswith("linux"):
        return None
    if choice != "auto":
        return choice
    return ctypes.util.find_library("jemalloc")


def preloaded() -> bool:
    """jemalloc is mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            return any("jemalloc" in line for line in maps)
    except OSError:
        return False


def with_jemalloc(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with jemalloc added to LD_PRELOAD as `env`'s own TRAIN_JEMALLOC asks (unchanged where
    there is none, or it is there already): the environment of a process about to be started."""
    out = dict(env)
    lib = library(jemalloc_from_env(env))
    current = out.get("LD_PRELOAD", "")
    if lib and "jemalloc" not in current:
        out["LD_PRELOAD"] = f"{lib} {current}".strip()
    return out


def restart_with_jemalloc() -> None:
    """Replace this process by itself with jemalloc preloaded, once (same PID, arguments and
    environment otherwise). Call it first thing in an entry point, before torch is imported."""
    if preloaded():
        return
    choice = jemalloc_from_env(os.environ)
    lib = library(choice)
    if lib is None:
        if choice != "off":
            print(
                "training with glibc's malloc: install jemalloc (Debian/Ubuntu: apt install libjemalloc2) "
                f"for ~1.3x faster CPU training and flat memory, or set {JEMALLOC_ENV}=off to silence this",
                file=sys.stderr,
            )
        return
    if os.environ.get(_TRIED) or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        print(f"training with glibc's malloc: {lib} could not be preloaded", file=sys.stderr)
        return
    env = with_jemalloc(os.environ)
    env[_TRIED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
