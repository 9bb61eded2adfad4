"""Serving many clients through the real Cog server, in one process that runs the servers and the
clients (threads sending SSE requests back to back).

    python -m bench.serve_worker SPEC.json OUT.json

For 1, 2, 4 and 8 clients it measures aggregate output tokens/s, p50/p95 time to first token (the
first SSE output event, from sending the request) and p50/p95 time per output token after the
first, in three set-ups:

* baseline: one prediction at a time, fp32, eager (COG_MAX_CONCURRENCY=1, SERVE_QUANT=none,
  SERVE_COMPILE=off: the server before the engine; clients retry a 409 after 50 ms), the setup
  adapter merged;
* ours, setup adapter: the defaults (int8 weights and the compiled decode step on a CPU), every
  request on the merged setup adapter;
* ours, 4 adapters: a bare server, requests spread round-robin over 4 `lora_weights` adapters
  (data URIs, warm in the adapter cache), decoding in mixed batches;
* ours, bf16: the setup-adapter case with SERVE_DTYPE=bfloat16 (AMX runs a matmul of 8 rows about as
  fast as one, where fp32's small-batch kernels slow down);
* ours, fp32: the setup-adapter case with SERVE_QUANT=none (fp32 weights, compiled);
* ours, no head cache: the setup-adapter case with PREFIX_CACHE_TOKENS=0 (every prompt prefills its
  template's head again): what reusing heads is worth to time to first token.

Each case first sends each distinct request alone; `same_as_solo` is the share of the loaded
requests whose greedy text equals that (1.0 is exact batching), `same_as_fp32` compares with the
baseline's solo texts."""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import ALPACA, load_avg, log, read_json, write_json

PROMPTS = [
    "Write a long story about an alpaca who travels around the world, country by country.",
    "Explain how a bicycle works to a ten-year-old.",
    "List ten facts about the Andes mountains.",
    "Describe a day in the life of a lighthouse keeper.",
]
RETRY_S = 0.05


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def post_accepted(url: str, body: dict[str, Any]) -> tuple[Any, float, int]:
    """POST a prediction for SSE, again after RETRY_S while Cog answers 409 (busy: Cog's clients are
    expected to retry, and coglet frees a slot a moment after it answers the prediction in it):
    the response, when the accepted request was sent, and how many were refused."""
    from finetune.cog.cogtools import post_sse

    refused = 0
    while True:
        sent = time.perf_counter()
        resp = post_sse(url, body, timeout=600)
        if resp.status_code != 409:
            return resp, sent, refused
        resp.close()
        refused += 1
        time.sleep(RETRY_S)


def one_request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    from finetune.cog.cogtools import iter_sse

    resp, sent, refused = post_accepted(url, body)
    stamps: list[float] = []
    chunks: list[str] = []
    status, tokens = None, 0
    for name, data in iter_sse(resp):
        if name == "output":
            stamps.append(time.perf_counter())
            chunks.append(data["chunk"])
        elif name == "completed":
            status = data["status"]
            tokens = data.get("metrics", {}).get("output_token_count", len(stamps))
    if status != "succeeded" or not stamps:
        raise RuntimeError(f"prediction ended {status} with {len(stamps)} chunks")
    return {
        "ttft_s": stamps[0] - sent,
        "tpot_s": (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
        "refused": refused,
        "text": "".join(chunks),
    }


def load(
    url: str, clients: int, per_client: int, body_for: Any, solo: dict[int, str] | None = None
) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(per_client):
            index = c * per_client + i
            try:
                r = one_request(url, body_for(index))
                r["key"] = index % len(PROMPTS)
            except Exception as exc:  # reported, not hidden: a failed request fails the case
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] * 1000 for r in results]
    tpot = [r["tpot_s"] * 1000 for r in results if r["tpot_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "refused_409": sum(r["refused"] for r in results),
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2),
        "ttft_ms_p50": round(statistics.median(ttft), 1) if ttft else None,
        "ttft_ms_p95": round(percentile(ttft, 0.95), 1) if ttft else None,
        "tpot_ms_p50": round(statistics.median(tpot), 1) if tpot else None,
        "tpot_ms_p95": round(percentile(tpot, 0.95), 1) if tpot else None,
        "texts_raw": [(r["key"], r["text"]) for r in results],
    }


