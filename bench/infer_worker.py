"""Inference, in one process so baseline and ours alternate rep by rep on the same machine state.

    python -m bench.infer_worker SPEC.json OUT.json

* baseline: plain `model.generate(do_sample=False)` on the fp32 base with the LoRA adapter attached
  unmerged (PeftModel), a streamer timing each token;
* ours: the predictor path, `ModelServer(adapter=...)` (adapter merged) + `server.generate` with
  temperature 0 and a `GenerationStats`.

Both report time to first token (from before tokenization to the first new token) and decode
tokens/s after the first token, as `GenerationStats` defines them. Then the Cog HTTP round trip:
the same short greedy generation through a real `CogServer` vs in-process `ModelServer.generate`."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    ALPACA,
    BENCH_LORA,
    load_avg,
    log,
    median,
    peak_gpu_mb,
    peak_rss_mb,
    profile_summary,
    read_json,
    setup_torch,
    sync,
    write_json,
)

PROMPT = "Write a long story about an alpaca who travels around the world, country by country."


def random_adapter(base: str, dest: Path, seed: int = 0) -> Path:
    """A LoRA adapter (the bench's r/targets) with random B, so merged and unmerged both matter."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.config import LoraSettings
    from finetune.model.loading import add_lora

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator: the same adapter every run
    model = add_lora(base_model, LoraSettings(**BENCH_LORA))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    model.save_pretrained(str(dest))
    return dest


class TokenClock:
    """A `generate` streamer that timestamps every new token (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def baseline_generate(
    model: Any, tokenizer: Any, text: str, max_new_tokens: int, device: str
) -> dict[str, Any]:
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        enc = tokenizer(text, add_special_tokens=True, return_tensors="pt").to(device)
        clock = TokenClock()
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, enc["input_ids"].shape[1] :].tolist()
    n = len(clock.times)
    span = clock.times[-1] - clock.times[0] if n > 1 else 0.0
    return {
        "ttft_s": clock.times[0] - t0,
        "decode_tps": (n - 1) / span if span > 0 else 0.0,
        "tokens": n,
        "text": tokenizer.decode(new, skip_special_tokens=True),
    }


def ours_generate(server: Any, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    from finetune.config import GenerationSettings
    from finetune.engine.requests import GenerationStats

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0)
    stats = GenerationStats()  # its clock starts here
    text = "".join(server.generate(prompt, settings=settings, prompt_template="alpaca", stats=stats))
    wall = time.perf_counter() - stats.started
    return {
        "wall_s": wall,
        "ttft_s": stats.time_to_first_token,
        "decode_tps": stats.tokens_per_second,
        "tokens": stats.output_token_count,
        "text": text,
        "stop_reason": stats.stop_reason,
    }


def alternate(reps: int, baseline: Any, ours: Any) -> dict[str, list[dict[str, Any]]]:
    """`reps` timed runs of each, alternating which goes first, so neither always follows the
    other's cache state."""
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ours": []}
    for rep in range(reps):
        order = ("baseline", "ours") if rep % 2 == 0 else ("ours", "baseline")
        for name in order:
            runs[name].append(baseline() if name == "baseline" else ours())
            log(
                f"  {name}: ttft {runs[name][-1]['ttft_s'] * 1000:.0f} ms, {runs[name][-1]['decode_tps']:.2f} tok/s"
            )
    return runs


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "ttft_ms": round(1000 * median([r["ttft_s"] for r in runs]), 1),
        "decode_tps": round(median([r["decode_tps"] for r in runs]), 2),
        "tokens": [r["tokens"] for r in runs],
        "reps_ttft_ms": [round(1000 * r["ttft_s"], 1) for r in runs],
        "reps_decode_tps": [round(r["decode_tps"], 2) for r in runs],
    }


