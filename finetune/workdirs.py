"""Private temporary folders that a process owns for its whole life, and that the next process
removes if their owner died without doing so.

A server removes its folder when it ends normally (weakref.finalize / atexit), but a SIGKILL, or a
SIGTERM (Python's default handler skips atexit; Cog servers are stopped with one), leaves it behind
with every adapter it had downloaded. The owner holds an exclusive flock on a file inside for as
long as it lives; the kernel drops that lock when the process dies, however it dies, so a lock that
can be taken means a dead owner. PIDs would not do: they are reused, and differ across containers
that share a /tmp."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import weakref
from pathlib import Path

OWNER_FILE = ".owner"


def remove_orphans(prefix: str) -> list[Path]:
    """Remove this user's `prefix*` folders in the temporary directory whose owner is dead."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            if folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
            fd = os.open(folder / OWNER_FILE, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # not a folder of ours, one still being set up, or one from before owner files
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner is alive
        else:  # held while removing, so no other process judges the folder meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def owned_workdir(owner: object, prefix: str) -> Path:
    """A new private folder that lives as long as `owner` (or the process, whichever ends first);
    earlier owners' orphaned `prefix*` folders are removed first."""
    remove_orphans(prefix)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    # Locked before it gets its final name: a sweeper never sees an unlocked owner file of a live folder.
    pending = workdir / f"{OWNER_FILE}.new"
    fd: int | None = os.open(pending, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        pending.rename(workdir / OWNER_FILE)
    except OSError:  # a file system without locks: the folder works, only a later sweep skips it
        os.close(fd)
        fd = None
        pending.unlink(missing_ok=True)
    weakref.finalize(owner, _release, workdir, fd)
    return workdir


def _release(workdir: Path, fd: int | None) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if fd is not None:
        os.close(fd)
