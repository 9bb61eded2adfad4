"""Our Cog server against llama.cpp's own `llama-server`, on the same model, prompts and settings,
when a llama-server binary is given (it is never a dependency; bench/README.md says how to build one).

    python -m bench.llama_server --llama-server PATH [--rounds 2] [--threads 2] [--isa avx2|native]
                                 [--no-head-cache] [--quant int8|int4] [--quick] [--keep] [--name STEM]
    LLAMA_SERVER=PATH python -m bench.llama_server

The embedded base model is exported by our own `export gguf --dtype q8_0`; each round starts our
Cog server with its defaults (int8, or `--quant int4`; compiled on a CPU, through coglet; capped to
AVX2 code unless `--isa native`), then llama-server (`-t THREADS -np 8` on the q8_0 file), one at a
time, and sends each the same requests: 8 Alpaca-templated prompts of 37-44 tokens, the same token ids for both, greedy,
llama-server with `cache_prompt: false` (cold prompts; ours reuses its cached template head, as by
default, unless `--no-head-cache`). Per server and round:

* decode, one stream: 128 tokens on the first prompt, tokens after the first / time since the first;
* time to first token: from sending to the first streamed token, median over the 8 short requests
  (and the server's own figure: our `time_to_first_token` metric, llama-server's `timings.prompt_ms`);
* one client, 8 short requests in a row (64 tokens max): output tokens / wall time;
* 8 clients at once, 2 requests each (64 tokens max): output tokens / wall time, and how many of
  those texts equal the same prompt's text from the one-client run (batched = solo).

Texts are compared, not required to match: llama-server's greedy text against ours per prompt.
Writes bench/results/llama-server-<isa>.{json,md} (`-quick` added for `--quick`) and prints the Markdown."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ALPACA, ROOT, load_avg, log, median, write_json

# serve_worker's prompts where they fit the 37-46 tokens (its story prompt is 49, so shortened
# here), and four more, so that 8 requests are 8 different prompts. The first one decodes long.
PROMPTS = [
    "Write a story about an alpaca who travels around the world.",
    "Explain how a bicycle works to a ten-year-old.",
    "List ten facts about the Andes mountains.",
    "Describe a day in the life of a lighthouse keeper.",
    "Give three tips for staying healthy.",
    "Explain why the sky is blue.",
    "Write a short poem about the sea at night.",
    "Describe how to make a cup of tea, step by step.",
]
DECODE_TOKENS = 128
SHORT_TOKENS = 64
SLOTS = 8
RESULTS = ROOT / "bench" / "results"
# `--isa avx2` (the default): our server runs the vector code an AVX2-only CPU runs, as a llama-server
# built without AVX-512 does, on a machine that has AVX-512 too (no effect on one that has not):
# torch's kernels, the compiled decode step's C++, MKL, oneDNN and our own int8 kernel.
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "TORCHINDUCTOR_CPP_MARCH": "haswell",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "FINETUNE_INT8_ISA": "avx2",
}

Send = Callable[[int, int], dict[str, Any]]


# -- set-up ------------------------------------------------------------------------------------
def prompt_ids() -> list[list[int]]:
    """Each prompt as our server encodes it (the Alpaca template the requests ask for, our
    tokenizer): llama-server gets these ids, so both prefill exactly the same tokens."""
    from finetune.data.encoding import encode_prompt
    from finetune.data.prompts import load_template
    from finetune.model.loading import load_tokenizer
    from finetune.model.weights import resolve_base_model as resolve

    tokenizer = load_tokenizer(resolve(None))
    template = load_template("alpaca")
    return [encode_prompt(tokenizer, template.render(p, "", tokenizer)) for p in PROMPTS]


def export_gguf(work: Path) -> Path:
    """The embedded base as q8_0, by our own CLI (the file users would hand to llama.cpp)."""
    out = work / "gguf"
    subprocess.run(
        [sys.executable, "-m", "finetune", "export", "gguf", "--dtype", "q8_0", "--output_dir", str(out)],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    files = sorted(out.glob("*.gguf"))
    if len(files) != 1:
        raise RuntimeError(f"export gguf wrote {len(files)} .gguf files")
    return files[0]


def machine() -> dict[str, Any]:
    model, flags = platform.processor() or "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": isa,
        "isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def binary_info(binary: Path) -> dict[str, Any]:
    """Its version line, and how many AVX-512 (zmm) instructions its ggml CPU code holds: 0 for a
    build made for AVX2-only CPUs, which is what its figures then stand for."""
    run = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    info: dict[str, Any] = {"version": next((x for x in lines if x.startswith("version")), "?")}
    libraries = sorted(binary.resolve().parent.glob("libggml-cpu*.so")) or [binary]
    try:
        counts = {}
        for lib in libraries:
            dump = subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True, check=True)
            counts[lib.name] = dump.stdout.count("%zmm")
        info["zmm_instructions"] = counts
    except (OSError, subprocess.CalledProcessError):
        info["zmm_instructions"] = None  # no objdump: unknown, said so in the report
    return info


def git_commit() -> str:
    run = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True
    )
    return run.stdout.strip() or "?"


# -- the two servers ---------------------------------------------------------------------------
class LlamaServer:
    """llama-server on 127.0.0.1, started and stopped by its own process id."""

    def __init__(self, binary: Path, gguf: Path, threads: int, log_path: Path):
        from finetune.cog.cogtools import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            str(binary), "-m", str(gguf), "-t", str(threads), "-np", str(SLOTS),
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> LlamaServer:
        import requests

        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"llama-server exited with code {self.proc.returncode}:\n{tail}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:  # 503 while loading
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"llama-server not ready after {timeout:.0f}s; log {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ours_send(url: str) -> Send:
    from bench.serve_worker import post_accepted
    from finetune.cog.cogtools import iter_sse

    def send(index: int, tokens: int) -> dict[str, Any]:
        body = {"prompt": PROMPTS[index], "max_new_tokens": tokens, "temperature": 0, **ALPACA}
        resp, sent, refused = post_accepted(url, body)
        if resp.status_code != 200:
            raise RuntimeError(f"our server answered {resp.status_code}: {resp.text[:300]}")
        stamps: list[float] = []
        chunks: list[str] = []
        status, metrics = None, {}
        for name, data in iter_sse(resp):
            if name == "output":
                stamps.append(time.perf_counter())
                chunks.append(data["chunk"])
            elif name == "completed":
                status, metrics = data["status"], data.get("metrics", {})
        if status != "succeeded" or not stamps:
            raise RuntimeError(f"our prediction ended {status} with {len(stamps)} chunks")
        return timed(
            sent,
            stamps,
            metrics.get("output_token_count", len(stamps)),
            "".join(chunks),
            prompt_tokens=metrics.get("input_token_count"),
            server_ttft_ms=1000 * metrics.get("time_to_first_token", float("nan")),
            refused=refused,
        )

    return send


def theirs_send(url: str, ids: list[list[int]]) -> Send:
    import json

    import requests

    def send(index: int, tokens: int) -> dict[str, Any]:
        body = {
            "prompt": ids[index],  # token ids: no BOS added, no tokenizer of its own in the way
            "n_predict": tokens,
            "temperature": 0,
            "top_k": 1,
            "cache_prompt": False,  # cold prompts: no reuse of a slot's previous prefix
            "stream": True,
        }
        sent = time.perf_counter()
        resp = requests.post(f"{url}/completion", json=body, stream=True, timeout=600)
        if resp.status_code != 200:
            raise RuntimeError(f"llama-server answered {resp.status_code}: {resp.text[:300]}")
        resp.encoding = "utf-8"
        stamps: list[float] = []
        chunks: list[str] = []
        final: dict[str, Any] = {}
        for line in resp.iter_lines(decode_unicode=True):
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            if "error" in data:
                raise RuntimeError(f"llama-server: {data['error']}")
            chunks.append(data.get("content", ""))
            # One event per token; a token that ends mid-character streams no text but still counts.
            stamps += [time.perf_counter()] * len(data.get("tokens") or [])
            if data.get("stop"):
                final = data
        timings = final.get("timings", {})
        if not stamps or not timings:
            raise RuntimeError(f"llama-server streamed {len(stamps)} tokens and no final timings")
        return timed(
            sent,
            stamps,
            timings.get("predicted_n", len(stamps)),
            "".join(chunks),
            prompt_tokens=timings.get("prompt_n"),
            server_ttft_ms=timings.get("prompt_ms"),
            server_decode_tps=timings.get("predicted_per_second"),
        )

    return send


def timed(sent: float, stamps: list[float], tokens: int, text: str, **extra: Any) -> dict[str, Any]:
    span = stamps[-1] - stamps[0]
    return {
        "ttft_ms": 1000 * (stamps[0] - sent),
        "decode_tps": (tokens - 1) / span if tokens > 1 and span > 0 else None,
        "tokens": tokens,
        "text": text,
        **extra,
    }


# -- measuring -----------------------------------------------------------------------------------
def clients_run(send: Send, clients: int, per_client: int, tokens: int) -> dict[str, Any]:
    """`clients` threads, each sending `per_client` requests back to back, all starting together."""
    results: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        for k in range(per_client):
            index = (c * per_client + k) % len(PROMPTS)
            try:
                r = send(index, tokens)
            except Exception as exc:  # reported: a failed request fails the bench below
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            with lock:
                results.append((index, r))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = sum(r["tokens"] for _, r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": errors,
        "refused_409": sum(r.get("refused", 0) for _, r in results),  # ours, retried after 50 ms
        "wall_s": round(wall, 2),
        "tokens": n,
        "tokens_per_second": round(n / wall, 2),
        "ttft_ms_p50": round(median([r["ttft_ms"] for _, r in results]), 1),
        "texts": [(i, r["text"]) for i, r in results],
    }


def middle(values: list[float | None], digits: int) -> float | None:
    """The median of the values that are there (a server may not report a figure)."""
    known = [v for v in values if v is not None and v == v]  # v == v: not NaN
    return round(median(known), digits) if known else None


def measure(name: str, send: Send, ids: list[list[int]], plan: dict[str, int]) -> dict[str, Any]:
    send(0, 8)  # warm-up: first-request costs (allocations, shapes) are no one's figure
    decode = [send(0, DECODE_TOKENS) for _ in range(plan["decode_reps"])]
    # One client, short requests in a row: their texts are the solo texts, their TTFTs the TTFT row.
    t0 = time.perf_counter()
    short = [send(i, SHORT_TOKENS) for i in range(len(PROMPTS))]
    wall = time.perf_counter() - t0
    solo = {i: r["text"] for i, r in enumerate(short)}
    batched = clients_run(send, SLOTS, plan["per_client"], SHORT_TOKENS)
    texts = batched.pop("texts")
    same = sum(t == solo[i] for i, t in texts)
    differs = [(i, t) for i, t in texts if t != solo[i]]
    prompt_checks = [r.get("prompt_tokens") == len(ids[i]) for i, r in enumerate(short)]
    row = {
        "server": name,
        "decode_tps": middle([r["decode_tps"] for r in decode], 2),
        "decode_tokens": [r["tokens"] for r in decode],
        "decode_text": decode[0]["text"],
        "ttft_ms": round(median([r["ttft_ms"] for r in short]), 1),
        "server_ttft_ms": middle([r["server_ttft_ms"] for r in short], 1),
        "server_decode_tps": middle([r.get("server_decode_tps") for r in decode], 2),
        "one_client_tps": round(sum(r["tokens"] for r in short) / wall, 2),
        "one_client_requests": len(short),
        "clients_tps": batched["tokens_per_second"],
        "clients": batched,
        "batched_same_as_solo": [same, len(texts)],
        "batched_differs": differs,  # (prompt, text): to read where batching changed a text
        "same_prompt_tokens": all(prompt_checks),
        "solo": solo,
    }
    log(
        f"{name}: decode {row['decode_tps']} tok/s, TTFT {row['ttft_ms']} ms (server {row['server_ttft_ms']} ms), "
        f"one client {row['one_client_tps']} tok/s, {SLOTS} clients {row['clients_tps']} tok/s, "
        f"batched = solo {same}/{len(texts)}"
    )
    return row


def ours_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": str(args.threads)}  # torch's threads = llama-server's -t
    if args.isa == "avx2":
        # A compile cache of its own: the cached decode step's key does not record the vector code.
        env.update(AVX2_ENV, SERVE_COMPILE_CACHE=str(work / "compiled-avx2"))
    if args.no_head_cache:
        env["PREFIX_CACHE_TOKENS"] = "0"
    if args.quant != "int8":
        env["SERVE_QUANT"] = args.quant
    return env


def round_pair(
    r: int, args: argparse.Namespace, work: Path, gguf: Path, ids: list[list[int]], plan: dict[str, int]
) -> dict[str, dict[str, Any]]:
    """One round: our server, then llama-server, each alone on the machine while it is measured."""
    from finetune.cog.cogtools import CogServer

    env = ours_env(args, work)
    ours = CogServer("predict", env=env, log_path=work / f"ours-{r}.log")
    try:
        ours.start(timeout=900)  # a first start compiles the decode step
        row_ours = measure(f"round {r} ours", ours_send(ours.url), ids, plan)
    finally:
        ours.stop()
    theirs = LlamaServer(args.llama_server, gguf, args.threads, work / f"llama-server-{r}.log").start()
    try:
        row_theirs = measure(f"round {r} llama-server", theirs_send(theirs.url, ids), ids, plan)
    finally:
        theirs.stop()
    row_theirs["command"] = f"llama-server -m FILE -t {args.threads} -np {SLOTS} --host 127.0.0.1 --port P"
    return {"ours": row_ours, "theirs": row_theirs}


# -- report --------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def summarize(rounds: list[dict[str, dict[str, Any]]], lengths: list[int], per_client: int) -> dict[str, Any]:
    n = len(PROMPTS)
    rows = (
        ("decode_tps", f"decode, one stream ({DECODE_TOKENS} tokens max), tokens/s"),
        ("ttft_ms", f"time to first token ({min(lengths)}-{max(lengths)} tokens), ms, streamed"),
        ("server_ttft_ms", "the same, the server's own: our TTFT metric / their timings.prompt_ms, ms"),
        ("one_client_tps", f"one client, {n} short requests in a row ({SHORT_TOKENS} tokens max), tokens/s"),
        ("clients_tps", f"{SLOTS} clients at once, {per_client} requests each, tokens/s"),
    )
    table = []
    for key, label in rows:
        ours = [r["ours"][key] for r in rounds]
        theirs = [r["theirs"][key] for r in rounds]
        table.append(
            {
                "key": key,
                "label": label,
                "ours": ours,
                "theirs": theirs,
                "ratios": [ratio(a, b) for a, b in zip(ours, theirs, strict=True)],
                "ratio_of_medians": ratio(middle(ours, 3), middle(theirs, 3)),
            }
        )
    last = rounds[-1]
    agreement = []
    for i, text in sorted(last["ours"]["solo"].items()):
        other = last["theirs"]["solo"].get(i, "")
        agreement.append(
            {
                "prompt": PROMPTS[i],
                "same": text == other,
                "common_prefix_chars": len(os.path.commonprefix([text, other])),
                "chars": [len(text), len(other)],
            }
        )
    decode_same = last["ours"]["decode_text"] == last["theirs"]["decode_text"]
    stable = {
        side: all(r[side]["solo"] == rounds[0][side]["solo"] for r in rounds) for side in ("ours", "theirs")
    }
    return {"table": table, "agreement": agreement, "decode_text_same": decode_same, "solo_stable": stable}


def fmt(values: list[Any]) -> str:
    return ", ".join("–" if v is None else f"{v:g}" for v in values)


def ours_setting(result: dict[str, Any]) -> str:
    caps = ", ".join(f"{k}={v}" for k, v in result["ours_env"].items() if k in AVX2_ENV)
    isa = f"its vector code capped to AVX2 ({caps})" if caps else "on the CPU's own vector code"
    quant = result["ours_env"].get("SERVE_QUANT", "int8")
    isa = f"SERVE_QUANT={quant}, {isa}"
    if result["no_head_cache"]:
        return f"{isa}, PREFIX_CACHE_TOKENS=0 (no prompt prefix reused)"
    return f"{isa}; it reuses the Alpaca template's cached head, as by default"


def markdown(result: dict[str, Any]) -> str:
    s, m, b = result["summary"], result["machine"], result["binary"]
    zmm = b["zmm_instructions"]
    zmm_text = "unknown (no objdump)" if zmm is None else ", ".join(f"{k}: {v}" for k, v in zmm.items())
    lines = [
        f"# Our Cog server against llama-server{' — quick run' if result['quick'] else ''}",
        "",
        f"{m['date']}, {m['cpu']}, {m['cores']} cores, CPU flags: {', '.join(m['flags'])}; "
        f"{result['threads']} threads each; load average {result['load_avg'][0]} → {result['load_avg'][1]}; "
        f"commit {result['commit']}.",
        "",
        f"Ours: the Cog server (compiled on a CPU) through coglet, {ours_setting(result)}. "
        f"Theirs: `{result['command']}` "
        f"({b['version']}; AVX-512 instructions in its ggml CPU code: {zmm_text}) on our "
        f"`export gguf --dtype q8_0` file ({result['gguf_mb']} MB). Same token ids, greedy, "
        f"cache_prompt false; rounds alternate ours, theirs. Values are per round; the ratio is of the medians.",
        "",
        "| | ours | llama-server q8_0 | ours / theirs, per round | ours / theirs |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in s["table"]:
        lines.append(
            f"| {row['label']} | {fmt(row['ours'])} | {fmt(row['theirs'])} | {fmt(row['ratios'])} "
            f"| **{fmt([row['ratio_of_medians']])}×** |"
        )
    rounds = result["rounds"]
    same = [
        " / ".join("{}/{}".format(*r[side]["batched_same_as_solo"]) for r in rounds)
        for side in ("ours", "theirs")
    ]
    lines += [
        f"| batched text = solo text | {same[0]} | {same[1]} | | |",
        "",
        "Time ratios (TTFT rows) above 1 mean ours is slower. Decode counts tokens after the first over the "
        "time since the first; the short runs send each prompt once (their texts are the solo texts), "
        f"{SLOTS} clients send {result['plan']['per_client']} each.",
        "",
        f"## Texts (last round, greedy, {SHORT_TOKENS} tokens max)",
        "",
        "| prompt | same | common prefix (chars) | ours / theirs chars |",
        "|---|---|---:|---:|",
    ]
    for a in s["agreement"]:
        lines.append(
            f"| {a['prompt']} | {'yes' if a['same'] else 'no'} | {a['common_prefix_chars']} "
            f"| {a['chars'][0]} / {a['chars'][1]} |"
        )
    agree = sum(a["same"] for a in s["agreement"])
    checks = {side: all(r[side]["same_prompt_tokens"] for r in rounds) for side in ("ours", "theirs")}
    lines += [
        "",
        f"Same text: {agree}/{len(s['agreement'])} prompts; the {DECODE_TOKENS}-token decode text "
        f"{'is the same' if s['decode_text_same'] else 'differs'}. Solo texts equal in every round: "
        f"ours {s['solo_stable']['ours']}, theirs {s['solo_stable']['theirs']}. Both prefilled the "
        f"same prompt tokens (each server's own count): ours {checks['ours']}, theirs {checks['theirs']}.",
        "",
    ]
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-server", help="llama-server binary (default: $LLAMA_SERVER)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of ours then theirs (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="threads for each server (default 2)")
    parser.add_argument(
        "--isa",
        choices=("avx2", "native"),
        default="avx2",
        help="our server's vector code: capped to AVX2 (default, as the llama-server build), or the CPU's own",
    )
    parser.add_argument("--no-head-cache", action="store_true", help="ours with PREFIX_CACHE_TOKENS=0")
    parser.add_argument(
        "--quant", default="int8", choices=["int8", "int4"], help="ours with this SERVE_QUANT (default int8)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    parser.add_argument("--quick", action="store_true", help="smoke test: one round, fewer requests")
    parser.add_argument("--name", help="results file stem (default llama-server-<isa>[-quick])")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, plan: dict[str, int]) -> dict[str, Any]:
    """Export, the rounds, and every figure of the report."""
    info, load_start = machine(), load_avg()
    work = Path(tempfile.mkdtemp(prefix="llama-server-bench-"))
    try:
        ids = prompt_ids()
        log(f"prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens; exporting q8_0")
        gguf = export_gguf(work)
        rounds = [round_pair(r, args, work, gguf, ids, plan) for r in range(plan["rounds"])]
        gguf_mb = round(gguf.stat().st_size / 1e6, 1)
    finally:
        if args.keep:
            log(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {
        "how": __doc__.split("\n\n")[2].strip(),
        "machine": info,
        "binary": binary_info(args.llama_server),
        "commit": git_commit(),
        "quick": args.quick,
        "threads": args.threads,
        "no_head_cache": args.no_head_cache,
        "ours_isa": args.isa,
        "ours_env": {k: v for k, v in ours_env(args, work).items() if k != "SERVE_COMPILE_CACHE"},
        "plan": plan,
        "prompt_tokens": [len(x) for x in ids],
        "gguf_mb": gguf_mb,
        "command": rounds[0]["theirs"]["command"],
        "rounds": rounds,
        "summary": summarize(rounds, [len(x) for x in ids], plan["per_client"]),
        "load_avg": [load_start, load_avg()],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    given = args.llama_server or os.environ.get("LLAMA_SERVER")
    if not given:
        print("error: no llama-server: pass --llama-server PATH or set LLAMA_SERVER (see bench/README.md)")
        return 2
    args.llama_server = Path(given).expanduser()
    if not (args.llama_server.is_file() and os.access(args.llama_server, os.X_OK)):
        print(f"error: {args.llama_server} is not an executable file")
        return 2
    plan = (
        {"rounds": 1, "decode_reps": 1, "per_client": 1}
        if args.quick
        else {"rounds": args.rounds, "decode_reps": 3, "per_client": 2}
    )
    result = run(args, plan)
    isa = "avx2" if args.isa == "avx2" else result["machine"]["isa"]
    stem = args.name or f"llama-server-{isa}{'-quick' if args.quick else ''}"
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{stem}.json", result)
    text = markdown(result)
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
    errors = [e for r in result["rounds"] for side in r.values() for e in side["clients"]["errors"]]
    if errors:
        print(f"{len(errors)} requests failed, first: {errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
