"""One long-lived thread for every torch call of a server.

libgomp gives each thread that starts an OpenMP region its own pool of workers, and once a process
manages more OpenMP threads than it has CPUs, every pool waits for work with a short, throttled
spin: each operator then pays for waking a sleeping thread. Cog runs setup() and the predictions
on different threads, which on 2 cores made decoding through the Cog server ~1.6x slower than the
same code in process (bench: 32 tokens in 1.9 s against 1.2 s). Running all of a server's torch work
on one thread keeps one pool, whichever thread the request arrives on."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
# How often a waiting caller wakes: Cog cancels a prediction by raising an exception into the
# calling thread, which only happens while that thread runs Python code, not inside a blocking wait.
POLL_S = 0.05


class ComputeThread:
    def __init__(self, name: str = "model") -> None:
        self._ident: int | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=self._remember)

    def _remember(self) -> None:
        self._ident = threading.get_ident()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the compute thread; its result or exception here."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)  # already on it (a nested call would wait for itself)
        return _wait(self._pool.submit(fn, *args, **kwargs))

    def stream(self, make: Callable[[], Iterator[T]], cancel: threading.Event) -> Iterator[T]:
        """Iterate make() on the compute thread, yielding its items here as they come. Closing or
        abandoning this iterator (a cancelled prediction) sets `cancel`, which the producer checks."""
        items: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def produce() -> None:
            try:
                for item in make():
                    items.put((True, item))
                    if cancel.is_set():
                        break
            except BaseException as exc:  # handed to the consumer, raised there
                items.put((False, exc))
                return
            items.put((False, None))

        if threading.get_ident() == self._ident:
            yield from make()
            return
        self._pool.submit(produce)
        try:
            while True:
                try:
                    ok, item = items.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if ok:
                    yield item
                elif item is None:
                    return
                else:
                    raise item
        finally:
            cancel.set()


def _wait(future: Future[T]) -> T:
    while True:
        try:
            return future.result(timeout=POLL_S)
        except TimeoutError:
            continue
