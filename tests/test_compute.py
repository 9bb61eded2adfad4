"""ComputeThread: every torch call of a server on one thread, whichever thread asks."""

from __future__ import annotations

import threading
import time

import pytest

from finetune.compute import ComputeThread


def in_thread(fn):
    out: dict[str, object] = {}
    worker = threading.Thread(target=lambda: out.update(value=fn()))
    worker.start()
    worker.join()
    return out["value"]


def test_calls_from_any_thread_run_on_one_thread():
    compute = ComputeThread()
    here = compute.call(threading.get_ident)
    assert here != threading.get_ident()
    assert in_thread(lambda: compute.call(threading.get_ident)) == here
    # A call made on the compute thread runs inline instead of waiting for itself.
    assert compute.call(lambda: compute.call(threading.get_ident)) == here


def test_exceptions_reach_the_caller_unchanged():
    compute = ComputeThread()

    def fail() -> None:
        raise KeyError("missing adapter")

    with pytest.raises(KeyError, match="missing adapter"):
        compute.call(fail)
    assert compute.call(lambda: 7) == 7  # the thread survives


def test_stream_yields_in_order_and_forwards_errors():
    compute = ComputeThread()

    def make():
        yield "a"
        yield "b"
        raise ValueError("prompt too long")

    got = []
    with pytest.raises(ValueError, match="prompt too long"):
        for item in compute.stream(make, threading.Event()):
            got.append(item)
    assert got == ["a", "b"]


def test_closing_the_stream_stops_the_producer():
    compute = ComputeThread()
    cancel = threading.Event()
    produced = []

    def make():
        for i in range(1000):
            if cancel.is_set():
                return
            produced.append(i)
            time.sleep(0.002)
            yield i

    stream = compute.stream(make, cancel)
    assert next(stream) == 0
    stream.close()  # what a cancelled prediction does to its iterator
    assert cancel.is_set()
    compute.call(lambda: None)  # queued behind the producer: returns once it has stopped
    assert len(produced) < 50


def test_a_server_runs_every_forward_pass_on_its_compute_thread(tiny_model_dir):
    from finetune.config import GenerationSettings
    from finetune.inference import GenerationStats
    from finetune.serving import ModelServer

    server = ModelServer(base_model=str(tiny_model_dir))
    seen: set[int] = set()
    server.model.register_forward_hook(lambda *_: seen.add(threading.get_ident()))
    settings = GenerationSettings(max_new_tokens=3, temperature=0)

    def ask() -> GenerationStats:
        stats = GenerationStats()
        "".join(server.generate("hello", settings=settings, stats=stats))
        return stats

    stats = [ask(), in_thread(ask)]
    assert seen == {server.compute.call(threading.get_ident)}
    assert all(s.output_token_count == 3 or s.stop_reason == "eos" for s in stats)
