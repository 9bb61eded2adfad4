"""The real Cog server under concurrent load on 127.0.0.1, at the concurrency the container gets
(`@concurrent(max=...)` on predict.py's run): every request succeeds with the output it gets alone,
none is refused while slots are free, extra clients are refused and succeed on retry, SSE streams
stay separate, the server's memory comes back, and prompts over the context fail with a reason."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from finetune.cog.cogtools import CogServer, iter_sse, post_sse, predictor_concurrency
from finetune.engine.scheduler import EngineLimits
from tests.conftest import SERVING_MODES

pytestmark = pytest.mark.integration

CONCURRENCY = predictor_concurrency()  # Cog's slots
BATCH = EngineLimits().max_batch  # requests decoded together
PROMPTS = [
    "Tell me something about alpacas.",
    "What is the capital of France?",
    "Name three colors.",
    "Give me one tip for learning to cook.",
]
# Memory may grow a little as glibc arenas and PyTorch's allocator settle on their working set
# (batches of different sizes, new threads); a leak per prediction grows without bound.
RSS_SLACK = 0.15
RSS_SLACK_BYTES = 200 << 20
# 64 requests: 8 clients keep the batch full for ~8 waves (200 took 105 s of the suite on an AVX2 CPU,
# 96 took 40 s).
PER_CLIENT = 8


def inputs(prompt: str, max_new_tokens: int = 6) -> dict:
    return {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0}


@dataclass
class LoadResult:
    sent: int = 0
    refused: int = 0  # HTTP 409 answers (each retried)
    outcomes: Counter[str] = field(default_factory=Counter)
    outputs: dict[tuple[int, int], tuple[str, str]] = field(
        default_factory=dict
    )  # (client, i) -> prompt, text
    wall_s: float = 0.0


def process_tree(pid: int) -> list[int]:
    """The server and its worker (coglet spawns the Python worker as a child)."""
    pids = [pid]
    for p in pids:
        for task in Path(f"/proc/{p}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss(server: CogServer) -> dict[int, int]:
    assert server.proc is not None
    return {pid: rss_bytes(pid) for pid in process_tree(server.proc.pid)}


def post(session: requests.Session, server: CogServer, body: dict) -> requests.Response:
    return session.post(f"{server.url}/predictions", json={"input": body}, timeout=300)


def text_of(resp: requests.Response) -> str:
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "succeeded", resp.text
    return "".join(body["output"])


def run_load(
    server: CogServer, n_clients: int, per_client: int, max_new_tokens: int = 6, retry_s: float = 0.1
) -> LoadResult:
    """n_clients threads, each sending per_client requests one after another (the next the moment
    the previous answer arrives); a 409 is counted and retried."""
    result = LoadResult()
    lock = threading.Lock()
    start = threading.Barrier(n_clients)

    def client(c: int) -> None:
        with requests.Session() as session:
            start.wait()
            for i in range(per_client):
                prompt = PROMPTS[(c + i) % len(PROMPTS)]
                with lock:
                    result.sent += 1
                while True:
                    try:
                        resp = post(session, server, inputs(prompt, max_new_tokens))
                    except requests.RequestException as exc:
                        outcome = f"lost: {type(exc).__name__}"
                        break
                    if resp.status_code == 409:
                        with lock:
                            result.refused += 1
                        time.sleep(retry_s)
                        continue
                    body = (
                        resp.json()
                        if resp.headers.get("content-type", "").startswith("application/json")
                        else {}
                    )
                    if resp.status_code == 200 and body.get("status") == "succeeded":
                        outcome = "succeeded"
                        with lock:
                            result.outputs[(c, i)] = (prompt, "".join(body["output"]))
                    else:
                        outcome = f"lost: HTTP {resp.status_code} {body.get('status')} {body.get('error')}"
                    break
                with lock:
                    result.outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.wall_s = time.monotonic() - started
    return result


@pytest.fixture(scope="module", params=["int8-compiled", "fp32-eager"])
def bare(request, tmp_path_factory, embedded_model_dir):
    """The production defaults (int8, compiled), and fp32 eager (what the in-process tests compare with)."""
    env = SERVING_MODES[request.param]
    server = CogServer("predict", log_path=tmp_path_factory.mktemp("load") / "cog.log", env=env)
    try:
        yield server.start(timeout=600)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def solo(bare) -> dict[tuple[str, int], str]:
    """Each prompt's greedy answer when it is the only request on the server."""
    out = {}
    with requests.Session() as session:
        for n in (6, 16, 48):
            for prompt in PROMPTS:
                out[(prompt, n)] = text_of(post(session, bare, inputs(prompt, n)))
    assert len({out[(p, 48)] for p in PROMPTS}) == len(PROMPTS)
    return out


def test_the_local_server_gets_the_containers_concurrency(bare):
    import predict

    assert CONCURRENCY > 1
    assert bare.env["COG_MAX_CONCURRENCY"] == str(CONCURRENCY)
    # The request thread pool is sized by predict.CONCURRENCY, which must follow the literal.
    assert predict.CONCURRENCY == CONCURRENCY


