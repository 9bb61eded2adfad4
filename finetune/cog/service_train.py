"""The training service behind train.py: each training works in a private folder of its own under the
checkpoint folder, and returns its adapter packed into one archive.

A training stopped by SIGTERM keeps its checkpoint there, under a run id it logs at the start and
names in its error; `resume_from=<run id>` with the same data and settings finishes it. Every other
end (success, failure, cancel) removes the folder, and the temporary folder holds only the last
training's archive, which Cog reads after train() returns: the next training removes it."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainConfig
from ..formats.archives import pack_dir
from ..model.devices import train_device
from ..settings import CHECKPOINT_DIR_ENV, TrainSettings
from ..training.checkpoints import CHECKPOINT_PREFIX, checkpoint_root
from ..training.progress import log_line
from ..training.stopping import TrainingStopped
from ..training.trainer import train
from ..workdirs import owned_workdir

RUN_ID = re.compile(r"[0-9a-f]{32}")  # 128 random bits: only whoever started a training can name it
ARCHIVE_PREFIX = "trainings-"
ARCHIVE_NAME = "weights.tar"


class ResumeError(ValueError):
    """`resume_from` names no stopped training that can be resumed."""


@dataclass(frozen=True)
class TrainingSummary:
    archive: Path
    train_loss: float
    eval_loss: float | None
    base_eval_loss: float | None
    steps: int
    tokens_per_second: float
    card: dict

    @classmethod
    def from_card(cls, archive: Path, card: dict) -> TrainingSummary:
        """The archive with the figures its training card holds."""
        return cls(
            archive=archive,
            train_loss=float(card["training"]["final_loss"]),
            eval_loss=card["eval"]["val_loss"],
            base_eval_loss=card["eval"]["base_val_loss"],
            steps=int(card["training"]["steps"]),
            tokens_per_second=float(card["training"]["tokens_per_second"]),
            card=card,
        )

    def metric(self, name: str, which: str) -> float | None:
        """An end-of-training generation figure (exact_match, f1, ...) for "base" or "adapter"."""
        return self.card["eval"].get("metrics", {}).get(name, {}).get(which)


def checkpoint_dir(settings: TrainSettings) -> Path:
    """Where trainings work and stopped ones keep their checkpoints (TrainSettings.checkpoint_root:
    $TRAINING_CHECKPOINT_DIR, else a folder in the user's cache), made here; private (0700), as it
    holds the data of whoever trained."""
    root = settings.checkpoint_root
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(
            f"{root} belongs to another user; set {CHECKPOINT_DIR_ENV} to a folder of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        root.chmod(0o700)
    return root


def run_training(
    make_config: Callable[[str], TrainConfig],
    resume_from: str | None = None,
    log: Callable[[str], None] = log_line,
    settings: TrainSettings | None = None,
) -> TrainingSummary:
    """`make_config(output_dir)` builds the run's config; returns the packed adapter and its figures.
    `resume_from`: the run id of a training stopped by SIGTERM, to finish it. `settings`: the
    environment's (TrainSettings), parsed here before anything else when not given."""
    settings = settings or TrainSettings.from_env()  # every bad variable fails here, named together
    # A GPU image whose GPU torch cannot use fails here, not hours into a CPU run.
    train_device(settings.device, log)
    root, keep = checkpoint_dir(settings), settings.checkpoints_kept
    sweep(root, keep)
    run = _Run.resume(root, resume_from, keep) if resume_from is not None else _Run.new(root)
    _OUTBOX.clear()  # the last training's archive: Cog has read it by now
    try:
        if run.resumed:
            log(f"resuming training {run.id} from its checkpoint")
        else:
            log(
                f"training {run.id}: if it is stopped by SIGTERM it keeps a checkpoint, and "
                f"resume_from={run.id} with the same train_data and settings finishes it"
            )
        cfg = dataclasses.replace(
            make_config(str(run.folder / "adapter")),
            resume_from_checkpoint="latest" if run.resumed else None,
        )
        result = train(cfg, log=log, settings=settings)
        archive = _OUTBOX.publish(result.adapter_dir)
    except TrainingStopped:
        raise _kept_for_resume(run, keep, log) from None
    except BaseException:  # includes Cog's CancelationException
        # A failed resume keeps the checkpoint it came for: the next try may have the right data.
        if run.resumed:
            run.keep_checkpoints()
        else:
            run.remove()
        raise
    else:
        run.remove()
    finally:
        run.close()
        sweep(root, keep)
    return TrainingSummary.from_card(archive, result.card)


def _kept_for_resume(run: _Run, keep: int, log: Callable[[str], None]) -> TrainingStopped:
    """A training stopped by SIGTERM keeps its newest checkpoint for `resume_from` (one stopped before
    its first step has none: its folder goes); the error that says so."""
    step = run.keep_checkpoints()
    if step is None:
        run.remove()
        return TrainingStopped("stopped by SIGTERM before the first step; there is nothing to resume")
    message = (
        f"stopped by SIGTERM after step {step}; its checkpoint is kept: resume_from={run.id} with the "
        f"same train_data and settings finishes it (the {keep} newest stopped trainings are kept)"
    )
    log(message)
    return TrainingStopped(message)


# --- the run folders: <root>/<run id>/{adapter, adapter-checkpoints/checkpoint-N} ------------------


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(checkpoint_root(folder / "adapter").glob(f"{CHECKPOINT_PREFIX}*"))


def _lock(folder: Path) -> int | None:
    """An open descriptor holding `folder`'s exclusive lock, as long as a training works in it. None
    when another holds it or the folder is gone; a file system without locks gives an unlocked one."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            return None
    return fd


@dataclass
class _Run:
    id: str
    folder: Path
    fd: int | None
    resumed: bool

    @classmethod
    def new(cls, root: Path) -> _Run:
        run_id = secrets.token_hex(16)
        # Made and locked under a name the sweep passes over, then renamed into place.
        pending = root / f".{run_id}"
        pending.mkdir(mode=0o700)
        fd = _lock(pending)
        folder = root / run_id
        pending.rename(folder)
        return cls(run_id, folder, fd, False)

    @classmethod
    def resume(cls, root: Path, run_id: str, keep: int) -> _Run:
        # A name, never a path: strangers pass it, and only folders of the store may be resumed.
        if not RUN_ID.fullmatch(run_id):
            raise ResumeError(
                "resume_from takes the run id a training stopped by SIGTERM reported (32 hex digits)"
            )
        folder = root / run_id
        if not folder.is_dir():
            raise ResumeError(
                f"no stopped training {run_id} to resume: it finished, failed before its first step, "
                f"or expired (the {keep} newest are kept)"
            )
        fd = _lock(folder)
        if fd is None:
            raise ResumeError(f"training {run_id} is running now; wait for it to end")
        if not _checkpoints(folder):  # swept meanwhile
            os.close(fd)
            raise ResumeError(f"no stopped training {run_id} to resume: it expired")
        return cls(run_id, folder, fd, True)

    def keep_checkpoints(self) -> int | None:
        """Remove all but the checkpoints; the newest one's step (None: there is none)."""
        for path in self.folder.iterdir():
            if path == checkpoint_root(self.folder / "adapter"):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        found = _checkpoints(self.folder)
        return int(found[-1].name.removeprefix(CHECKPOINT_PREFIX)) if found else None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def sweep(root: Path, keep: int) -> list[Path]:
    """Remove the run folders no training works in that hold no checkpoint (their process died), and
    all but the `keep` newest stopped trainings."""
    removed, stopped = [], []
    for folder in root.iterdir():
        if not RUN_ID.fullmatch(folder.name) or (fd := _lock(folder)) is None:
            continue
        try:
            found = _checkpoints(folder)
            if found:
                stopped.append((max(p.stat().st_mtime for p in found), folder))
            else:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        finally:
            os.close(fd)
    for _, folder in sorted(stopped, reverse=True)[keep:]:
        if (fd := _lock(folder)) is not None:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            os.close(fd)
    return removed


# --- the archive -------------------------------------------------------------------------------


class _Outbox:
    """The last training's archive, in a temporary folder this process owns (removed when it ends,
    or by the next process if it was killed)."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def publish(self, adapter_dir: Path) -> Path:
        """Pack the adapter folder: whole, on disk, and only then under its name."""
        return pack_dir(adapter_dir, self._folder() / ARCHIVE_NAME)  # staged, flushed, renamed

    def clear(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()

    def _folder(self) -> Path:
        # Made anew if the temporary folder moved ($TMPDIR, tests) or a cleaner removed it.
        current = self.folder
        if current is None or not current.is_dir() or current.parent != Path(tempfile.gettempdir()):
            self.folder = owned_workdir(self, ARCHIVE_PREFIX)
        assert self.folder is not None
        return self.folder


_OUTBOX = _Outbox()
