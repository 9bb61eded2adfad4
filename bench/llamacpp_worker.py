"""llama.cpp as a reference row of the serving-precision section, when `llama_cpp`
(llama-cpp-python) is importable: it is not a dependency.

    python -m bench.llamacpp_worker SPEC.json OUT.json

Exports the base with the setup adapter merged through the project's own `export gguf` (q8_0 and
f16), then decodes the same prompt greedily with llama.cpp (the spec's threads), alternating rep
by rep with plain `generate` fp32 for the ratio, as the other rows do."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.common import load_avg, log, median, read_json, setup_torch, write_json
from bench.infer_worker import PROMPT, alternate, baseline_generate

GGUF_TYPES = ("q8_0", "f16")


def llama_generate(llm: Any, text: str, max_new_tokens: int) -> dict[str, Any]:
    """One greedy generation through llama.cpp's token iterator: time to the first new token, and
    the rate of the rest (as our rows count them)."""
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    llm.reset()  # a cold prompt, as ours: without it llama.cpp reuses the cached prefix of the last call
    t0 = time.perf_counter()
    times = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        if token == llm.token_eos() or len(times) >= max_new_tokens:
            break
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "ttft_s": times[0] - t0,
        "decode_tps": (len(times) - 1) / span if span > 0 else 0.0,
        "tokens": len(times),
    }


def main(spec_path: str, out_path: str) -> None:
    spec = read_json(spec_path)
    setup_torch("cpu", spec["threads"])
    import llama_cpp
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.data.prompts import load_template
    from finetune.formats.export import export
    from finetune.model.loading import load_tokenizer
    from finetune.model.weights import resolve_base_model

    base, adapter, max_new = resolve_base_model(None), spec["adapter_dir"], spec["decode_tokens"]
    tokenizer = load_tokenizer(base)
    text = load_template("alpaca").render(PROMPT, "", tokenizer)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()
    rows = []
    for gguf_type in GGUF_TYPES:
        path, _ = export("gguf", Path(spec["workdir"]) / f"gguf-{gguf_type}", base, adapter, gguf_type)
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=1024,
            n_threads=spec["threads"],
            n_threads_batch=spec["threads"],
            verbose=False,
        )
        llama_generate(llm, text, 4)  # warm-up
        load_before = load_avg()
        runs = alternate(
            spec["reps"],
            lambda: baseline_generate(plain, tokenizer, text, max_new, "cpu"),
            lambda llm=llm: llama_generate(llm, text, max_new),
        )
        base_tps = median([r["decode_tps"] for r in runs["baseline"]])
        tps = median([r["decode_tps"] for r in runs["ours"]])
        row = {
            "mode": f"llama.cpp {gguf_type}",
            "version": llama_cpp.__version__,
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "ttft_ms": round(1000 * median([r["ttft_s"] for r in runs["ours"]]), 1),
            "decode_tps": round(tps, 2),
            "generate_fp32_tps": round(base_tps, 2),
            "vs_generate_fp32": round(tps / base_tps, 3) if base_tps else None,
            "reps_decode_tps": [round(r["decode_tps"], 2) for r in runs["ours"]],
            "load_avg": [load_before, load_avg()],
        }
        log(f"quant llama.cpp {gguf_type}: {row}")
        rows.append(row)
        del llm
    write_json(out_path, {"rows": rows})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