def test_8_clients_x_8_requests_all_succeed_unrefused_with_their_solo_outputs(bare, solo):
    assert BATCH == 8 and CONCURRENCY > BATCH
    with requests.Session() as session:  # warm up: allocator, batch shapes
        for prompt in PROMPTS:
            text_of(post(session, bare, inputs(prompt)))
    before = tree_rss(bare)

    result = run_load(bare, n_clients=BATCH, per_client=PER_CLIENT)

    after = tree_rss(bare)
    report = (
        f"{result.sent} sent in {result.wall_s:.1f} s by {BATCH} clients: {dict(result.outcomes)}, "
        f"{result.refused} refused (409); RSS MiB before {[b >> 20 for b in before.values()]} "
        f"after {[a >> 20 for a in after.values()]}"
    )
    print(report)
    assert result.sent == BATCH * PER_CLIENT and result.outcomes == {"succeeded": result.sent}, report
    # coglet 0.23.1 admits a request against slots it frees a moment after answering, and it
    # sometimes refuses one while most of its 32 slots are idle (measured: 0-1 in 200 at 16 or 32
    # slots, 31 at 8): nothing the predictor can change. More means capacity ran out.
    assert result.refused <= 2, report
    wrong = {k: v for k, v in result.outputs.items() if v[1] != solo[(v[0], 6)]}
    assert not wrong, f"{len(wrong)} outputs differ from their solo output: {list(wrong.items())[:3]}"
    assert bare.health()["status"] == "READY"
    assert sorted(after) == sorted(before), "the worker was restarted during the load"
    total_before, total_after = sum(before.values()), sum(after.values())
    assert total_after <= max(total_before * (1 + RSS_SLACK), total_before + RSS_SLACK_BYTES), report


def test_one_client_back_to_back_is_never_refused(bare, solo):
    # With one slot coglet answered before freeing it, so the very next request sometimes got 409.
    with requests.Session() as session:
        for i in range(50):
            prompt = PROMPTS[i % len(PROMPTS)]
            resp = post(session, bare, inputs(prompt, 2))
            assert resp.status_code == 200, f"request {i}: HTTP {resp.status_code} {resp.text}"
            assert resp.json()["status"] == "succeeded"


def test_clients_over_capacity_are_refused_then_succeed_on_retry(bare, solo):
    extra = 4
    result = run_load(bare, n_clients=CONCURRENCY + extra, per_client=1, max_new_tokens=16, retry_s=0.5)
    report = f"{dict(result.outcomes)}, {result.refused} refused (409) in {result.wall_s:.1f} s"
    print(report)
    assert result.outcomes == {"succeeded": CONCURRENCY + extra}, report
    assert sorted(result.outputs) == [(c, 0) for c in range(CONCURRENCY + extra)]
    assert all(text == solo[(prompt, 16)] for prompt, text in result.outputs.values()), report
    assert result.refused >= 1, report  # more clients than slots: some were refused at first


def sse(server: CogServer, body: dict, events: list, started: threading.Barrier) -> None:
    started.wait()
    for _ in range(50):  # a 409 from coglet's slot bookkeeping (see above) is retried, as clients do
        t0 = time.monotonic()
        resp = post_sse(server.url, body)
        if resp.status_code != 409:
            break
        time.sleep(0.1)
    if resp.status_code != 200:
        events.append((0.0, "http", {"status": resp.status_code, "body": resp.text}))
        return
    for name, data in iter_sse(resp):
        events.append((time.monotonic() - t0, name, data))


def test_concurrent_sse_streams_each_get_their_own_tokens_as_produced(bare, solo):
    streams: list[list] = [[] for _ in PROMPTS]
    barrier = threading.Barrier(len(PROMPTS))
    threads = [
        threading.Thread(target=sse, args=(bare, inputs(p, 48), streams[i], barrier))
        for i, p in enumerate(PROMPTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for prompt, events in zip(PROMPTS, streams, strict=True):
        names = [n for _, n, _ in events]
        assert names.count("output") >= 2 and names[-1] == "completed", names
        chunks = [d["chunk"] for _, n, d in events if n == "output"]
        assert "".join(chunks) == solo[(prompt, 48)]
        # Streamed, the chunks arrive spread over the decode; collected, in one burst at the end.
        # (Not against the time to first token: int8 decodes 48 tokens faster than 8 prompts prefill.)
        arrivals = [t for t, n, _ in events if n == "output"]
        spread, decode = arrivals[-1] - arrivals[0], events[-1][0] - arrivals[0]
        assert spread > 0.5 * decode, "the chunks came at the end, not as they were produced"
    # They ran at once: every stream had its first token before any stream completed.
    assert max(next(t for t, n, _ in e if n == "output") for e in streams) < min(e[-1][0] for e in streams)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt": "alpaca " * 9000}, "context is 8192 tokens: shorten the prompt"),
        ({"prompt": "alpaca " * 5000, "max_new_tokens": 4096}, "lower max_new_tokens to"),
    ],
    ids=["prompt-over-context", "prompt-plus-new-tokens-over-context"],
)
def test_over_the_context_fails_with_a_reason(bare, body, message):
    resp = requests.post(f"{bare.url}/predictions", json={"input": body}, timeout=120)
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "failed" and message in body["error"], body.get("error")
    assert "Traceback" not in body["error"]
    assert bare.health()["status"] == "READY"


def test_a_prompt_over_the_character_cap_is_422_before_any_work(bare):
    resp = requests.post(f"{bare.url}/predictions", json={"input": {"prompt": "a" * 400_001}}, timeout=60)
    assert resp.status_code == 422
    assert [d["loc"][-1] for d in resp.json()["detail"]] == ["prompt"]