def cprofile_top(fn: Any, top: int = 8) -> dict[str, Any]:
    """Python-level view: functions by own time (builtins such as torch's C ops included)."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    return {
        "wall_ms": round(1000 * wall, 1),
        "top_functions": [
            {
                "function": f"{Path(file).name}:{line}({name})" if file != "~" else name,
                "own_ms": round(1000 * tt, 1),
                "share_pct": round(100 * tt / wall, 1),
                "calls": nc,
            }
            for (file, line, name), (_, nc, tt, _, _) in rows
        ],
    }


def torch_profile(fn: Any, device: str) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    return profile_summary(prof, wall, device)


def http_round_trip(spec: dict[str, Any], server: Any, adapter: str) -> dict[str, Any]:
    """The same short greedy generation through a real Cog server and in process."""
    import requests

    from finetune.cog.cogtools import CogServer

    workdir = Path(spec["workdir"])
    tokens = spec["http_tokens"]
    extra = {"OMP_NUM_THREADS": str(spec["threads"])} if spec["device"] == "cpu" else {}
    t0 = time.perf_counter()
    cog = CogServer(weights=adapter, log_path=workdir / "cog-server.log", env=extra).start(timeout=600)
    ready_s = time.perf_counter() - t0
    payload = {"input": {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0, **ALPACA}}
    http_s: list[float] = []
    local_s: list[float] = []
    predict_s: list[float] = []
    same = True
    try:
        for rep in range(spec["http_reps"] + 1):  # rep 0 warms both paths up, untimed
            t0 = time.perf_counter()
            resp = requests.post(f"{cog.url}/predictions", json=payload, timeout=600)
            t_http = time.perf_counter() - t0
            body = resp.json()
            if body.get("status") != "succeeded":
                raise RuntimeError(f"prediction failed: {body.get('status')}: {body.get('error')}")
            remote = "".join(body["output"]) if isinstance(body["output"], list) else str(body["output"])
            local = ours_generate(server, PROMPT, tokens)
            same = same and remote == local["text"]
            if rep:
                http_s.append(t_http)
                local_s.append(local["wall_s"])
                if "predict_time" in body.get("metrics", {}):
                    predict_s.append(body["metrics"]["predict_time"])
    finally:
        cog.stop()
    return {
        "max_new_tokens": tokens,
        "reps": spec["http_reps"],
        "server_ready_s": round(ready_s, 2),
        "http_ms": round(1000 * median(http_s), 1),
        "in_process_ms": round(1000 * median(local_s), 1),
        "overhead_ms": round(1000 * (median(http_s) - median(local_s)), 1),
        "cog_predict_time_ms": round(1000 * median(predict_s), 1) if predict_s else None,
        # HTTP wall minus the worker's own predict_time, per request: the server and IPC alone,
        # free of the model-speed noise between two processes.
        "transport_ms": round(1000 * median([h - p for h, p in zip(http_s, predict_s, strict=False)]), 1)
        if len(predict_s) == len(http_s)
        else None,
        "reps_http_ms": [round(1000 * x, 1) for x in http_s],
        "reps_in_process_ms": [round(1000 * x, 1) for x in local_s],
        "same_output": same,
    }


def weight_stream_floor(model: Any, reps: int = 5) -> dict[str, Any]:
    """A lower bound on one decode step: one matrix-vector product over every Linear weight of the
    model (lm_head included) and nothing else, fp32 and bf16, best of `reps` passes. Decoding one
    token must read all of these weights once, so no decode loop can beat this on this machine."""
    import torch

    # The base's matrices only: a merged adapter's LoRA factors are folded in and never run.
    weights = [
        m.weight.detach()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    ]
    out: dict[str, Any] = {"matrices": len(weights), "parameters": sum(w.numel() for w in weights)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ws = [w.to(dtype).contiguous() for w in weights]
        xs = {n: torch.randn(1, n, dtype=dtype) for n in {w.shape[1] for w in ws}}
        best = float("inf")
        for _ in range(reps + 1):  # the first pass warms the kernels up
            t0 = time.perf_counter()
            for w in ws:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            best = min(best, time.perf_counter() - t0)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        out[name] = {
            "ms": round(1000 * best, 2),
            "gb_per_s": round(nbytes / best / 1e9, 1),
            "mb": round(nbytes / 1e6),
        }
        del ws
    return out


def main(spec_path: str, out_path: str) -> None:
    from finetune.serving.compute_thread import ComputeThread

    # Everything, baseline included, on the one thread the server computes on: two threads that
    # start OpenMP regions slow each other down (finetune/serving/compute_thread.py), which would skew the ratio.
    compute = ComputeThread()
    compute.call(measure, read_json(spec_path), out_path, compute)


def measure(spec: dict[str, Any], out_path: str, compute: Any) -> None:
    device = spec["device"]
    setup_torch(device, spec["threads"])
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.model.loading import load_tokenizer
    from finetune.model.weights import resolve_base_model
    from finetune.serving.server import ModelServer

    workdir = Path(spec["workdir"])
    base = resolve_base_model(None)
    adapter = spec.get("adapter_dir") or str(random_adapter(base, workdir / "random-adapter"))
    load_before = load_avg()

    t0 = time.perf_counter()
    server = ModelServer(adapter=adapter, device=device, compute=compute)
    server_s = time.perf_counter() - t0
    tokenizer = load_tokenizer(base)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    baseline = PeftModel.from_pretrained(plain, adapter).eval()  # unmerged, as a plain PEFT user runs it
    text = server.resolve_template("auto", server.setup_adapter).render(PROMPT, "", tokenizer)
    n_prompt = len(tokenizer(text, add_special_tokens=True)["input_ids"])
    max_new = spec["decode_tokens"]

    log(f"inference: prompt {n_prompt} tokens, {max_new} new tokens, {spec['reps']} reps each")
    baseline_generate(baseline, tokenizer, text, 4, device)  # warm-up, untimed
    ours_generate(server, PROMPT, 4)
    runs = alternate(
        spec["reps"],
        lambda: baseline_generate(baseline, tokenizer, text, max_new, device),
        lambda: ours_generate(server, PROMPT, max_new),
    )
    result: dict[str, Any] = {
        "device": device,
        "threads": torch.get_num_threads(),
        "prompt": PROMPT,
        "prompt_tokens": n_prompt,
        "max_new_tokens": max_new,
        "reps": spec["reps"],
        "adapter": "trained by the training section" if spec.get("adapter_dir") else "random B (peft)",
        "server_precision": str(server.precision.weights),
        "server_merged": server.merged,
        "server_construct_in_process_s": round(server_s, 2),
        "baseline": summarize(runs["baseline"]),
        "ours": summarize(runs["ours"]),
        "same_output": runs["baseline"][-1]["text"] == runs["ours"][-1]["text"],
        "ours_stop_reason": runs["ours"][-1]["stop_reason"],
    }

    # Before the profilers and what-ifs, so the in-process side runs in the same state as above.
    if spec.get("http_reps"):
        log("Cog HTTP round trip")
        try:
            result["http"] = http_round_trip(spec, server, adapter)
        except Exception as exc:  # e.g. cog not installed on a GPU box: report, keep the rest
            result["http"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}

    if spec.get("explore"):
        # What-if variants, one rep each (the bf16 server: median of the reps): where would a faster
        # decode come from?
        whatif: dict[str, Any] = {}
        whatif["hf_generate_merged"] = baseline_generate(server.model, tokenizer, text, max_new, device)
        if device == "cpu":
            # The product's opt-in (SERVE_DTYPE=bfloat16): bf16 weights, the same adapter merged.
            bf16_server = ModelServer(adapter=adapter, device=device, dtype="bfloat16", compute=compute)
            ours_generate(bf16_server, PROMPT, 4)  # warm-up: bf16 kernels for this prompt's shapes
            # The product's opt-in gets the same reps as ours (median by TTFT), not one sample.
            reps = sorted(
                (ours_generate(bf16_server, PROMPT, max_new) for _ in range(spec["reps"])),
                key=lambda r: r["ttft_s"],
            )
            whatif["server_bf16_weights"] = reps[len(reps) // 2]
            whatif["server_bf16_weights"]["same_text_as_fp32"] = (
                whatif["server_bf16_weights"]["text"] == runs["ours"][-1]["text"]
            )
            del bf16_server
            torch.set_num_threads(1)
            whatif["our_loop_1_thread"] = ours_generate(server, PROMPT, max_new)
            torch.set_num_threads(spec["threads"])
        result["whatif"] = {
            k: {
                "ttft_ms": round(1000 * v["ttft_s"], 1),
                "decode_tps": round(v["decode_tps"], 2),
                "tokens": v["tokens"],
                **({"same_text_as_fp32": v["same_text_as_fp32"]} if "same_text_as_fp32" in v else {}),
            }
            for k, v in whatif.items()
        }
        if device == "cpu":
            log("weight-streaming floor")
            result["floor"] = weight_stream_floor(server.model)

    if spec.get("profile"):
        n = spec.get("profile_tokens", 32)
        log(f"profiling {n}-token generations")
        result["profile"] = {
            "tokens": n,
            "note": "prefill of the prompt included; self time per operator",
            "ours_ops": torch_profile(lambda: ours_generate(server, PROMPT, n), device),
            "baseline_ops": torch_profile(
                lambda: baseline_generate(baseline, tokenizer, text, n, device), device
            ),
            "ours_python": cprofile_top(lambda: ours_generate(server, PROMPT, n)),
        }

    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["peak_gpu_mb"] = peak_gpu_mb(device)
    result["load_avg_before"] = load_before
    result["load_avg_after"] = load_avg()
    write_json(out_path, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
