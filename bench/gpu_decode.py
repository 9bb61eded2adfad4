"""Decode speed on a CUDA GPU: CUDA graphs (the default, `SERVE_COMPILE=auto`) against our eager step
and plain `generate`, on the 135M shape and a 1B Llama shape, in one process and one run.

    python -m bench.gpu_decode                       # both shapes, results in bench/results/gpu-decode.*
    python -m bench.gpu_decode --shapes 135m --reps 2

Each shape is loaded in bf16 (the GPU default). The 135M shape uses the embedded model's weights
when weights/ holds them, else random weights of its shape; the 1B shape (Llama-3.2-1B's layers:
width 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, with the embedded model's 49k vocabulary so
its tokenizer works) is always random: speed does not depend on the values, and the report says
which ran. Per shape and rep, alternating: `model.generate` greedy (a streamer timing each token),
`ModelServer` with SERVE_COMPILE=off (eager) and with auto (graphs), one stream of 128 tokens each;
then 8 concurrent streams through both servers (aggregate tokens/s). TTFT is from before
tokenization to the first token, decode tokens/s after the first token, as `GenerationStats`
defines them."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import log, median, write_json  # noqa: E402
from bench.infer_worker import PROMPT, baseline_generate, ours_generate  # noqa: E402

SMALL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "conversion.json",
)
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
}
BATCH_PROMPTS = [
    PROMPT,
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "请用中文介绍一下你自己。",
    "Explain photosynthesis to a child.",
    "Write a haiku about the sea.",
    "List the planets of the solar system.",
    "How do I boil an egg?",
]


def model_folder(shape: str, source: Path, dest: Path, device: str, random: bool) -> tuple[str, str]:
    """A model folder for `shape` (its path, and 'embedded weights' or 'random weights')."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape == "135m" and (source / "model.safetensors").is_file() and not random:
        return str(source), "embedded weights"
    if (dest / "model.safetensors").is_file():  # written by an earlier --prepare
        return str(dest), "random weights"
    dest.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
    config = json.loads((source / "config.json").read_text())
    if shape == "1b":
        config.update(LLAMA_1B)
    config["dtype"] = "bfloat16"
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dest), dtype=torch.bfloat16)
    model.save_pretrained(dest)
    del model
    torch.cuda.empty_cache()
    return str(dest), "random weights"


def concurrent(server: Any, tokens: int) -> dict[str, Any]:
    """All BATCH_PROMPTS at once: aggregate output tokens/s over the wall time."""
    with ThreadPoolExecutor(len(BATCH_PROMPTS)) as pool:
        t0 = time.perf_counter()
        runs = list(pool.map(lambda p: ours_generate(server, p, tokens), BATCH_PROMPTS))
        wall = time.perf_counter() - t0
    total = sum(r["tokens"] for r in runs)
    return {"streams": len(runs), "tokens": total, "wall_s": round(wall, 3), "tokens_per_s": total / wall}


