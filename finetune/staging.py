"""Write a folder or a file under a hidden temporary name beside its final one, then rename it into
place, so that readers, and the disk after a crash or a power loss, see it whole or not at all.

Standard library only: archives, artifacts, convert_meta, export, weights and the trainer all write
through here, and a module that imports nothing of ours cannot close an import cycle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Children first: a folder's entries are flushed after the files they name.
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder, name))
        fsync_path(Path(folder))


def _temp_affixes(final: Path) -> dict[str, str]:
    # Hidden, named after the target (a leftover says what it was), and random (concurrent writers).
    return {"prefix": f".{final.name}.", "suffix": ".tmp", "dir": str(final.parent)}


def _rename_into_empty(tmp: Path, final: Path) -> None:
    try:
        tmp.rename(final)  # atomic; rename(2) replaces an empty folder and nothing else
    except OSError as e:
        if final.exists():  # not empty, a file, or filled by someone else meanwhile
            raise FileExistsError(f"{final} already exists and is not an empty folder") from e
        raise


def _swap(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    if not final.is_dir():  # moving a file aside would hide it under a dot name
        raise FileExistsError(f"{final} is a file, not a folder")
    # rename(2) cannot replace a full folder: the old one steps aside for the moment between.
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)  # a crash between the renames left it
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path, *, mode: int | None = 0o755, replace: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside `final` (the same file system, so the rename is atomic) to
    write into. When the body returns, the folder gets `mode` (mkdtemp makes it owner-only, and a
    server may run as another user; None keeps that), every file and folder in it is flushed to the
    disk, it is renamed to `final`, and `final`'s parent is flushed.

    `final` must be absent or an empty folder (FileExistsError otherwise), unless `replace`: then a
    folder there is replaced, and `final` is at every moment the old folder, the new one, or absent.
    When the body raises anything (BaseException: a Cog cancel too), the temporary folder is removed
    and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(**_temp_affixes(final)))
    try:
        yield tmp
        if mode is not None:
            tmp.chmod(mode)
        _fsync_tree(tmp)
        (_swap if replace else _rename_into_empty)(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)


@contextmanager
def staged_file(final: Path, *, mode: int | None = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file opened for writing under a hidden name beside `final`. When the body
    returns, the file gets `mode` (mkstemp makes it owner-only; None keeps that), is flushed to the
    disk, replaces `final` (whatever file is there) and `final`'s parent is flushed. When the body
    raises anything, the temporary file is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(**_temp_affixes(final))
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            if mode is not None:
                os.fchmod(out.fileno(), mode)
            os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final.parent)
