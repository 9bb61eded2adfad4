"""Our own CPU kernels (`finetune/engine/kernels/`: int8 and int4 products, and decode attention
for attention.py), built into one library with the machine's C++ compiler on first use and cached
beside the compiled decode step.

`torch.ops.finetune.int8_linear(x, w, scale)` multiplies fp32 activations (rounded to int8 per
group on CPUs without AVX-512, and then multiplied as integers) with int8 weights (a scale per
group of 16 to 64 weights) and streams the weights about 2x as fast as torch's
`aten._weight_int8pack_mm` on the project's CPU. On CPUs without AVX-512 prompts' rows go through
it too, as a blocked GEMM; on AVX-512 they keep the fp32 weight (`quant.prefills_quantized`; the
kernel's header says why and how). Off AVX-512 quant packs int8 copies in lanes of 8 rows for
`torch.ops.finetune.int8_lanes_linear`, the same product with no horizontal sums.
`torch.ops.finetune.int4_linear(x, w, scales)` takes 4-bit codes with a scale and offset per 32
weights in its own layout (kernels/int4_linear.cpp). Where the library cannot be built (no
compiler, a build error) `available()` says so once; int8 and int4 decoding then use torch's
kernels, and attention SDPA.

The cache folder is a trust boundary: what is loaded from it runs as this process. `cache_dir()` uses
the configured folder only when no one but this user (and root) can write it or a folder above it,
else a private folder of this process's own, with a warning. Every file or folder built into it is
recorded with its SHA-256 in the folder's manifest (`publish`), and loaded only while it still has
that digest (`verified`); anything else there is rebuilt, never loaded. cpu_compile.py's packages go
through the same two functions."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import workdirs
from ..settings import COMPILE_CACHE_ENV as CACHE_ENV
from ..settings import CXX_ENV

_KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCES = (_KERNELS / "int8_linear.cpp", _KERNELS / "int4_linear.cpp", _KERNELS / "decode_attention.cpp")
HEADERS = (
    _KERNELS / "isa.h",
    _KERNELS / "rows.h",
)  # included by the sources: part of the library's cache key
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # once tried: "path" loaded, or "error" why not


MANIFEST = "manifest.json"  # {"sha256": {name: digest}} of what this user built in the folder
_FALLBACK_PREFIX = "finetune-compiled-"
_dir_lock = threading.Lock()
_fallbacks: dict[str, Path] = {}  # configured folder -> this process's private folder used instead


class _Process:
    """Lives as long as the process: the owner of its fallback cache folders (workdirs)."""


_PROCESS = _Process()


def configured_dir() -> Path:
    """The folder asked for: SERVE_COMPILE_CACHE, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "finetune-lora" / "compiled"


def cache_dir() -> Path:
    """Where compiled artifacts are built and loaded from: `configured_dir()` (made 0o700 where
    missing) when it is private to this user (`untrusted`), else a private folder of this process's
    own, removed when it ends, with one warning: code another user could plant there would run in
    this process."""
    configured = Path(os.path.abspath(configured_dir()))
    with _dir_lock:
        if str(configured) in _fallbacks:
            return _fallbacks[str(configured)]
        try:
            _make_private(configured)
            why = untrusted(configured)
        except OSError as exc:
            why = f"it cannot be made or read ({exc.strerror or exc})"
        if why is None:
            return configured
        fallback = workdirs.owned_workdir(_PROCESS, _FALLBACK_PREFIX)
        if untrusted(fallback) is not None:  # a temporary folder others can swap: load nothing
            raise RuntimeError(
                f"compile cache {configured}: {why}; the temporary folder is not private either"
            )
        print(
            f"compile cache: not using {configured}: {why}. Code built for this process goes to "
            f"{fallback} and is rebuilt on every start: make the folder this user's own and writable "
            f"by no one else, or point {CACHE_ENV} at one that is.",
            file=sys.stderr,
            flush=True,
        )
        _fallbacks[str(configured)] = fallback
        return fallback


