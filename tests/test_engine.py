"""The serving engine on a tiny in-process Llama: a request decoded in a batch gives what it gives
alone, whenever it joins; seeds stay per request; cancel, limits and the queue timeout act on one
request only; mixed adapters in one batch; a merged setup adapter switches exactly."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

from finetune.config import GenerationSettings
from finetune.data.encoding import encode_prompt
from finetune.engine.requests import Request
from finetune.engine.scheduler import Engine, EngineLimits

PROMPTS = [
    "What is two plus two?",
    "The capital of France is",
    "Alpacas live in the Andes. Give three tips for staying healthy, and explain each one.",
    "hi",
    "中国的首都是北京。",
]
GREEDY = GenerationSettings(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer


def run(engine: Engine, requests: list[Request], join_at: dict[int, int] | None = None) -> list[list[int]]:
    """Step the engine until every request is done; request i is submitted at step join_at[i]."""
    join_at = join_at or {}
    for i, r in enumerate(requests):
        if join_at.get(i, 0) == 0:
            engine.submit(r)
    step = 0
    while engine.busy or any(not r.done for r in requests):
        step += 1
        for i, r in enumerate(requests):
            if join_at.get(i, 0) == step:
                engine.submit(r)
        engine.step()
        assert step < 1000
    return [list(r.generated) for r in requests]


def solo(model, tokenizer, prompt: str, settings: GenerationSettings = GREEDY, **limits) -> list[int]:
    engine = Engine(model, tokenizer, EngineLimits(**limits))
    return run(engine, [Request(encode_prompt(tokenizer, prompt), settings)])[0]


def requests_for(tokenizer, prompts: list[str], settings: GenerationSettings = GREEDY) -> list[Request]:
    return [Request(encode_prompt(tokenizer, p), settings) for p in prompts]


def test_a_batch_gives_each_request_its_solo_output(tiny):
    model, tokenizer = tiny
    alone = [solo(model, tokenizer, p) for p in PROMPTS]
    assert len({tuple(a) for a in alone}) > 1  # the prompts lead to different outputs
    batched = run(Engine(model, tokenizer), requests_for(tokenizer, PROMPTS))
    assert batched == alone


def test_requests_that_join_and_leave_mid_decode_keep_their_solo_output(tiny):
    model, tokenizer = tiny
    lengths = [3, 12, 7, 12, 1]
    settings = [GenerationSettings(max_new_tokens=n, temperature=0) for n in lengths]
    alone = [solo(model, tokenizer, p, s) for p, s in zip(PROMPTS, settings, strict=True)]
    requests = [Request(encode_prompt(tokenizer, p), s) for p, s in zip(PROMPTS, settings, strict=True)]
    engine = Engine(model, tokenizer)
    got = run(engine, requests, join_at={1: 2, 2: 4, 3: 9, 4: 10})
    assert got == alone
    assert engine.batch.rows == [] and engine.batch.kv is None  # all KV memory let go


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny):
    model, tokenizer = tiny
    long_prompt = " ".join(PROMPTS * 6)
    assert len(encode_prompt(tokenizer, long_prompt)) > 100
    chunked = solo(model, tokenizer, long_prompt, prefill_chunk=16)
    assert chunked == solo(model, tokenizer, long_prompt, prefill_chunk=4096)

    engine = Engine(model, tokenizer, EngineLimits(prefill_chunk=16))
    short = Request(
        encode_prompt(tokenizer, PROMPTS[0]), GenerationSettings(max_new_tokens=40, temperature=0)
    )
    engine.submit(short)
    for _ in range(3):
        engine.step()
    tokens_before = len(short.generated)
    engine.submit(Request(encode_prompt(tokenizer, long_prompt), GREEDY))
    for _ in range(4):  # four chunks of the long prompt: the short request decodes at each step
        engine.step()
    assert len(short.generated) == tokens_before + 4


def test_seeds_are_per_request_whatever_else_is_in_the_batch(tiny):
    model, tokenizer = tiny
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=7)
    alone = solo(model, tokenizer, PROMPTS[0], sampled)
    others = requests_for(tokenizer, PROMPTS[1:], GenerationSettings(max_new_tokens=12, temperature=0.8))
    mine = Request(encode_prompt(tokenizer, PROMPTS[0]), sampled)
    got = run(Engine(model, tokenizer), [*others[:2], mine, *others[2:]])
    assert got[2] == alone
    assert alone != solo(model, tokenizer, PROMPTS[0], GREEDY)  # it did sample


@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-7])
def test_a_vanishing_temperature_decodes_greedily(tiny, temperature):
    # 1e-39 used to divide the fp32 logits into inf and fail the request (found by the API fuzzer).
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=12, temperature=temperature, seed=3)
    assert solo(model, tokenizer, PROMPTS[1], settings) == solo(model, tokenizer, PROMPTS[1])


def test_repetition_penalty_and_stop_sequences_hold_per_request(tiny):
    model, tokenizer = tiny
    penalised = GenerationSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.5)
    text = tokenizer.decode(solo(model, tokenizer, PROMPTS[1]), skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopping = GenerationSettings(max_new_tokens=12, temperature=0, stop_sequences=[stop])
    alone = [solo(model, tokenizer, PROMPTS[0], penalised), solo(model, tokenizer, PROMPTS[1], stopping)]
    assert alone[0] != solo(model, tokenizer, PROMPTS[0])
    ids = encode_prompt(tokenizer, PROMPTS[0])
    with torch.no_grad():  # the penalty as transformers applies it
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5, pad_token_id=0
        )
    assert (
        alone[0] == [t for t in out[0, len(ids) :].tolist() if t != tokenizer.eos_token_id][: len(alone[0])]
    )
    requests = [
        Request(encode_prompt(tokenizer, PROMPTS[0]), penalised),
        Request(encode_prompt(tokenizer, PROMPTS[1]), stopping),
        *requests_for(tokenizer, PROMPTS[2:]),
    ]
    engine = Engine(model, tokenizer)
    assert run(engine, requests)[:2] == alone
    streamed = "".join(requests[1].drain())
    assert requests[1].stats.stop_reason == "stop_sequence" and stop not in streamed
    assert text.startswith(streamed)


def test_cancelling_one_request_leaves_the_batch_within_a_step(tiny):
    model, tokenizer = tiny
    settings = GenerationSettings(max_new_tokens=30, temperature=0)
    alone = [solo(model, tokenizer, p, settings) for p in PROMPTS[:4]]
    requests = requests_for(tokenizer, PROMPTS[:4], settings)
    engine = Engine(model, tokenizer)
    for r in requests:
        engine.submit(r)
    for _ in range(6):
        engine.step()
    assert len(engine.batch.rows) == 4
    requests[1].cancel.set()
    engine.step()
    assert requests[1].done and requests[1].stats.stop_reason == "cancelled"
    assert requests[1] not in engine.batch.rows and len(engine.batch.rows) == 3
    cut = len(requests[1].generated)
    got = run(engine, [])
    assert got == [] and len(requests[1].generated) == cut
    assert [r.generated for i, r in enumerate(requests) if i != 1] == [
        a for i, a in enumerate(alone) if i != 1
    ]


def test_the_batch_bound_queues_the_rest(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, EngineLimits(max_batch=2))
    requests = requests_for(tokenizer, PROMPTS)
    for r in requests:
        engine.submit(r)
    most = 0
    while engine.step():
        most = max(most, len(engine.batch.rows) + (engine.prefilling is not None))
    assert most == 2  # a request being prefilled holds its row already
    assert [r.generated for r in requests] == [solo(model, tokenizer, p) for p in PROMPTS]


def test_the_kv_budget_bounds_the_batch_and_refuses_what_can_never_fit(tiny):
    model, tokenizer = tiny
    n = max(len(encode_prompt(tokenizer, p)) for p in PROMPTS[:2]) + GREEDY.max_new_tokens
    engine = Engine(model, tokenizer, EngineLimits(kv_tokens=n))
    fits = requests_for(tokenizer, PROMPTS[:2])
    too_big = Request(
        encode_prompt(tokenizer, PROMPTS[2]), GenerationSettings(max_new_tokens=n, temperature=0)
    )
    for r in [*fits, too_big]:
        engine.submit(r)
    most = 0
    while engine.step():
        most = max(most, len(engine.batch.rows))
    assert most == 1  # one row of n slots at a time
    assert all(r.stats.stop_reason in ("length", "eos") for r in fits)
    errors = [item for item in too_big.drain() if isinstance(item, BaseException)]
    assert too_big.stats.stop_reason == "error" and "KV cache slots" in str(errors[0])
    assert "lower max_new_tokens" in str(errors[0])


def test_a_request_that_cannot_start_in_time_fails_with_a_reason(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, EngineLimits(max_batch=1, queue_timeout_s=0.2))
    first, second = requests_for(tokenizer, PROMPTS[:2], GenerationSettings(max_new_tokens=30, temperature=0))
    engine.submit(first)
    engine.step()
    engine.submit(second)
    engine.step()
    time.sleep(0.3)  # the second is still queued behind the only row
    run(engine, [])
    assert first.stats.stop_reason in ("length", "eos")
    errors = [item for item in second.drain() if isinstance(item, BaseException)]
    assert second.stats.stop_reason == "error" and "at capacity" in str(errors[0])


# -- prompt heads: prefilled once, reused exactly; chunk boundaries fixed by the prompt ---------
def first_logits(engine: Engine, requests: list[Request]) -> list[torch.Tensor]:
    """Run the requests (all submitted at once) and return the logits each sampled its first token from."""
    seen: dict[int, torch.Tensor] = {}
    sample = engine._sample

    def record(r: Request, scores: torch.Tensor) -> int:
        seen.setdefault(id(r), scores.clone())
        return sample(r, scores)

    engine._sample = record  # type: ignore[method-assign]
    run(engine, requests)
    return [seen[id(r)] for r in requests]


def headed(tokenizer, tails: list[str], head_text: str) -> list[Request]:
    head = encode_prompt(tokenizer, head_text)
    requests = [Request(encode_prompt(tokenizer, head_text + t), GREEDY, head=len(head)) for t in tails]
    assert all(r.prompt_ids[: r.head] == head for r in requests)
    return requests


HEAD = "Below is an instruction that describes a task. Write a response that completes it.\n\n"
TAILS = ["What is two plus two?", "Give three tips for staying healthy.", "hi"]


def test_a_shared_prompt_head_is_prefilled_once_and_reused_bit_for_bit(tiny):
    model, tokenizer = tiny
    # Each request alone, on an engine with nothing cached: its head runs as a chunk of its own.
    cold = [first_logits(Engine(model, tokenizer), [r])[0] for r in headed(tokenizer, TAILS, HEAD)]
    engine = Engine(model, tokenizer)
    requests = headed(tokenizer, TAILS, HEAD)
    warm = [first_logits(engine, [r])[0] for r in requests]
    assert engine.prefixes.hits == 2  # the second and the third took the first one's head
    assert engine.prefixes.held == requests[0].head and len(engine.prefixes.entries) == 1
    assert all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
    assert [r.generated for r in requests] == [
        run(Engine(model, tokenizer), [r])[0] for r in headed(tokenizer, TAILS, HEAD)
    ]
    # Another adapter state (the server's tag) does not share the head.
    engine.prefix_tag = lambda adapter: "other weights"
    first_logits(engine, headed(tokenizer, TAILS[:1], HEAD))
    assert engine.prefixes.hits == 2 and len(engine.prefixes.entries) == 2


def test_the_head_cache_is_bounded_and_can_be_turned_off(tiny):
    model, tokenizer = tiny
    heads = [HEAD, "Answer the question below in one sentence, as briefly as you can.\n\n"]
    sizes = [len(encode_prompt(tokenizer, h)) for h in heads]
    engine = Engine(model, tokenizer, EngineLimits(prefix_tokens=max(sizes)))
    for h in heads:
        run(engine, headed(tokenizer, TAILS[:1], h))
    assert [k[2] for k in engine.prefixes.entries] == [sizes[1]]  # the older head made room
    assert engine.prefixes.held == sizes[1]
    engine.prefixes.forget()
    assert engine.prefixes.held == 0 and not engine.prefixes.entries

    off = Engine(model, tokenizer, EngineLimits(prefix_tokens=0))
    run(off, headed(tokenizer, TAILS, HEAD))
    assert off.prefixes.hits == 0 and not off.prefixes.entries


def test_a_long_shared_context_is_reused_chunk_by_chunk_bit_for_bit(tiny):
    """Past the head, a prompt's chunks are cached too: a second question about the same long
    context prefills only from the last chunk boundary both prompts share."""
    model, tokenizer = tiny
    limits = EngineLimits(prefill_chunk=16)
    context = " ".join(PROMPTS) + "\n\n"
    tails = [context + "Which city is named?", context + "What do alpacas eat?"]
    cold = [first_logits(Engine(model, tokenizer, limits), [r])[0] for r in headed(tokenizer, tails, HEAD)]
    engine = Engine(model, tokenizer, limits)
    prefilled: list[int] = []
    prefill = engine._prefill_chunk
    engine._prefill_chunk = lambda n: (prefilled.append(n), prefill(n))[1]  # type: ignore[method-assign]
    first, second = headed(tokenizer, tails, HEAD)
    warm = first_logits(engine, [first]) + first_logits(engine, [second])
    assert all(torch.equal(a, b) for a, b in zip(cold, warm, strict=True))
    assert [first.generated, second.generated] == [
        run(Engine(model, tokenizer, limits), [r])[0] for r in headed(tokenizer, tails, HEAD)
    ]
    ends = [engine._boundaries(r) for r in (first, second)]
    shared = max(e for e in ends[1] if e in ends[0] and first.prompt_ids[:e] == second.prompt_ids[:e])
    assert shared >= first.head + 2 * limits.prefill_chunk  # the head and at least two chunks after it
    assert sum(prefilled) == len(first.prompt_ids) + len(second.prompt_ids) - shared
    assert engine.prefixes.hits == 1
    # One entry per chunk, each holding its own columns only.
    assert len(engine.prefixes.entries) == len(set(ends[0] + ends[1]))
    assert engine.prefixes.held == ends[0][-1] + ends[1][-1] - shared


def test_the_first_chunks_of_a_prefix_are_kept_longest(tiny):
    model, tokenizer = tiny
    text = " ".join(PROMPTS)
    prompt = headed(tokenizer, [text], HEAD)[0]
    ends = Engine(model, tokenizer, EngineLimits(prefill_chunk=8))._boundaries(prompt)
    assert len(ends) >= 4
    limits = EngineLimits(prefill_chunk=8, prefix_tokens=ends[2])
    engine = Engine(model, tokenizer, limits)
    run(engine, [prompt])
    # Room for the head and two chunks: the later chunks made way, not the start they extend.
    assert sorted(k[2] for k in engine.prefixes.entries) == ends[:3]
    assert engine.prefixes.held == ends[2]
    reused = first_logits(engine, headed(tokenizer, [text], HEAD))[0]
    assert engine.prefixes.hits == 1
    assert torch.equal(
        reused, first_logits(Engine(model, tokenizer, limits), headed(tokenizer, [text], HEAD))[0]
    )


def test_a_prompts_chunks_do_not_depend_on_what_else_is_prefilled(tiny):
    """With a 32-token budget a step, a long prompt behind a short one used to start with the 23
    tokens left of the step: other matmul shapes than alone, so other cache bits."""
    model, tokenizer = tiny
    long_prompt = " ".join(PROMPTS * 3)
    assert len(encode_prompt(tokenizer, long_prompt)) > 64
    alone = first_logits(
        Engine(model, tokenizer, EngineLimits(prefill_chunk=32)), requests_for(tokenizer, [long_prompt])
    )
    engine = Engine(model, tokenizer, EngineLimits(prefill_chunk=32))
    behind = first_logits(engine, requests_for(tokenizer, ["hi there", long_prompt]))
    assert torch.equal(alone[0], behind[1])


# -- the server: adapters in one batch, exact switching ---------------------------------------
def make_adapter(
    model_dir: Path,
    folder: Path,
    seed: int,
    r: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    dora: bool = False,
) -> Path:
    """A LoRA adapter with random, non-zero B (a fresh LoRA is a no-op), saved like ours."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, use_dora=dora
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=i) for i in range(3)]


