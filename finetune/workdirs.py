"""Private temporary folders that a process owns for its whole life, and that the next process
removes if their owner died without doing so.

A server removes its folder when it ends normally (weakref.finalize / atexit), but a SIGKILL, or a
SIGTERM (Python's default handler skips atexit; Cog servers are stopped with one), leaves it behind
with every adapter it had downloaded. The owner holds an exclusive flock on the folder itself for as
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


def remove_orphans(prefix: str) -> list[Path]:
    """Remove this user's `prefix*` folders in the temporary directory whose owner is dead."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, a link, or not a folder
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
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
    # Made and locked under a name the sweep does not match, then renamed into place: a sweeper never
    # sees a live folder unlocked. The lock follows the folder through the rename.
    pending = Path(tempfile.mkdtemp(prefix=f".{prefix}"))
    workdir = pending.with_name(pending.name[1:])
    fd: int | None = os.open(pending, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a file system without locks: the folder works, and no sweep will remove it
        os.close(fd)
        fd = None
        workdir = pending
    else:
        pending.rename(workdir)
    weakref.finalize(owner, _release, workdir, fd)
    return workdir


def _release(workdir: Path, fd: int | None) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if fd is not None:
        os.close(fd)