def _make_private(folder: Path) -> None:
    """Make the missing folders of `folder`, each 0o700."""
    missing = []
    for p in (folder, *folder.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first: checked after
            os.mkdir(p, 0o700)


def untrusted(folder: Path) -> str | None:
    """Why someone other than this user or root could change what `folder` holds (None: no one
    can). It must be a real folder (not a link) owned by this user and writable by no one else;
    every folder above it, and every link on the way, owned by this user or root, and folders
    writable by no one else unless sticky (as /tmp: others cannot rename or remove our entries)."""
    me = os.geteuid()
    path = Path(os.path.abspath(folder))
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a folder"
    if info.st_uid != me:
        return f"{path} is owned by uid {info.st_uid}, not this user ({me})"
    if info.st_mode & 0o022:
        return f"{path} is writable by its group or others (mode {stat.S_IMODE(info.st_mode):o})"
    # The folders above, links resolved one by one, so that each link's own folder is checked too.
    current, todo, links = Path(path.anchor), list(path.parent.parts[1:]), 0
    while True:
        info = os.lstat(current)
        if info.st_uid not in (0, me):
            return f"{current}, above it, is owned by uid {info.st_uid}"
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            return f"{current}, above it, is writable by its group or others"
        if not todo:
            return None
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        nxt = current / name
        link = os.lstat(nxt)
        if not stat.S_ISLNK(link.st_mode):
            current = nxt
            continue
        links += 1
        if link.st_uid not in (0, me):
            return f"{nxt}, above it, is a link owned by uid {link.st_uid}"
        if links > 40:
            return f"{nxt}, above it: too many levels of links"
        target = Path(os.readlink(nxt))
        todo[:0] = target.parts[1:] if target.is_absolute() else target.parts
        if target.is_absolute():
            current = Path(target.anchor)


def _private(info: os.stat_result) -> bool:
    """A file or folder of this user's that no one else can write."""
    return info.st_uid == os.geteuid() and not info.st_mode & 0o022


def digest(path: Path) -> str | None:
    """SHA-256 of a file, or of a folder's files (relative names and contents); None when it is
    missing or not this user's alone: a link, another owner, writable by group or others."""
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            return _file_digest(path)
        if not _private(info):
            return None
        total = hashlib.sha256()
        for top, dirs, files in os.walk(path, onerror=_raise):  # (by default it skips what it cannot read)
            dirs.sort()
            for name in dirs:
                if not _private(os.lstat(Path(top) / name)) or (Path(top) / name).is_symlink():
                    return None
            for name in sorted(files):
                one = _file_digest(Path(top) / name)
                if one is None:
                    return None
                relative = (Path(top) / name).relative_to(path).as_posix()
                total.update(relative.encode() + b"\0" + bytes.fromhex(one))  # no name holds a NUL
        return total.hexdigest()
    except OSError:
        return None


def _raise(exc: OSError) -> None:
    raise exc


def _file_digest(path: Path) -> str | None:
    if not stat.S_ISREG(os.lstat(path).st_mode):  # a device or FIFO is not even opened
        return None
    # O_NOFOLLOW and fstat: the checks and the digest are of the same file; O_NONBLOCK: a FIFO
    # swapped in meanwhile does not hang the open (fstat then refuses it).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not _private(info):
            return None
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def _locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """The manifest's lock: publishing (exclusive) records and moves into place as one step, and a
    check (shared) sees both or neither. Unlocked where locks or writes are not to be had (a
    read-only cache baked into an image)."""
    try:
        fd = os.open(folder / ".manifest.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _manifest(folder: Path) -> dict[str, str]:
    try:
        fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        try:
            entries = json.load(f).get("sha256") if stat.S_ISREG(info.st_mode) and _private(info) else None
        except (ValueError, AttributeError):
            entries = None
    return {k: v for k, v in entries.items() if isinstance(v, str)} if isinstance(entries, dict) else {}


def _seal(path: Path) -> None:
    """No group or other write bits on what we built, whatever the umask left."""
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            p.chmod(stat.S_IMODE(p.stat().st_mode) & ~0o022)


def publish(built: Path, path: Path) -> None:
    """Move a file or folder this process just built (in a temporary folder inside `path`'s cache
    folder, which removes what is moved aside) into place as `path`, its digest recorded in the
    manifest first: whatever was at `path` (planted, altered, or an earlier build) is replaced
    whole; a concurrent start sees the old or the new, never half of one."""
    _seal(built)
    made = digest(built)
    if made is None:
        raise RuntimeError(f"{built.name}: what was built is not this user's alone")
    folder = path.parent
    with _locked(folder, exclusive=True):
        # The same files there already (another process unpacked the same package meanwhile): kept,
        # so that a loader reading them is not pulled from under.
        same = built.is_dir() and digest(path) == made
        entries = {n: d for n, d in _manifest(folder).items() if os.path.lexists(folder / n)}
        entries[path.name] = made
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"sha256": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, folder / MANIFEST)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if same:
            return
        if os.path.lexists(path) and (built.is_dir() or path.is_dir() and not path.is_symlink()):
            os.rename(path, built.parent / f".replaced-{path.name}")  # rename cannot replace a folder
        os.replace(built, path)


def verified(path: Path) -> str | None:
    """`path`'s digest when it is what this user built and recorded in its folder's manifest (None:
    missing, planted or altered; rebuild it, never load it). The folder must be `cache_dir()`, so
    that between this check and the load only this user (or root) can change the file."""
    with _locked(path.parent, exclusive=False):
        want = _manifest(path.parent).get(path.name)
        got = digest(path) if want else None
    return got if got is not None and got == want else None


def distrust(path: Path, what: str) -> None:
    """Say why a file or folder in the cache is rebuilt instead of loaded (nothing if it is missing)."""
    if os.path.lexists(path):
        recorded = path.name in _manifest(path.parent)
        why = "its SHA-256 is not the one recorded" if recorded else f"it is not recorded in {MANIFEST}"
        print(
            f"compile cache: {path} is not what this user built there ({why}; planted, altered, or "
            f"left by an earlier version); {what} it instead of loading it",
            file=sys.stderr,
            flush=True,
        )


def _command(compiler: str, sources: tuple[Path, ...], output: Path) -> list[str]:
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
        *map(str, sources),
        "-o",
        str(output),
        f"-L{torch_dir / 'lib'}",
        "-ltorch_cpu",
        "-lc10",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
    ]


