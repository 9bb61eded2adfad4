"""The users' real path on one CUDA GPU (bench/gpu_check.sh runs it after the GPU tests): a 24 GB
card emulated on a bigger one, random-weight Llama-2-7B and Llama-3-8B shapes, training and
serving under the memory planner's settings, planned memory against measured.

    python bench/gpu_check.py run [--card 24GiB] [--shapes llama-2-7b,llama-3-8b] [--no-baseline]
    python bench/gpu_check.py run --dry-run      # tiny shapes on a CPU: checks this driver, no GPU
    python bench/gpu_check.py trim-wheel WHEEL --keep cuda130 cpu

Every measurement runs in its own process, which first takes a ballast allocation so that the GPU's
free memory reads as the emulated card's (its own CUDA context counted, as on a real card):
- per shape, 3 training steps under the plan's auto settings, and under the first setting the
  planner says does not fit (expected: out of memory, cleanly reported);
- per shape, prompts of about 200, 1,100 and 2,100 tokens (64 new tokens each, greedy) through
  ModelServer with its defaults, then a short request that must be served after them;
- on the Llama-3.2-1B shape (a real card's memory, no ballast), training against HF Trainer + PEFT
  in bf16 and fp32 through bench/run.py, which profiles our step.
Training rows are full length (every record reaches cutoff_len), as the planner assumes. The model
folders hold random weights: memory and speed do not depend on the values; losses mean nothing.
Results: bench/results/gpu-check.{json,md}."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1 << 30
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
PROMPT_TOKENS = (200, 1100, 2100)
# The first rejected setting tried: the fastest the planner would not pick for this shape.
CANDIDATES = (("none", False), ("none", True), ("4bit", True))
TINY = {  # --dry-run: a shape that trains and serves on a CPU in seconds
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}


def log(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- wheels ------------------------------------------------------------------------------------
def trim_wheel(path: Path, keep: list[str]) -> None:
    """Drop the native libraries a machine will not load (bitsandbytes ships one per CUDA and ROCm
    version): keep those whose name holds one of `keep`, and the RECORD lines of what stays."""
    lib = re.compile(r"lib[a-z_]+_([a-z0-9]+)\.(so|dll|dylib)$")

    def wanted(name: str) -> bool:
        m = lib.search(name)
        return m is None or any(k == m.group(1) for k in keep)

    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not wanted(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if wanted(x.split(",")[0])) + "\n").encode()
            dst.writestr(info, data)
    tmp.replace(path)
    log(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB after trimming")


# -- the measured processes ----------------------------------------------------------------------
def ballast(card_bytes: int | None) -> Any:
    """Hold memory so that free memory reads as a `card_bytes` card with this process's context."""
    import torch

    if card_bytes is None or not torch.cuda.is_available():
        return None
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    context = total - free  # this process's CUDA context (and anything else already on the card)
    extra = free - (card_bytes - context)
    if extra <= 0:
        return None
    return torch.empty(extra, dtype=torch.uint8, device="cuda")


