"""Serving many clients through the real Cog server, in one process that runs the servers and the
clients (threads sending SSE requests back to back).

    python -m bench.serve_worker SPEC.json OUT.json

For 1, 2, 4 and 8 clients it measures aggregate output tokens/s, p50/p95 time to first token (the
first SSE output event, from sending the request) and p50/p95 time per output token after the
first, in three set-ups:

* baseline: one prediction at a time (COG_MAX_CONCURRENCY=1, as the server ran before the engine;
  clients retry a 409 after 50 ms), the setup adapter merged;
* ours, setup adapter: the default concurrency, every request on the merged setup adapter;
* ours, 4 adapters: a bare server, requests spread round-robin over 4 `lora_weights` adapters
  (data URIs, warm in the adapter cache), decoding in mixed batches."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import load_avg, log, read_json, write_json

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


def one_request(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import requests

    refused = 0
    while True:
        sent = time.perf_counter()
        resp = requests.post(
            f"{url}/predictions",
            json={"input": body},
            timeout=600,
            stream=True,
            headers={"Accept": "text/event-stream"},
        )
        if resp.status_code != 409:
            break
        resp.close()
        refused += 1
        time.sleep(RETRY_S)
    resp.encoding = "utf-8"
    stamps: list[float] = []
    status, name = None, None
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name == "output":
            stamps.append(time.perf_counter())
        elif line.startswith("data:") and name == "completed":
            done = json.loads(line.split(":", 1)[1])
            status = done["status"]
            tokens = done.get("metrics", {}).get("output_token_count", len(stamps))
    if status != "succeeded" or not stamps:
        raise RuntimeError(f"prediction ended {status} with {len(stamps)} chunks")
    return {
        "ttft_s": stamps[0] - sent,
        "tpot_s": (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
        "refused": refused,
    }


def load(url: str, clients: int, per_client: int, body_for: Any) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for i in range(per_client):
            try:
                r = one_request(url, body_for(c * per_client + i))
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


def run_case(
    name: str, server_args: dict[str, Any], env: dict[str, str], spec: dict[str, Any], body_for: Any
) -> dict[str, Any]:
    from finetune.cogtools import CogServer

    workdir = Path(spec["workdir"])
    server = CogServer("predict", log_path=workdir / f"serve-{name}.log", env=env, **server_args)
    server.start(timeout=600)
    try:
        load(server.url, 1, 2, body_for)  # warm-up: allocator, adapter cache, batch shapes
        rows = []
        for clients in spec["clients"]:
            row = load(server.url, clients, spec["per_client"], body_for)
            log(
                f"serve {name}, {clients} clients: {row['tokens_per_second']} tok/s, "
                f"TTFT p95 {row['ttft_ms_p95']} ms, refused {row['refused_409']}"
            )
            rows.append(row)
        return {"case": name, "concurrency": env.get("COG_MAX_CONCURRENCY", "predict.py"), "rows": rows}
    finally:
        server.stop()


def main(spec_path: str, out_path: str) -> None:
    from finetune.archives import pack_dir
    from finetune.cogtools import data_uri, predictor_concurrency

    spec = read_json(spec_path)
    workdir = Path(spec["workdir"])
    adapter = Path(spec["adapter_dir"])
    tokens = spec["max_new_tokens"]

    def plain(i: int) -> dict[str, Any]:
        return {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": tokens, "temperature": 0}

    uris = [
        data_uri(pack_dir(folder, workdir / f"{folder.name}.tar"))
        for folder in variant_adapters(adapter, workdir, 4)
    ]

    def mixed(i: int) -> dict[str, Any]:
        return {**plain(i), "lora_weights": uris[i % len(uris)]}

    load_start = load_avg()
    cases = [
        run_case("baseline", {"weights": str(adapter)}, {"COG_MAX_CONCURRENCY": "1"}, spec, plain),
        run_case("setup_adapter", {"weights": str(adapter)}, {}, spec, plain),
        run_case("four_adapters", {}, {}, spec, mixed),
    ]
    write_json(
        out_path,
        {
            "how": __doc__.split("\n\n")[2].strip(),
            "concurrency": predictor_concurrency(),
            "max_new_tokens": tokens,
            "per_client": spec["per_client"],
            "cases": cases,
            "load_avg": [load_start, load_avg()],
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