def measure_shape(args: argparse.Namespace, shape: str, work: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from finetune.engine import cpu_compile, cuda_graphs
    from finetune.model.loading import load_tokenizer
    from finetune.serving.server import ModelServer

    device, reps, tokens = args.device, args.reps, args.tokens
    path, weights = model_folder(shape, Path(args.model), work / shape, device, args.random)
    log(f"{shape}: {path} ({weights})")
    servers = {}
    for mode in ("off", "auto"):
        os.environ[cpu_compile.COMPILE_ENV] = mode
        t0 = time.perf_counter()
        servers[mode] = ModelServer(base_model=path, device=device)
        log(f"  ModelServer SERVE_COMPILE={mode}: {time.perf_counter() - t0:.1f} s")
    graphs = servers["auto"].engine.compiled
    if device == "cuda":
        assert isinstance(graphs, cuda_graphs.GraphStep), (
            "the default server on a GPU must decode through graphs"
        )
    tokenizer = load_tokenizer(path)
    dtype = servers["off"].precision.weights  # generate runs in the servers' precision
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    text = servers["off"].resolve_template("auto", None).render(PROMPT, "", tokenizer)
    params = sum(p.numel() for p in model.parameters())

    runs: dict[str, list[dict[str, Any]]] = {"generate": [], "eager": [], "graphs": []}
    calls = {
        "generate": lambda n: baseline_generate(model, tokenizer, text, n, device),
        "eager": lambda n: ours_generate(servers["off"], PROMPT, n),
        "graphs": lambda n: ours_generate(servers["auto"], PROMPT, n),
    }
    for fn in calls.values():
        fn(4)  # warm-up, untimed (graphs: records the first buckets)
    for rep in range(reps):
        order = list(calls) if rep % 2 == 0 else list(reversed(calls))
        for name in order:
            r = calls[name](tokens)
            runs[name].append(r)
            log(
                f"  {name}: ttft {r['ttft_s'] * 1000:.1f} ms, {r['decode_tps']:.1f} tok/s, {r['tokens']} tokens"
            )
    batch = {}
    for mode, name in (("off", "eager"), ("auto", "graphs")):
        concurrent(servers[mode], 8)  # warm-up: the batch buckets
        batch[name] = concurrent(servers[mode], tokens // 2)
        log(f"  {name} x{len(BATCH_PROMPTS)}: {batch[name]['tokens_per_s']:.1f} tok/s aggregate")
    out: dict[str, Any] = {
        "shape": shape,
        "weights": weights,
        "parameters": params,
        "prompt_tokens": len(tokenizer(text)["input_ids"]),
        "new_tokens": tokens,
        "graphs_recorded": sorted(getattr(graphs, "graphs", {})),
    }
    for name, rs in runs.items():
        out[name] = {
            "decode_tps": median([r["decode_tps"] for r in rs]),
            "ttft_ms": median([r["ttft_s"] for r in rs]) * 1000,
            "tokens": [r["tokens"] for r in rs],
            "per_rep_tps": [round(r["decode_tps"], 1) for r in rs],
        }
    out["same_text_graphs_eager"] = runs["graphs"][-1]["text"] == runs["eager"][-1]["text"]
    out["same_text_eager_generate"] = runs["eager"][-1]["text"] == runs["generate"][-1]["text"]
    out["batch8"] = batch
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        f"# Decode on {results['gpu']} ({results['date']})",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}; bf16; "
        f"`python -m bench.gpu_decode`; median of {results['reps']} reps, one stream of "
        f"{results['tokens']} greedy tokens; 8 streams of {results['tokens'] // 2}.",
        "",
        "| shape | weights | mode | TTFT ms | decode tokens/s | × generate | × eager | 8 streams tokens/s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["shapes"]:
        base, eager = r["generate"]["decode_tps"], r["eager"]["decode_tps"]
        for name in ("generate", "eager", "graphs"):
            m = r[name]
            agg = r["batch8"].get(name, {}).get("tokens_per_s")
            lines.append(
                f"| {r['shape']} ({r['parameters'] / 1e6:.0f}M) | {r['weights']} | {name} | {m['ttft_ms']:.1f} | "
                f"{m['decode_tps']:.1f} | {m['decode_tps'] / base:.2f} | {m['decode_tps'] / eager:.2f} | "
                f"{'–' if agg is None else f'{agg:.0f}'} |"
            )
    lines.append("")
    for shape, error in results.get("failed", {}).items():
        lines.append(f"- {shape} failed: {error}")
    for r in results["shapes"]:
        lines.append(
            f"- {r['shape']}: same text graphs/eager {r['same_text_graphs_eager']}, eager/generate "
            f"{r['same_text_eager_generate']}; tokens per rep {r['graphs']['tokens']}; graphs recorded "
            f"(rows, columns) {r['graphs_recorded']}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="135m,1b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--model", default=str(ROOT / "weights" / "smollm2-135m-instruct"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu-decode"))
    parser.add_argument("--random", action="store_true", help="random weights for the 135M shape too")
    parser.add_argument(
        "--work", default="", help="keep the model folders here (default: a temporary folder)"
    )
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (compiled = AOTI)")
    parser.add_argument("--prepare", action="store_true", help="only write the model folders (with --work)")
    args = parser.parse_args()
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_decode.py: no CUDA GPU is visible to torch")
    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "CPU (dry run)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "reps": args.reps,
        "tokens": args.tokens,
        "shapes": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if args.prepare:
            for shape in args.shapes.split(","):
                print(model_folder(shape, Path(args.model), work / shape, args.device, args.random))
            return
        for shape in args.shapes.split(","):
            try:
                results["shapes"].append(measure_shape(args, shape, work))
            except Exception as exc:  # one shape failing still reports the others
                log(f"{shape} failed: {type(exc).__name__}: {exc}")
                results.setdefault("failed", {})[shape] = f"{type(exc).__name__}: {exc}"
    write_json(args.out + ".json", results)
    text = report(results)
    Path(args.out + ".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
