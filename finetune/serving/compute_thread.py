"""One long-lived thread for every torch call of a server.

libgomp gives each thread that starts an OpenMP region its own pool of workers, and once a process
manages more OpenMP threads than it has CPUs, every pool waits for work with a short, throttled
spin: each operator then pays for waking a sleeping thread. Cog runs setup() and the predictions
on different threads, which on 2 cores made decoding through the Cog server ~1.6x slower than the
same code in process (bench: 32 tokens in 1.9 s against 1.2 s). Running all of a server's torch work
on one thread keeps one pool, whichever thread the request arrives on.

The thread runs submitted calls and, between them, the steps of registered loops (the serving
engine): a call waits at most one step, and a step never waits for a call's queue to empty."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
# How often a waiting caller wakes: Cog cancels a prediction by raising an exception into the
# calling thread, which only happens while that thread runs Python code, not inside a blocking wait.
POLL_S = 0.05


class ComputeThread:
    def __init__(self, name: str = "model") -> None:
        self._tasks: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = queue.SimpleQueue()
        self._loops: list[Callable[[], bool]] = []
        self._since: float | None = None  # when the call or step running now began
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the compute thread; its result or exception here."""
        if threading.get_ident() == self._thread.ident:
            return fn(*args, **kwargs)  # already on it (a nested call would wait for itself)
        future: Future[T] = Future()
        self._tasks.put((lambda: fn(*args, **kwargs), future))
        return wait(future)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled_for(self) -> float:
        """Seconds the call or step running now has taken so far (0 when idle)."""
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def add_loop(self, step: Callable[[], bool]) -> None:
        """Run step() on the compute thread whenever it has work; step returns True while it has more."""
        self._tasks.put((lambda: self._loops.append(step), Future()))

    def wake(self) -> None:
        """A loop has new work (its step() would now return True)."""
        self._tasks.put(None)

    def _run(self) -> None:
        busy = False
        while True:
            try:
                task = self._tasks.get(block=not busy)
            except queue.Empty:
                task = None
            if task is not None:
                fn, future = task
                if future.set_running_or_notify_cancel():
                    self._since = time.monotonic()
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the caller, raised there
                        future.set_exception(exc)
                    self._since = None
                # Not held while waiting for the next task: a failed setup's exception would keep its
                # half-built server (and model) alive through the traceback.
                task = fn = future = None
            busy = False
            for step in self._loops:
                self._since = time.monotonic()
                try:
                    busy = step() or busy
                except Exception:  # the thread serves every request: log, and go on serving
                    log.exception("a step of the compute loop failed")
                self._since = None


def wait(future: Future[T]) -> T:
    """future.result(), waking every POLL_S so a Cog cancel can land in this thread."""
    while True:
        try:
            return future.result(timeout=POLL_S)
        except TimeoutError:
            continue