def library_path(compiler: str) -> Path:
    """The built library's file, keyed by what it is built from, with and against."""
    command = " ".join(_command(compiler, SOURCES, Path("out"))) + torch.__version__ + sys.platform
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + command.encode()).hexdigest()[
        :16
    ]
    return cache_dir() / f"int8_linear-{key}.so"


def _build(compiler: str, path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        built = Path(tmp) / path.name
        done = subprocess.run(_command(compiler, SOURCES, built), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-300:]}")
        publish(built, path)


def _load() -> Path:
    compiler = os.environ.get(CXX_ENV) or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH; set CXX)")
    path = library_path(compiler)
    if verified(path) is None:
        distrust(path, "rebuilding")
        print(
            f"kernels: building the int8 kernel into {path.parent} (seconds, once)",
            file=sys.stderr,
            flush=True,
        )
        _build(compiler, path)
        if verified(path) is None:
            raise RuntimeError(f"{path.name} changed in the cache right after it was built")
    # Loaded by path after the check, not from a private copy: the folder and the file can be changed
    # only by this user (cache_dir, digest), whose processes only ever replace it with a recorded build.
    torch.ops.load_library(str(path))

    @torch.library.register_fake("finetune::int8_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("finetune::int8_lanes_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0] * w.shape[2] // 4)

    @torch.library.register_fake("finetune::int4_linear")
    def _(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0] * 8)

    @torch.library.register_fake("finetune::decode_attention")
    def _(q: torch.Tensor, past_k: torch.Tensor, *rest: Any) -> torch.Tensor:
        return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])

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