def worker_make(spec: dict[str, Any]) -> dict[str, Any]:
    """A random-weight model folder of the shape, with the tokenizer's files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(spec["dest"])
    config = json.loads(Path(spec["config"]).read_text()) if spec.get("config") else dict(TINY)
    tokenizer = Path(spec["tokenizer"])
    vocab = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    # The embedded tokenizer's ids must be valid rows: a smaller vocabulary grows to it (reported).
    config["vocab_size"] = max(config.get("vocab_size", 0), vocab)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.pop(name, None)
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file() and name != "config.json":
            shutil.copy(tokenizer / name, dest / name)
    cfg = AutoConfig.for_model(**config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(dest, max_shard_size="4GB")
    return {
        "path": str(dest),
        "vocab_size": config["vocab_size"],
        "params": sum(p.numel() for p in model.parameters()),
    }


def full_length_data(path: Path, records: int = 32) -> Path:
    """Records long enough that every training row is cut at cutoff_len."""
    body = " ".join(f"Alpacas graze in the high Andes and keep their herd close, day {i}." for i in range(60))
    rows = [
        {"instruction": f"Describe day {i} of an alpaca herd.", "input": "", "output": body}
        for i in range(records)
    ]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def worker_train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from finetune.config import DataConfig, TrainConfig
    from finetune.training.trainer import train

    hold = ballast(spec.get("card"))
    cuda = torch.cuda.is_available()
    cfg = TrainConfig(
        base_model=spec["model"],
        output_dir=spec["output"],
        max_steps=3,
        batch_size=spec["micro_batch_size"],
        micro_batch_size=spec["micro_batch_size"],
        quantization=spec["quantization"],
        gradient_checkpointing=spec["gradient_checkpointing"],
        eval_recall=0,
        eval_generate=0,
        stop_patience=0,
        data=DataConfig(data_path=spec["data"], cutoff_len=spec["cutoff_len"], val_set_size=0),
    )
    start = time.perf_counter()
    try:
        result = train(cfg)
    except torch.OutOfMemoryError as exc:
        return {"outcome": "out of memory", "error": str(exc).splitlines()[0], "peak_bytes": _peak(cuda)}
    seconds = time.perf_counter() - start
    card = result.card
    del hold
    return {
        "outcome": "trained",
        "peak_bytes": _peak(cuda),
        "seconds": round(seconds, 1),
        "tokens_per_second": card.get("training", {}).get("tokens_per_second"),
        "losses": [s["loss"] for s in card["history"]["steps"]],
    }


def _peak(cuda: bool) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated()) if cuda else None


def prompt_of(tokenizer: Any, tokens: int) -> str:
    """Plain words that tokenize to about `tokens` tokens."""
    words = [
        "the",
        "alpaca",
        "walks",
        "along",
        "the",
        "ridge",
        "and",
        "looks",
        "at",
        "the",
        "valley",
        "below",
    ]
    text = " ".join(words[i % len(words)] for i in range(tokens))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def worker_serve(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from finetune.config import GenerationSettings
    from finetune.engine.requests import GenerationStats
    from finetune.serving.server import ModelServer

    hold = ballast(spec.get("card"))
    cuda = torch.cuda.is_available()
    start = time.perf_counter()
    server = ModelServer(base_model=spec["model"])
    setup_s = time.perf_counter() - start
    settings = GenerationSettings(max_new_tokens=64, temperature=0)
    rows = []
    for n in [*spec["prompts"], 16]:  # the last: the request that must be served after the others
        prompt = prompt_of(server.tokenizer, n)
        stats = GenerationStats()
        row: dict[str, Any] = {"prompt_tokens": n}
        try:
            text = "".join(server.generate(prompt, settings=settings, prompt_template="none", stats=stats))
            row |= {
                "outcome": "served",
                "tokens": stats.output_token_count,
                "ttft_ms": round(stats.time_to_first_token * 1000, 1),
                "decode_tokens_per_second": round(
                    max(stats.output_token_count - 1, 0) / stats.decode_seconds, 1
                )
                if stats.decode_seconds
                else None,
                "chars": len(text),
            }
        except Exception as exc:  # a refusal or an error is what this row reports
            row |= {"outcome": "refused" if "KV cache" in str(exc) else "error", "error": str(exc)[:300]}
        rows.append(row)
    del hold
    return {
        "setup_s": round(setup_s, 1),
        "kv_tokens": server.engine.limits.kv_tokens,
        "peak_bytes": _peak(cuda),
        "requests": rows,
        "healthy": server.health_problem() is None,
    }


WORKERS = {"make": worker_make, "train": worker_train, "serve": worker_serve}


def run_worker(kind: str, spec: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """One measurement in a fresh process (its own CUDA context, its own peak)."""
    spec_path = work / f"{kind}-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "worker", kind, str(spec_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"outcome": "timed out", "timeout_s": timeout}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"outcome": "failed", "returncode": proc.returncode, "stderr": proc.stderr[-1500:]}
    return json.loads(lines[-1])


# -- the plan ------------------------------------------------------------------------------------
def shape_report(args: argparse.Namespace, shape: str, config: Path | None, work: Path) -> dict[str, Any]:
    from finetune.memory import plan

    card = None if args.dry_run else args.card
    made = run_worker(
        "make",
        {
            "dest": str(work / shape),
            "config": str(config) if config else None,
            "tokenizer": str(args.tokenizer),
        },
        work,
        240,
    )
    if "path" not in made:
        return {"shape": shape, "make": made}
    model = made["path"]
    cutoff, micro = (64, 2) if args.dry_run else (256, 4)
    # Every plan of this shape: the same model, card and batch; only the settings differ.
    planned = functools.partial(
        plan.plan_training,
        model,
        gpu_memory=card,
        micro_batch_size=micro,
        cutoff_len=cutoff,
        lora_r=8,
        lora_target_modules=["all-linear"],
    )
    auto = planned(quantization="auto", gradient_checkpointing="auto")
    runs = []
    tried = [(auto.settings["quantization"], auto.settings["gradient_checkpointing"], "auto")]
    for quantization, checkpointing in CANDIDATES:
        if not planned(quantization=quantization, gradient_checkpointing=checkpointing).fits:
            tried.append((quantization, checkpointing, "rejected"))
            break
    data = full_length_data(work / "data.json")
    for quantization, checkpointing, why in tried:
        expected = planned(quantization=quantization, gradient_checkpointing=checkpointing)
        measured = run_worker(
            "train",
            {
                "model": model,
                "output": str(work / f"{shape}-{quantization}-{checkpointing}"),
                "data": str(data),
                "card": card,
                "micro_batch_size": micro,
                "cutoff_len": cutoff,
                "quantization": quantization,
                "gradient_checkpointing": checkpointing,
            },
            work,
            240,
        )
        runs.append({"why": why, "plan": expected.to_json(), "measured": measured})
        log(f"{shape} train {quantization}/{checkpointing} ({why}): {measured.get('outcome')}")
    served = run_worker(
        "serve",
        {"model": model, "card": card, "prompts": [64, 128, 256] if args.dry_run else list(PROMPT_TOKENS)},
        work,
        240,
    )
    log(f"{shape} serve: {[r.get('outcome') for r in served.get('requests', [])]}")
    serving = plan.plan_serving(
        model, gpu_memory=card, max_rows=8, max_tokens=served.get("kv_tokens") or 4096
    )
    shutil.rmtree(work / shape, ignore_errors=True)  # the next shape needs the disk
    return {
        "shape": shape,
        "model": made,
        "training": runs,
        "serving": served,
        "serving_plan": serving.to_json(),
    }


def ratio(planned: int | None, measured: int | None) -> str:
    if not planned or not measured:
        return "–"
    return f"{planned / measured:.2f}"


def report(results: dict[str, Any]) -> str:
    lines = [f"# GPU check — {results['device']}", "", f"{results['date']} · {results['versions']}", ""]
    lines += [f"Emulated card: {results['card']}", ""]
    lines += ["## Training, planned against measured peak", ""]
    lines += [
        "| shape | settings | why | fits (plan) | planned GiB | measured GiB | planned / measured | outcome | tokens/s |"
    ]
    lines += ["|---|---|---|---|---:|---:|---:|---|---:|"]
    for s in results["shapes"]:
        for r in s.get("training", []):
            p, m = r["plan"], r["measured"]
            st = p["settings"]
            lines.append(
                f"| {s['shape']} | {st['quantization']}, checkpointing {st['gradient_checkpointing']}, "
                f"micro-batch {st['micro_batch_size']} | {r['why']} | {p['fits']} | {p['peak_bytes'] / GiB:.2f} | "
                f"{(m.get('peak_bytes') or 0) / GiB:.2f} | {ratio(p['peak_bytes'], m.get('peak_bytes'))} | "
                f"{m.get('outcome')} | {m.get('tokens_per_second') or '–'} |"
            )
    lines += ["", "## Serving (64 new tokens, greedy, defaults)", ""]
    lines += [
        "| shape | prompt tokens | outcome | TTFT ms | decode tokens/s | note |",
        "|---|---:|---|---:|---:|---|",
    ]
    for s in results["shapes"]:
        served = s.get("serving", {})
        for r in served.get("requests", []):
            lines.append(
                f"| {s['shape']} | {r['prompt_tokens']} | {r['outcome']} | {r.get('ttft_ms', '–')} | "
                f"{r.get('decode_tokens_per_second', '–')} | {r.get('error', '')[:120]} |"
            )
        if served:
            plan_peak = s.get("serving_plan", {}).get("peak_bytes")
            measured = served.get("peak_bytes")
            lines.append(
                f"| {s['shape']} | peak | planned {(plan_peak or 0) / GiB:.2f} GiB, measured "
                f"{(measured or 0) / GiB:.2f} GiB ({ratio(plan_peak, measured)}) | | | KV budget "
                f"{served.get('kv_tokens')} tokens, healthy after: {served.get('healthy')} |"
            )
    if results.get("baseline"):
        lines += ["", "## Training against HF Trainer + PEFT (Llama-3.2-1B shape)", "", results["baseline"]]
    return "\n".join(lines) + "\n"


def baseline_1b(work: Path, args: argparse.Namespace) -> str:
    """bench/run.py's training section on a random 1B folder: HF Trainer + PEFT fp32 and bf16, ours."""
    from bench.gpu_decode import model_folder

    folder, _ = model_folder("1b", args.tokenizer, work / "llama-1b", "cuda", True)
    env = {**os.environ, "BASE_MODEL": folder}
    cmd = [sys.executable, "bench/run.py", "--device", "cuda", "--quick", "--sections", "train"]
    cmd += ["--variants", "baseline,baseline_amp,ours", "--name", "gpu-check-train-1b", "--budget-min", "2.5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    md = ROOT / "bench" / "results" / "gpu-check-train-1b.md"
    if proc.returncode != 0 or not md.is_file():
        return f"bench/run.py failed ({proc.returncode}): {proc.stderr[-800:]}"
    return "See `bench/results/gpu-check-train-1b.md` (bench/run.py --quick, same machine, same run)."


def run(args: argparse.Namespace) -> int:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    results: dict[str, Any] = {
        "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": f"torch {torch.__version__}",
        "card": "none (dry run)" if args.dry_run else f"{args.card / GiB:.1f} GiB",
        "shapes": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-dry-run" if args.dry_run else "gpu-check"

    def save() -> None:  # after every part: a run cut short by its time limit still reports
        (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (out / f"{stem}.md").write_text(report(results))

    for shape in ["tiny"] if args.dry_run else shapes:
        config = None if shape == "tiny" else ROOT / "bench" / "configs" / f"{shape}.json"
        results["shapes"].append(shape_report(args, shape, config, work))
        save()
    if not args.dry_run and not args.no_baseline:
        results["baseline"] = baseline_1b(work, args)
        save()
    print(report(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--card", default="24564MiB", help="the card to emulate (an RTX 4090: 24564 MiB)")
    r.add_argument("--shapes", default="llama-2-7b,llama-3-8b")
    r.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer and config files (default: .gpu/tokenizer, else weights/)",
    )
    r.add_argument("--work", default="/tmp/gpu-check")
    r.add_argument("--out", default=str(ROOT / "bench" / "results"))
    r.add_argument("--dry-run", action="store_true")
    r.add_argument("--no-baseline", action="store_true", help="skip the 1B training comparison")
    t = sub.add_parser("trim-wheel")
    t.add_argument("wheel", type=Path)
    t.add_argument("--keep", nargs="+", required=True)
    w = sub.add_parser("worker")
    w.add_argument("kind", choices=sorted(WORKERS))
    w.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    if args.command == "trim-wheel":
        trim_wheel(args.wheel, args.keep)
        return 0
    if args.command == "worker":
        print(json.dumps(WORKERS[args.kind](json.loads(args.spec.read_text()))), flush=True)
        return 0
    from finetune.memory.plan import parse_memory

    args.card = parse_memory(args.card)
    if args.tokenizer is None:
        prepared = ROOT / ".gpu" / "tokenizer"
        args.tokenizer = prepared if prepared.is_dir() else ROOT / "weights" / "smollm2-135m-instruct"
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