def variant_adapters(adapter_dir: Path, dest: Path, n: int) -> list[Path]:
    """n different adapters of the same shape: the given one with lora_B scaled per copy."""
    import shutil

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = []
    for i in range(n):
        folder = dest / f"adapter-{i}"
        shutil.copytree(adapter_dir, folder, dirs_exist_ok=True)
        scaled = {k: (v * (1 + 0.25 * i) if "lora_B" in k else v) for k, v in tensors.items()}
        save_file(scaled, str(folder / "adapter_model.safetensors"))
        out.append(folder)
    return out


def in_process(tokens: int) -> dict[str, Any]:
    """What a batch of 8 costs without the server, and why: our engine one request at a time and 8 at
    once, transformers' own continuous batching (`generate_batch`, paged KV cache) on the same 8
    requests, and fp32 matmuls of this model's shapes at 1 and 8 rows."""
    import torch
    import torch.nn.functional as F

    from finetune.config import GenerationSettings
    from finetune.data.encoding import encode_prompt
    from finetune.data.prompts import load_template
    from finetune.engine.requests import Request
    from finetune.engine.scheduler import Engine
    from finetune.model.loading import load_base, load_tokenizer, pick_device, pick_precision
    from finetune.model.weights import resolve_base_model
    from finetune.serving.server import flatten_head_input

    path = resolve_base_model(None)
    device = pick_device("cpu")
    tokenizer = load_tokenizer(path)
    model = load_base(path, device, pick_precision("float32", device, training=False)).eval()
    flatten_head_input(model)
    template = load_template("alpaca")
    prompts = [encode_prompt(tokenizer, template.render(p, "", tokenizer)) for p in PROMPTS * 2]
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0)

    def engine_run(batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        engine = Engine(model, tokenizer)
        requests = [engine.submit(Request(ids, settings)) for ids in batch]
        t0 = time.perf_counter()
        while engine.step():
            pass
        return time.perf_counter() - t0, [r.generated for r in requests]

    engine_run(prompts[:1])  # warm-up
    solo_s, solo_out = 0.0, []
    for ids in prompts:
        dt, out = engine_run([ids])
        solo_s += dt
        solo_out += out
    batch_s, batch_out = engine_run(prompts)
    n_tokens = sum(len(o) for o in batch_out)
    out: dict[str, Any] = {
        "requests": len(prompts),
        "tokens": n_tokens,
        "engine_one_at_a_time_tps": round(n_tokens / solo_s, 2),
        "engine_batch_tps": round(n_tokens / batch_s, 2),
        "engine_batch_same_as_solo": batch_out == solo_out,
    }
    try:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        config = GenerationConfig(
            max_new_tokens=tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0
        )
        cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=512)
        model.generate_batch(prompts[:2], generation_config=config, continuous_batching_config=cb)  # warm-up
        t0 = time.perf_counter()
        results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb)
        cb_s = time.perf_counter() - t0
        ordered = [results[k].generated_tokens for k in sorted(results, key=lambda k: int(k.split("_")[-1]))]
        cb_out = [t[:-1] if t and t[-1] == tokenizer.eos_token_id else t for t in ordered]  # ours drops EOS
        cb_tokens = sum(len(o) for o in cb_out)
        out["transformers_cb_tps"] = round(cb_tokens / cb_s, 2)
        out["transformers_cb_same_greedy"] = round(
            sum(a[: len(b)] == b[: len(a)] for a, b in zip(cb_out, solo_out, strict=True)) / len(cb_out), 3
        )
    except Exception as exc:  # recorded: the comparison is part of the result
        out["transformers_cb_error"] = f"{type(exc).__name__}: {exc}"[:300]

    def linear_us(rows: int, n: int, k: int, reps: int) -> float:
        w, x = torch.randn(n, k), torch.randn(rows, k)
        for _ in range(3):
            F.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(reps):
            F.linear(x, w)
        return round((time.perf_counter() - t0) / reps * 1e6, 1)

    out["linear_us"] = {
        f"{rows}x{k} @ {k}x{n}": linear_us(rows, n, k, 10 if n > 10000 else 200)
        for n, k in ((1536, 576), (576, 1536), (49152, 576))
        for rows in (1, 8)
    }
    return out


