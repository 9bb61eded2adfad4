"""The CUDA-graph decode step (cuda_graphs.py). On a CPU its static step runs without graphs
(`capture=False`): the same buffers, buckets, pool and adoption a GPU records, checked against the
eager step (logits, and tokens alone and in padded batches that cross column buckets). With a CUDA
GPU the same checks run with graphs recorded, through ModelServer."""

from __future__ import annotations

import pytest
import torch

from finetune.config import GenerationSettings
from finetune.data.encoding import encode_prompt
from finetune.engine import cpu_compile, cuda_graphs
from finetune.engine.decoder import KV
from finetune.engine.requests import Request
from finetune.engine.scheduler import Engine, EngineLimits
from finetune.serving.server import ModelServer
from tests.test_compiled import PROMPTS, run, tiny


def cuda(test):
    """A test that needs a CUDA GPU: deselected by default (-m gpu runs it), skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


GREEDY80 = GenerationSettings(max_new_tokens=80, temperature=0)  # past the 64-column bucket


def teacher_forced(model, tokenizer, steps: list[cuda_graphs.GraphStep], n: int = 75):
    """Prefill three left-padded rows, then `n` decode steps fed the eager step's greedy tokens:
    per step, the eager logits and each GraphStep's, each over its own copy of the cache."""
    decoder = Engine(model, tokenizer, EngineLimits()).decoder()
    device = next(model.parameters()).device
    lengths, width = [5, 9, 2], 9
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, width), device=device)
    mask = torch.tensor([[c >= width - k for c in range(width)] for k in lengths], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = []
    with torch.inference_mode():
        caches = [KV(width) for _ in range(len(steps) + 1)]
        for kv in caches:
            decoder.forward(ids, positions, kv, mask)
        last = torch.tensor([[7], [8], [9]], device=device)
        for _ in range(n):
            pos = mask.sum(1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
            want = decoder.forward(last, pos, caches[0], mask)
            got = [
                step.forward(decoder, last, pos, kv, mask) for step, kv in zip(steps, caches[1:], strict=True)
            ]
            out.append((want, got))
            last = want.argmax(-1, keepdim=True)
    return out


def test_bucket_sizes():
    assert [cuda_graphs._bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    assert cuda_graphs._bucket(10, 64) == 64 and cuda_graphs._bucket(65, 64) == 128
    step = cuda_graphs.GraphStep(6, capture=False)
    assert [step.row_bucket(n) for n in (1, 3, 5, 6)] == [1, 4, 6, 6]


def test_static_step_gives_the_eager_logits_over_padding_buckets_and_pool_growth(tiny_model_dir):
    model, tokenizer = tiny(tiny_model_dir, "none")
    step = cuda_graphs.GraphStep(8, capture=False)
    # Columns 10..84: buckets 64 then 128 (the pool grows once); three rows run as four.
    for want, (got,) in teacher_forced(model, tokenizer, [step]):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert step.steps == 75 and step.columns == 128
    assert set(step.graphs) == {(4, 128)}  # growing the pool dropped the 64-column graph


def test_engine_tokens_alone_and_batched_match_eager_decoding(tiny_model_dir):
    model, tokenizer = tiny(tiny_model_dir, "none")
    eager = Engine(model, tokenizer, EngineLimits())
    want = [run(eager, tokenizer, [p], GREEDY80)[0] for p in PROMPTS]
    engine = Engine(model, tokenizer, EngineLimits())
    engine.compiled = step = cuda_graphs.GraphStep(engine.limits.max_batch, capture=False)
    alone = [run(engine, tokenizer, [p], GREEDY80)[0] for p in PROMPTS]
    assert alone == want
    assert max(len(t) for t in alone) > 64 and (1, 128) in step.graphs
    # Rows joining and leaving (adopted into the pool again each time), with left padding.
    assert run(engine, tokenizer, PROMPTS, GREEDY80) == alone
    assert any(rows == 4 for rows, _ in step.graphs)


def test_the_pool_stays_within_the_kv_budget_and_longer_steps_decode_eagerly(tiny_model_dir, capsys):
    model, tokenizer = tiny(tiny_model_dir, "none")
    eager = Engine(model, tokenizer, EngineLimits())
    want = [run(eager, tokenizer, [p], GREEDY80)[0] for p in PROMPTS]
    engine = Engine(model, tokenizer, EngineLimits())
    # One row of 64 columns fits; the 128-column bucket (and 4 rows of 64) do not.
    engine.compiled = step = cuda_graphs.GraphStep(engine.limits.max_batch, capture=False, pool_tokens=100)
    alone = [run(engine, tokenizer, [p], GREEDY80)[0] for p in PROMPTS]
    assert alone == want and max(len(t) for t in alone) > 64
    assert 0 < step.steps < sum(len(t) for t in alone)  # the short context ran the static step
    assert set(step.graphs) == {(1, 64)} and step.pool_rows * step.columns <= 100
    assert run(engine, tokenizer, PROMPTS, GREEDY80) == alone  # batches: eager, same tokens
    assert step.pool_rows * step.columns <= 100
    assert "over the KV budget of 100 slots" in capsys.readouterr().err


def test_out_of_memory_in_the_static_step_drops_its_pool_and_decodes_eagerly(tiny_model_dir, capsys):
    model, tokenizer = tiny(tiny_model_dir, "none")
    want = run(Engine(model, tokenizer, EngineLimits()), tokenizer, PROMPTS[:1], GREEDY80)
    engine = Engine(model, tokenizer, EngineLimits())
    engine.compiled = step = cuda_graphs.GraphStep(engine.limits.max_batch, capture=False)
    real, failed = step._step, []

    def step_or_oom(decoder, g, rows, columns):
        if columns == 128 and not failed:
            failed.append(columns)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return real(decoder, g, rows, columns)

    step._step = step_or_oom
    assert run(engine, tokenizer, PROMPTS[:1], GREEDY80) == want  # the request never saw the error
    assert failed == [128] and step.pool_tokens == 64  # half the 128-slot pool that failed
    assert not step.pool_k and step.columns == 0
    assert "out of GPU memory for a pool of 128 slots" in capsys.readouterr().err
    # A short request afterwards runs the static step again, within the lowered limit.
    before = step.steps
    assert run(engine, tokenizer, PROMPTS[1:2]) == run(
        Engine(model, tokenizer, EngineLimits()), tokenizer, PROMPTS[1:2]
    )
    assert step.steps > before and step.columns == 64


def test_a_failed_pool_allocation_never_leaves_a_raised_column_count(tiny_model_dir, monkeypatch):
    model, tokenizer = tiny(tiny_model_dir, "none")
    engine = Engine(model, tokenizer, EngineLimits())
    engine.compiled = step = cuda_graphs.GraphStep(engine.limits.max_batch, capture=False)
    run(engine, tokenizer, PROMPTS[1:2])
    assert step.columns == 64 and step.graphs
    real, tried = torch.Tensor.new_zeros, []

    def no_memory(self, *args, **kwargs):
        if args and args[0][0] == 128:
            tried.append(args[0])
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", no_memory)
    want = run(Engine(model, tokenizer, EngineLimits()), tokenizer, PROMPTS[:1], GREEDY80)
    assert run(engine, tokenizer, PROMPTS[:1], GREEDY80) == want
    # The growth to 128 columns failed: no pool claims columns it does not have, no graph is left
    # reading the old one, and later pools stay under the size that failed.
    assert tried and step.columns == 0 and not step.pool_k and not step.graphs and step.pool_tokens == 64


class _OutOfMemoryOnce:
    """A fast step whose first call fails as a GPU allocation would, then declines (eager)."""

    def __init__(self) -> None:
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return None


def test_an_out_of_memory_request_fails_alone_with_a_clear_error_and_the_next_is_served(tiny_model_dir):
    model, tokenizer = tiny(tiny_model_dir, "none")
    want = run(Engine(model, tokenizer, EngineLimits()), tokenizer, PROMPTS[:1])
    engine = Engine(model, tokenizer, EngineLimits())
    engine.compiled = _OutOfMemoryOnce()
    first = engine.submit(Request(encode_prompt(tokenizer, PROMPTS[0]), GREEDY80))
    while engine.step():
        pass
    assert first.done and first.stats.stop_reason == "error"
    error = first.outbox.get_nowait()
    while isinstance(error, str):
        error = first.outbox.get_nowait()
    assert "ran out of memory for this request" in str(error) and "KV_CACHE_TOKENS" in str(error)
    assert run(engine, tokenizer, PROMPTS[:1]) == want


def test_per_request_adapters_run_eagerly_and_moved_weights_drop_the_graphs(
    tiny_model_dir, tmp_path, monkeypatch
):
    from tests.test_engine import make_adapter

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    setup = make_adapter(tiny_model_dir, tmp_path / "setup", seed=1)
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=2)
    settings = GenerationSettings(max_new_tokens=16, temperature=0)
    eager = ModelServer(base_model=str(tiny_model_dir), adapter=str(setup), dtype="float32")
    server = ModelServer(base_model=str(tiny_model_dir), adapter=str(setup), dtype="float32")
    step = cuda_graphs.GraphStep(server.engine.limits.max_batch, capture=False)
    server.compute.call(setattr, server.engine, "compiled", step)
    merged = "".join(server.generate(PROMPTS[0], settings=settings))
    assert merged == "".join(eager.generate(PROMPTS[0], settings=settings)) and step.graphs
    # An unmerged adapter: the static step does not cover it (forward returns None: eager).
    mine = "".join(server.generate(PROMPTS[0], settings=settings, lora_weights=str(other)))
    assert mine == "".join(eager.generate(PROMPTS[0], settings=settings, lora_weights=str(other)))
    assert mine != merged
    # Weights replaced by new tensors (one fused with its neighbours, one not): graphs recorded for
    # the old ones must not replay.
    recorded = dict(step.graphs)
    for s in (server, eager):
        attn = s.model.get_base_model().model.layers[0].self_attn
        for name in ("k_proj", "o_proj"):
            base = getattr(attn, name)
            base = base.get_base_layer() if hasattr(base, "get_base_layer") else base
            torch.manual_seed(3)
            base.weight.data = torch.randn_like(base.weight) * 0.5
    again = "".join(server.generate(PROMPTS[0], settings=settings))
    assert all(step.graphs.get(k) is not g for k, g in recorded.items())
    assert again == "".join(eager.generate(PROMPTS[0], settings=settings)) != merged


# -- on a CUDA GPU: the graphs themselves ---------------------------------------------------------
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_compute_the_static_step_and_track_the_eager_one(tiny_model_dir, dtype):
    model, tokenizer = tiny(tiny_model_dir, "none")
    model = model.to("cuda", dtype)
    graphs, static = cuda_graphs.GraphStep(8, capture=True), cuda_graphs.GraphStep(8, capture=False)
    worst_replay = worst_eager = 0.0
    for want, (replayed, plain) in teacher_forced(model, tokenizer, [graphs, static]):
        scale = float(want.abs().max())
        worst_replay = max(worst_replay, float((replayed - plain).abs().max()) / scale)
        worst_eager = max(worst_eager, float((plain - want).abs().max()) / scale)
    assert graphs.steps == 75 and all(g.graph is not None for g in graphs.graphs.values())
    assert set(graphs.graphs) == {(4, 128)}  # the 64-column graph was dropped when the pool grew
    # A replay runs the recorded kernels on the same inputs as the unrecorded step: the same numbers.
    assert worst_replay <= 1e-5, worst_replay
    # The eager step attends without a mask over fewer columns (another kernel): rounding only.
    assert worst_eager <= (1e-4 if dtype == torch.float32 else 3e-2), worst_eager


@cuda
def test_the_default_server_on_a_gpu_decodes_through_graphs(tiny_model_dir, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from finetune.engine.requests import GenerationStats

    monkeypatch.setenv(cpu_compile.COMPILE_ENV, "auto")
    server = ModelServer(base_model=str(tiny_model_dir), device="cuda")
    step = server.engine.compiled
    assert isinstance(step, cuda_graphs.GraphStep) and step.capture and step.graphs  # recorded in setup
    before = step.steps
    stats = [GenerationStats() for _ in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(
            pool.map(lambda p, st: "".join(server.generate(p, settings=GREEDY80, stats=st)), PROMPTS, stats)
        )
    assert all(texts) and step.steps - before >= max(s.output_token_count for s in stats) - 1
    assert all(s.stop_reason in ("length", "eos") for s in stats)
    # Cancel on the graph path: the other requests go on as before.
    alone = "".join(server.generate(PROMPTS[1], settings=GREEDY80))
    chunks = server.generate(PROMPTS[0], settings=GenerationSettings(max_new_tokens=200, temperature=0))
    next(chunks)
    chunks.close()
    assert "".join(server.generate(PROMPTS[1], settings=GREEDY80)) == alone
    assert not server.engine.busy
