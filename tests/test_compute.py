"""ComputeThread: every torch call of a server on one thread, whichever thread asks."""

from __future__ import annotations

import threading
import time

import pytest

from finetune.serving.compute_thread import ComputeThread


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


def test_a_loop_steps_between_calls_and_calls_wait_at_most_a_step():
    compute = ComputeThread()
    work = {"left": 0}
    threads: set[int] = set()

    def step() -> bool:
        threads.add(threading.get_ident())
        if work["left"]:
            time.sleep(0.01)
            work["left"] -= 1
        return work["left"] > 0

    compute.add_loop(step)
    compute.call(lambda: work.update(left=200))
    compute.wake()
    started = time.monotonic()
    assert compute.call(lambda: work["left"]) > 100  # answered between steps, not after all 200
    assert time.monotonic() - started < 0.5
    while compute.call(lambda: work["left"]):
        time.sleep(0.05)
    assert threads == {compute.ident}


def test_an_idle_loop_costs_no_steps():
    compute = ComputeThread()
    calls = []
    compute.add_loop(lambda: calls.append(1) and False)
    compute.call(lambda: None)
    before = len(calls)
    time.sleep(0.3)
    assert len(calls) == before  # it blocks on the task queue instead of spinning


def test_a_server_runs_every_forward_pass_on_its_compute_thread(tiny_model_dir):
    from finetune.config import GenerationSettings
    from finetune.engine.requests import GenerationStats
    from finetune.serving.server import ModelServer

    server = ModelServer(base_model=str(tiny_model_dir))
    seen: set[int] = set()
    # The embedding runs in every forward pass, ours (decoder.py) and transformers'.
    server.model.get_input_embeddings().register_forward_hook(lambda *_: seen.add(threading.get_ident()))
    settings = GenerationSettings(max_new_tokens=3, temperature=0)

    def ask() -> GenerationStats:
        stats = GenerationStats()
        "".join(server.generate("hello", settings=settings, stats=stats))
        return stats

    stats = [ask(), in_thread(ask)]
    assert seen == {server.compute.call(threading.get_ident)}
    assert all(s.output_token_count == 3 or s.stop_reason == "eos" for s in stats)


def test_a_server_used_from_its_own_compute_thread_drives_the_engine(tiny_model_dir):
    """Tools (the bench) run all their torch work on the server's compute thread; generate() there
    must step the engine itself instead of waiting for the thread it blocks."""
    from finetune.config import GenerationSettings
    from finetune.serving.server import ModelServer

    compute = ComputeThread()
    server = compute.call(lambda: ModelServer(base_model=str(tiny_model_dir), compute=compute))
    settings = GenerationSettings(max_new_tokens=5, temperature=0)
    inline = compute.call(
        lambda: "".join(server.generate("hello", settings=settings, prompt_template="none"))
    )
    assert inline == "".join(server.generate("hello", settings=settings, prompt_template="none"))
