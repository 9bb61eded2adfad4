"""Our own CPU kernel for int8 decoding (`finetune/kernels/int8_linear.cpp`), built with the
machine's C++ compiler on first use and cached beside the compiled decode step.

`torch.ops.finetune.int8_linear(x, w, scale)` multiplies fp32 activations (rounded to int16 per
group on CPUs without AVX-512) with int8 weights (a scale per group of 16 to 64 weights) and
streams the weights about 2x as fast as torch's `aten._weight_int8pack_mm` on the project's CPU
(the kernel's header says why and how). Where it cannot be built (no compiler, a build error)
`available()` says so once and int8 decoding uses torch's kernel instead."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "kernels" / "int8_linear.cpp"
CACHE_ENV = "SERVE_COMPILE_CACHE"
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # once tried: "path" loaded, or "error" why not


def cache_dir() -> Path:
    """Where compiled artifacts live: SERVE_COMPILE_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune-lora" / "compiled"


def _command(compiler: str, source: Path, output: Path) -> list[str]:
    torch_dir = Path(torch.__file__).resolve().parent
    includes = [torch_dir / "include", torch_dir / "include" / "torch" / "csrc" / "api" / "include"]
    return [
        compiler,
        "-O3",
        "-std=c++17",
        "-fPIC",
        "-shared",
        "-fopenmp",  # at::parallel_for is OpenMP inside the header; torch ships the runtime it uses
        "-w",  # torch's headers warn under some compilers; the kernel itself is small
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in includes),
        str(source),
        "-o",
        str(output),
        f"-L{torch_dir / 'lib'}",
        "-ltorch_cpu",
        "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]


def library_path(compiler: str) -> Path:
    """The built library's file, keyed by what it is built from, with and against."""
    command = " ".join(_command(compiler, SOURCE, Path("out"))) + torch.__version__ + sys.platform
    key = hashlib.sha256(SOURCE.read_bytes() + command.encode()).hexdigest()[:16]
    return cache_dir() / f"int8_linear-{key}.so"


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run(_command(compiler, SOURCE, built), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        os.replace(built, path)  # whole or not at all: a concurrent start sees no half-written file


def _load() -> Path:
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; set CXX)")
    path = library_path(compiler)
    if not path.is_file():
        print(
            f"kernels: building the int8 kernel into {path.parent} (seconds, once)",
            file=sys.stderr,
            flush=True,
        )
        _build(compiler, path)
    torch.ops.load_library(str(path))

    @torch.library.register_fake("finetune::int8_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    return path


def available() -> bool:
    """Build (first time on a machine) and load the kernel, once a process; False, with the reason
    printed once, where it cannot be."""
    if _state:  # decided: every eager int8 matmul asks, so no lock once it is
        return "path" in _state
    with _lock:
        if not _state:
            try:
                _state["path"] = str(_load())
            except Exception as exc:  # no compiler, a failed build or load: torch's kernel instead
                _state["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(
                    f"kernels: int8 decoding uses torch's kernel ({_state['error']})",
                    file=sys.stderr,
                    flush=True,
                )
        return "path" in _state


def loaded() -> Path | None:
    """The library this process loaded (None: not loaded)."""
    return Path(_state["path"]) if _state.get("path") else None


def isa() -> str | None:
    """The vector code the loaded kernel runs on this CPU (avx512, avx2 or generic; None: not loaded)."""
    return str(torch.ops.finetune.int8_isa()) if loaded() else None
