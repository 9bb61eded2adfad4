"""Stopping a training on SIGTERM: it checkpoints at the end of the step and raises TrainingStopped,
whose message says how to resume. Every rank stops at the same step.

Python runs signal handlers in the main thread only, between bytecodes. Cog's worker runs train()
in another thread while its main thread stays in native code, so there a Python handler never
runs (and without one SIGTERM kills the worker, and its training slot with it). watch_sigterm has
the C-level handler also write each signal's number to a pipe, which the training thread reads."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from .checkpoints import CHECKPOINT_PREFIX, checkpoint_root
from .distributed import Placement


class TrainingStopped(Exception):
    """Training was asked to stop (SIGTERM); `checkpoint` holds the progress (None: no step had run,
    or this process is not the one that writes checkpoints)."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


_sigterm = threading.Event()  # a SIGTERM arrived while a training ran
_wakeup_read: int | None = None  # the pipe's read end, once watch_sigterm armed it
_active_runs = 0
_consumed = False  # a SIGTERM was read from the pipe: its late Python handler must not act again


def watch_sigterm() -> bool:
    """Let a training in any thread of this process see SIGTERM (it checkpoints and stops); call from
    the main thread. Where Python can still act on it, a SIGTERM while no training runs ends the
    process as before. False when another user of signal.set_wakeup_fd (an asyncio loop) was first."""
    global _wakeup_read
    if _wakeup_read is not None:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)  # a full pipe drops bytes rather than block the signal handler
    previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    if previous != -1:
        signal.set_wakeup_fd(previous)
        os.close(read)
        os.close(write)
        return False
    signal.signal(signal.SIGTERM, _on_sigterm)  # the wakeup pipe is written only for handled signals
    _wakeup_read = read
    return True


def _on_sigterm(signum: int, frame: Any) -> None:
    global _consumed
    if _active_runs:
        _sigterm.set()
        _consumed = False  # if the training read this signal from the pipe, here is its handler
    elif _consumed:
        _consumed = False
    else:  # no training to stop: the default, the process ends
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _sigterm_in_pipe() -> bool:
    """Empty the wakeup pipe; whether it held a SIGTERM."""
    seen = False
    while _wakeup_read is not None:
        try:
            chunk = os.read(_wakeup_read, 512)
        except BlockingIOError:
            break
        if not chunk:
            break
        seen = seen or signal.SIGTERM in chunk
    return seen


class StopFlag:
    """Set by SIGTERM while a training runs; the run checkpoints at the end of the step and stops."""

    def __init__(self) -> None:
        self.previous: Any = None

    def __enter__(self) -> StopFlag:
        global _active_runs
        if not _active_runs:  # a SIGTERM from before this run is not meant for it
            _sigterm.clear()
            _sigterm_in_pipe()
        _active_runs += 1
        try:
            self.previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: the pipe of watch_sigterm, if armed, says it
            self.previous = None
        return self

    @property
    def set(self) -> bool:
        global _consumed
        if not _sigterm.is_set() and _sigterm_in_pipe():
            _sigterm.set()
            _consumed = True
        return _sigterm.is_set()

    def __exit__(self, *exc: object) -> None:
        global _active_runs
        _active_runs -= 1
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def stopped(cfg: TrainConfig, checkpoint: Path | None) -> TrainingStopped:
    """The error a stopped run raises: where its checkpoints are and how to resume, or that there is
    nothing to resume."""
    if checkpoint is None and not any(checkpoint_root(cfg.output_dir).glob(f"{CHECKPOINT_PREFIX}*")):
        return TrainingStopped("stopped by SIGTERM before the first step; there is nothing to resume")
    return TrainingStopped(
        f"stopped by SIGTERM; resume with --resume_from_checkpoint latest "
        f"(checkpoints in {checkpoint_root(cfg.output_dir)})",
        checkpoint,
    )


def stop_requested(stop: StopFlag, place: Placement) -> bool:
    """SIGTERM on any rank stops every rank at the same step."""
    if place.dist.world_size == 1:
        return stop.set
    flag = torch.tensor([int(stop.set)], device=place.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item())


def stop_before_save(cfg: TrainConfig, stop: StopFlag, place: Placement, done: int) -> None:
    """On a SIGTERM during finish_run, stop every rank; the last step's checkpoint (on disk by then)
    finishes the run on resume."""
    if stop_requested(stop, place):
        root = checkpoint_root(cfg.output_dir)
        path = root / f"{CHECKPOINT_PREFIX}{done:07d}"
        raise stopped(cfg, path if place.dist.main else None)