def serve(server, prompt: str, lora: str | None = None, settings: GenerationSettings = GREEDY) -> str:
    return "".join(server.generate(prompt, settings=settings, prompt_template="none", lora_weights=lora))


def outcomes_together(server, asks: list[tuple[str, str | None]]) -> list[str | BaseException]:
    """Send every request at once from its own thread (they decode in one batch); each request's
    text, or the exception it raised."""
    out: list[str | BaseException | None] = [None] * len(asks)
    barrier = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        barrier.wait()
        try:
            out[i] = serve(server, *asks[i])
        except Exception as exc:  # kept for the caller, not left to the thread's excepthook
            out[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(o is not None for o in out), "a request did not finish in 120 s"
    return out  # type: ignore[return-value]


def together(server, asks: list[tuple[str, str | None]]) -> list[str]:
    out = outcomes_together(server, asks)
    failed = [o for o in out if isinstance(o, BaseException)]
    assert not failed, f"{len(failed)} requests failed, the first with {failed[0]!r}"
    return out  # type: ignore[return-value]


def test_mixed_adapters_in_one_batch_match_each_alone(tiny_model_dir, adapters, monkeypatch):
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    asks = [(PROMPTS[1], str(a)) for a in adapters] + [(PROMPTS[1], None), (PROMPTS[3], None)]
    alone = [serve(server, *ask) for ask in asks]
    assert len(set(alone[:4])) == 4  # each adapter changes the text
    seen_batches: list[list[str | None]] = []
    prepare = server.engine.prepare
    server.engine.prepare = lambda names: (seen_batches.append(list(names)), prepare(names))[1]
    assert together(server, asks) == alone
    assert max(len(set(b)) for b in seen_batches) >= 3  # different adapters did share a forward pass


@pytest.mark.parametrize(
    "dtype, quantization, read_back",
    [
        ("float32", "none", True),
        ("bfloat16", "none", True),
        ("float32", "int8", True),
        ("float32", "none", False),
    ],
)
def test_a_merged_setup_adapter_switches_exactly(
    tiny_model_dir, adapters, dtype, quantization, read_back, monkeypatch
):
    """Setup adapter merged -> a per-request adapter (unmerge) -> setup only again (merge) -> ...:
    the base weights are the loaded ones after every switch, bit for bit, and each adapter's text
    stays the same; with int8 decoding, so are the int8 copies the kernel reads. Undone from the
    checkpoint's files (CPU) or from a copy kept beside the weights (what a GPU does)."""
    from finetune.engine.quant import base_linears
    from finetune.serving import server as server_module
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    made: list[server_module.BaseWeights] = []
    real = server_module.BaseWeights

    def base_weights_as(base_path, model, **_):
        made.append(real(base_path, model, read_back=read_back))
        return made[-1]

    monkeypatch.setattr(server_module, "BaseWeights", base_weights_as)
    fresh = ModelServer(base_model=str(tiny_model_dir), dtype=dtype, quantization=quantization)
    base = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    server = ModelServer(
        base_model=str(tiny_model_dir), adapter=str(adapters[0]), dtype=dtype, quantization=quantization
    )
    assert server.merged
    setup_text = serve(server, PROMPTS[0])
    other_text = serve(server, PROMPTS[0], str(adapters[1]))
    assert not server.merged
    for _ in range(3):
        assert serve(server, PROMPTS[0]) == setup_text
        assert server.merged  # only the setup adapter in use: merged again
        assert serve(server, PROMPTS[0], str(adapters[1])) == other_text

    def base_weights() -> dict[str, torch.Tensor]:
        return {
            n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in server.model.named_parameters()
            if "lora_" not in n
        }

    assert not server.merged
    now = server.compute.call(base_weights)
    assert now.keys() == base.keys()
    assert all(torch.equal(now[n], base[n]) for n in base)
    fresh_int8 = [layer.qweight for layer in base_linears(fresh.model) if hasattr(layer, "qweight")]
    now_int8 = [layer.qweight for layer in base_linears(server.model) if hasattr(layer, "qweight")]
    assert len(now_int8) == len(fresh_int8) == (15 if quantization == "int8" else 0)  # 2 x 7 + head
    assert all(torch.equal(a, b) for a, b in zip(now_int8, fresh_int8, strict=True))
    assert len(made) == 1 and bool(made[0].files) == read_back and bool(made[0].copies) != read_back


def test_the_adapter_cache_evicts_the_least_recently_used_idle_adapter(tiny_model_dir, adapters, monkeypatch):
    from finetune.serving.adapter_cache import adapter_key
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32", cache_size=2)
    first = [serve(server, PROMPTS[1], str(a)) for a in adapters]  # three adapters, room for two
    resident = server.compute.call(lambda: set(server.model.peft_config))
    assert resident == {adapter_key(str(adapters[1])), adapter_key(str(adapters[2]))}
    assert serve(server, PROMPTS[1], str(adapters[0])) == first[0]  # loaded again, same text
    assert list(server.adapters.loaded) == [adapter_key(str(adapters[2])), adapter_key(str(adapters[0]))]


def test_the_server_prefills_a_templates_head_once_per_adapter(tiny_model_dir, adapters, monkeypatch):
    """Requests through a template share its head (the text before the instruction): the warm-up
    caches the default template's head for the base, an adapter gets its own on first use, an
    evicted adapter's heads go with it; a reused head gives the text a freshly prefilled one gives."""
    from finetune.data.prompts import AUTO, PromptTemplate
    from finetune.serving.adapter_cache import adapter_key
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32", cache_size=1)
    cache = server.engine.prefixes

    def ask(prompt: str, lora: str | None = None, input: str = "") -> str:
        return "".join(
            server.generate(prompt, input, settings=GREEDY, prompt_template="alpaca", lora_weights=lora)
        )

    def owners() -> list[str | None]:
        return [key[0] for key in cache.entries]

    default = server.resolve_template(AUTO, None)  # the warm-up's: the head requests get by default
    assert owners() == ([None] if server._encode("Hello", "", default)[1] else []) and cache.hits == 0
    server.compute.call(cache.forget)
    # A template with next to nothing before the instruction has no head worth a chunk of its own.
    bare = PromptTemplate(
        "bare", prompt_input="Q: {instruction} {input}\nA:", prompt_no_input="Q: {instruction}\nA:"
    )
    assert server._encode(PROMPTS[0], "", bare)[1] == 0
    texts = [ask(p) for p in PROMPTS[:3]]
    assert cache.hits == 2 and owners() == [None]
    server.compute.call(cache.forget)
    assert [ask(p) for p in PROMPTS[:3]] == texts  # prefilled afresh: the same texts
    assert cache.hits == 4

    first, second = (adapter_key(str(a)) for a in adapters[:2])
    on_first = ask(PROMPTS[0], str(adapters[0]))
    assert on_first != texts[0] and cache.hits == 4  # the base's head is not the adapter's
    assert ask(PROMPTS[0], str(adapters[0])) == on_first and cache.hits == 5
    assert owners() == [first]  # the base's head went when the base was wrapped in LoRA layers
    ask(PROMPTS[0], input="Be brief.")  # the template's other form has another head
    assert owners() == [first, None] and cache.hits == 5
    ask(PROMPTS[0], str(adapters[1]))  # room for one adapter: the first is evicted, with its head
    assert first not in owners() and second in owners()
    assert ask(PROMPTS[0], str(adapters[0])) == on_first  # loaded again, its head prefilled again
    assert cache.hits == 5


def test_the_server_answers_questions_after_a_shared_context_from_its_cached_chunks(
    tiny_model_dir, monkeypatch
):
    """Through the server's template: the context at the start of the instruction, questions after
    it. The second question reuses the first one's chunks and gets the text a cold server gives."""
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("PREFILL_CHUNK_TOKENS", "16")
    context = " ".join(PROMPTS * 2) + "\n\nQuestion: "
    questions = ["Which city is named?", "What do alpacas eat?"]

    def ask(server: ModelServer, question: str) -> str:
        return "".join(server.generate(context + question, settings=GREEDY, prompt_template="alpaca"))

    warm = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    cache = warm.engine.prefixes
    hits, texts = cache.hits, [ask(warm, q) for q in questions]
    # The warm-up primed the default template (the base's chat template), not Alpaca: the first
    # question prefills Alpaca's head and the context, the second reuses both in one hit.
    assert cache.hits == hits + 1
    assert max(key[2] for key in cache.entries) > 2 * 16  # chunks past the head are held
    monkeypatch.setenv("PREFIX_CACHE_TOKENS", "0")
    cold = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    assert [ask(cold, q) for q in questions] == texts


def test_an_adapter_with_a_broken_config_is_refused_with_a_reason(
    tiny_model_dir, adapters, tmp_path, monkeypatch
):
    import shutil

    from finetune.model.loading import ModelError
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    for i, (config, reason) in enumerate(
        [('{"r": 4,', "adapter_config.json is not valid JSON"), ("[4]", "must hold a JSON object")]
    ):
        bad = shutil.copytree(adapters[0], tmp_path / f"bad{i}")
        (bad / "adapter_config.json").write_text(config)
        with pytest.raises(ModelError, match=reason):
            serve(server, PROMPTS[1], str(bad))
        assert not any(server.workdir.iterdir())  # nothing of it kept
    assert serve(server, PROMPTS[1], str(adapters[0])) == serve(server, PROMPTS[1], str(adapters[0]))


def test_an_adapter_cache_of_size_zero_still_serves_each_request(tiny_model_dir, adapters, monkeypatch):
    from finetune.serving.server import ModelServer

    monkeypatch.setenv("ALLOW_LOCAL_LORA_WEIGHTS", "1")
    cached = ModelServer(base_model=str(tiny_model_dir), dtype="float32")
    expected = [serve(cached, PROMPTS[1], str(a)) for a in adapters[:2]]
    server = ModelServer(base_model=str(tiny_model_dir), dtype="float32", cache_size=0)
    assert [serve(server, PROMPTS[1], str(a)) for a in adapters[:2]] == expected
    assert len(server.adapters.loaded) == 0
    assert server.compute.call(lambda: set(getattr(server.model, "peft_config", {}))) == set()


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("MAX_BATCH_SIZE", "eight", "MAX_BATCH_SIZE='eight': use a whole number >= 1"),
        ("KV_CACHE_TOKENS", "0", "KV_CACHE_TOKENS='0': use a whole number >= 1"),
        ("ADAPTER_CACHE_SIZE", "-1", "ADAPTER_CACHE_SIZE='-1': use a whole number >= 0"),
        ("QUEUE_TIMEOUT_S", "soon", "QUEUE_TIMEOUT_S='soon': use a number >= 0"),
    ],
)
def test_bad_serving_settings_stop_setup_with_the_variables_name(
    tiny_model_dir, monkeypatch, name, value, message
):
    from finetune.model.loading import ModelError
    from finetune.serving.server import ModelServer

    monkeypatch.setenv(name, value)
    with pytest.raises(ModelError, match=re.escape(message)):
        ModelServer(base_model=str(tiny_model_dir))


def test_serving_settings_from_the_environment_reach_the_engine(tiny_model_dir, monkeypatch):
    from finetune.serving.server import ModelServer

    for name, value in {
        "MAX_BATCH_SIZE": "3",
        "KV_CACHE_TOKENS": "999",
        "PREFILL_CHUNK_TOKENS": "32",
    }.items():
        monkeypatch.setenv(name, value)
    limits = ModelServer(base_model=str(tiny_model_dir)).engine.limits
    assert (limits.max_batch, limits.kv_tokens, limits.prefill_chunk) == (3, 999, 32)
