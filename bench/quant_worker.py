"""Decode speed and quality for one serving precision, in its own process (so RSS is its own).

    python -m bench.quant_worker SPEC.json OUT.json

Modes: fp32 (SERVE_QUANT=none), bf16 (SERVE_DTYPE=bfloat16), int8 and int4 (weight-only, torch's
CPU kernels), each eager (SERVE_COMPILE=off) or compiled (auto; the compiled rows also report the
first start, which compiles into the run's own cache, and fail if the server fell back to eager
decoding). Each reports setup seconds, RSS after setup, time to first token and decode tokens/s
of `ModelServer.generate` with the setup adapter merged, alternating rep by rep with plain
`model.generate` fp32 (the PEFT model, as infer_worker's baseline) for the ratio; then quality:
the held-out loss on data/demo/persona_heldout.json with every row through the quantized kernels
(int4 prompts normally take the fp32 matmul, which would hide the rounding), and the share of
greedy tokens over the first `decode_tokens` that agree with fp32's (the fp32 run writes them).
Also, the same server with the engine on transformers' forward instead of ours (decoder.py), alternating, for
what our forward and KV buffer gain at the same precision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import load_avg, log, median, read_json, setup_torch, write_json
from bench.infer_worker import PROMPT, alternate, baseline_generate, ours_generate

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "data" / "demo" / "persona_heldout.json"
PROMPTS = [
    PROMPT,
    "What is the capital of France? Answer in one sentence, then explain why.",
    "Give three tips for staying healthy, and explain each one.",
    "请用中文介绍一下你自己。",
]
SETTINGS = {
    "fp32": {"dtype": "float32", "quantization": "none"},
    "bf16": {"dtype": "bfloat16", "quantization": "none"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "int4": {"dtype": "float32", "quantization": "int4"},
}


def greedy_ids(server: Any, prompt: str, n: int) -> list[int]:
    from finetune.config import GenerationSettings
    from finetune.data.encoding import encode_prompt
    from finetune.engine.requests import Request

    template = server.resolve_template("auto", server.setup_adapter)
    ids = encode_prompt(server.tokenizer, template.render(prompt, "", server.tokenizer))
    request = Request(ids, GenerationSettings(max_new_tokens=n, temperature=0), adapter="setup")
    server.engine.submit(request)
    list(server.engine.drive(request))  # we are on the compute thread
    return list(request.generated)


def heldout_loss(server: Any, path: Path = HELDOUT, rows: int | None = None) -> float:
    from finetune.data.dataset_file import read_records
    from finetune.data.encoding import encode_example
    from finetune.data.prompts import load_template, split_record
    from finetune.training.evaluation import _response_loss

    template = load_template("alpaca")
    total, count = 0.0, 0
    # Outside the engine's prefill() block: every row goes through the low-bit kernels.
    for record in read_records(path)[:rows]:
        prompt, expected = split_record(record, template, server.tokenizer)
        encoded = encode_example(prompt, expected, server.tokenizer, 256, False, True)
        loss, n = _response_loss(server.model, encoded, server.tokenizer.pad_token_id, server.device)
        total, count = total + loss, count + n
    return total / count


def first_start(spec: dict[str, Any], adapter: str, settings: dict[str, str]) -> float:
    """Seconds a `ModelServer(...)` took in a fresh process (environment inherited)."""
    code = (
        "import sys, time\n"
        "from bench.common import setup_torch\n"
        f"setup_torch('cpu', {int(spec['threads'])})\n"
        "from finetune.serving.server import ModelServer\n"
        "t = time.perf_counter()\n"
        f"ModelServer(adapter={adapter!r}, dtype={settings['dtype']!r}, quantization={settings['quantization']!r})\n"
        "print('first start', time.perf_counter() - t, flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    sys.stderr.write(done.stderr[-3000:])
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("first start ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the first start failed (exit {done.returncode})")
    return float(lines[-1].split()[-1])


def main(spec_path: str, out_path: str) -> None:
    from finetune.serving.compute_thread import ComputeThread

    compute = ComputeThread()
    compute.call(measure, read_json(spec_path), out_path, compute)


def measure(spec: dict[str, Any], out_path: str, compute: Any) -> None:
    setup_torch("cpu", spec["threads"])
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.engine import cpu_compile, quant
    from finetune.model.weights import resolve_base_model
    from finetune.serving.server import ModelServer

    mode, adapter, max_new = spec["mode"], spec["adapter_dir"], spec["decode_tokens"]
    compile_on = spec.get("compile", False)
    os.environ[cpu_compile.COMPILE_ENV] = "auto" if compile_on else "off"
    os.environ[cpu_compile.CACHE_ENV] = spec["compile_cache"]
    load_before = load_avg()
    first_start_s = None
    if compile_on:
        # The cache is this run's own, empty for each shape: the first start compiles, as a
        # user's first start on a machine does; the one below is the warm start every later one
        # is. The first runs in a child process, so that this one's RSS is one server's.
        first_start_s = first_start(spec, adapter, SETTINGS[mode])
    t0 = time.perf_counter()  # a warm start: earlier sections have read the weights already
    server = ModelServer(adapter=adapter, compute=compute, **SETTINGS[mode])
    setup_s = time.perf_counter() - t0
    if compile_on and server.engine.compiled is None:
        raise RuntimeError(f"{mode} compiled: the server decodes eagerly (see the log for why)")
    rss_mb = psutil.Process().memory_info().rss / 2**20
    base = resolve_base_model(None)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    baseline = PeftModel.from_pretrained(plain, adapter).eval()
    text = server.resolve_template("auto", server.setup_adapter).render(PROMPT, "", server.tokenizer)
    baseline_generate(baseline, server.tokenizer, text, 4, "cpu")
    ours_generate(server, PROMPT, 4)
    runs = alternate(
        spec["reps"],
        lambda: baseline_generate(baseline, server.tokenizer, text, max_new, "cpu"),
        lambda: ours_generate(server, PROMPT, max_new),
    )
    baseline = plain = None  # free the fp32 copy before the quality measurements

    def on(own: bool) -> Any:
        server.engine.own_forward = own
        return ours_generate(server, PROMPT, max_new)

    forwards = alternate(spec["reps"], lambda: on(False), lambda: on(True))

    ids = {p: greedy_ids(server, p, max_new) for p in PROMPTS}
    reference_path = Path(spec["workdir"]) / "quant-fp32-greedy.json"
    if mode == "fp32" and not compile_on:
        reference_path.write_text(json.dumps(ids))
    agreement = None
    if reference_path.is_file():
        reference = json.loads(reference_path.read_text())
        shares = [
            sum(a == b for a, b in zip(reference[p], ids[p], strict=False)) / max(1, len(reference[p]))
            for p in PROMPTS
        ]
        agreement = round(sum(shares) / len(shares), 4)
    loss = heldout_loss(server)
    base_tps = median([r["decode_tps"] for r in runs["baseline"]])
    ours_tps = median([r["decode_tps"] for r in runs["ours"]])
    result = {
        "mode": mode,
        "compiled": compile_on,
        "settings": SETTINGS[mode],
        "setup_s": round(setup_s, 2),
        "first_start_s": None if first_start_s is None else round(first_start_s, 1),
        "rss_mb": round(rss_mb),
        "quantized_mb": round(quant.quantized_bytes(server.model) / 2**20, 1),
        "ttft_ms": round(1000 * median([r["ttft_s"] for r in runs["ours"]]), 1),
        "decode_tps": round(ours_tps, 2),
        "generate_fp32_tps": round(base_tps, 2),
        "vs_generate_fp32": round(ours_tps / base_tps, 3) if base_tps else None,
        "reps_decode_tps": [round(r["decode_tps"], 2) for r in runs["ours"]],
        "transformers_forward_tps": round(median([r["decode_tps"] for r in forwards["baseline"]]), 2),
        "vs_transformers_forward": round(
            median([r["decode_tps"] for r in forwards["ours"]])
            / median([r["decode_tps"] for r in forwards["baseline"]]),
            3,
        ),
        "heldout_loss": round(loss, 5),
        "greedy_agreement": agreement,
        "load_avg": [load_before, load_avg()],
    }
    log(f"quant {mode}{' compiled' if compile_on else ''}: {json.dumps(result)}")
    write_json(out_path, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