def run_case(
    name: str, server_args: dict[str, Any], env: dict[str, str], spec: dict[str, Any], body_for: Any
) -> dict[str, Any]:
    from finetune.cog.cogtools import CogServer

    workdir = Path(spec["workdir"])
    server = CogServer("predict", log_path=workdir / f"serve-{name}.log", env=env, **server_args)
    server.start(timeout=600)
    try:
        # Warm-up (allocator, adapter cache, batch shapes) that also records each request's solo text.
        solo = dict(load(server.url, 1, len(PROMPTS), body_for)["texts_raw"])
        rows = []
        for clients in spec["clients"]:
            row = load(server.url, clients, spec["per_client"], body_for)
            texts = row.pop("texts_raw")
            row["same_as_solo"] = round(sum(t == solo[k] for k, t in texts) / max(len(texts), 1), 3)
            row["texts"] = texts
            log(
                f"serve {name}, {clients} clients: {row['tokens_per_second']} tok/s, "
                f"TTFT p95 {row['ttft_ms_p95']} ms, refused {row['refused_409']}, same as solo {row['same_as_solo']}"
            )
            rows.append(row)
        return {
            "case": name,
            "concurrency": env.get("COG_MAX_CONCURRENCY", "predict.py"),
            "dtype": env.get("SERVE_DTYPE", "auto"),
            "quantization": env.get("SERVE_QUANT", "auto"),
            "solo": solo,
            "rows": rows,
        }
    finally:
        server.stop()


def main(spec_path: str, out_path: str) -> None:
    from finetune.cog.cogtools import data_uri, predictor_concurrency
    from finetune.formats.archives import pack_dir

    spec = read_json(spec_path)
    workdir = Path(spec["workdir"])
    adapter = Path(spec["adapter_dir"])
    tokens = spec["max_new_tokens"]

    def plain(i: int) -> dict[str, Any]:
        return {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": tokens, "temperature": 0, **ALPACA}

    uris = [
        data_uri(pack_dir(folder, workdir / f"{folder.name}.tar"))
        for folder in variant_adapters(adapter, workdir, 4)
    ]

    def mixed(i: int) -> dict[str, Any]:
        return {**plain(i), "lora_weights": uris[i % len(uris)]}

    load_start = load_avg()
    engine = in_process(tokens)
    log(f"serve in process: {engine}")
    cases = [
        run_case(
            "baseline",
            {"weights": str(adapter)},
            {"COG_MAX_CONCURRENCY": "1", "SERVE_QUANT": "none", "SERVE_COMPILE": "off"},
            spec,
            plain,
        ),
        run_case("setup_adapter", {"weights": str(adapter)}, {}, spec, plain),
        run_case("four_adapters", {}, {}, spec, mixed),
        run_case("setup_adapter_bf16", {"weights": str(adapter)}, {"SERVE_DTYPE": "bfloat16"}, spec, plain),
        run_case("setup_adapter_fp32", {"weights": str(adapter)}, {"SERVE_QUANT": "none"}, spec, plain),
        run_case(
            "setup_adapter_no_head_cache",
            {"weights": str(adapter)},
            {"PREFIX_CACHE_TOKENS": "0"},
            spec,
            plain,
        ),
    ]
    fp32_solo = cases[0]["solo"]
    for case in [c for c in cases if c["case"] in ("setup_adapter_bf16", "setup_adapter_fp32")]:
        for row in case["rows"]:
            texts = row["texts"]
            row["same_as_fp32"] = round(sum(t == fp32_solo[k] for k, t in texts) / max(len(texts), 1), 3)
    for case in cases:
        for row in case["rows"]:
            del row["texts"]
    write_json(
        out_path,
        {
            "how": __doc__.split("\n\n")[2].strip(),
            "concurrency": predictor_concurrency(),
            "max_new_tokens": tokens,
            "per_client": spec["per_client"],
            "cases": cases,
            "in_process": engine,
            "load_avg": [load_start, load_avg()],
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
