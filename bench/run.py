"""`make bench`: our training loop and predictor against the classic recipe, in one run.

    .venv/bin/python bench/run.py                   # full CPU run (~7 min on 2 quiet cores)
    .venv/bin/python bench/run.py --quick           # smoke test (~3 min)
    .venv/bin/python bench/run.py --device cuda     # what bench/gpu.sh runs

Sections: matmul ceiling, training (each variant in its own process, baseline and ours
alternating), inference (baseline and ours alternating rep by rep, plus the Cog HTTP round trip),
start-up, serving (1-8 concurrent clients through the real Cog server, one-at-a-time baseline). Writes bench/results/<name>.json and .md and prints the Markdown."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.common import BENCH_LORA, data_path, load_avg, log, median, read_json, write_json  # noqa: E402

SECTIONS = ("matmul", "train", "infer", "startup", "quant", "serve", "prefix")


@dataclass
class Plan:
    """How much of each section to run: fixed steps and tokens, so the run time is predictable."""

    steps: int
    batch_size: int
    rounds: list[list[str]]  # training variants per round; later rounds are optional (budget)
    decode_tokens: int
    reps: int
    http_reps: int
    startup_reps: int
    profile: bool
    explore: bool
    matmul_n: int
    matmul_reps: int
    micro_batch_size: int = 4
    cutoff_len: int = 256
    learning_rate: float = 3e-4
    seed: int = 42
    http_tokens: int = 8
    serve_clients: tuple[int, ...] = (1, 2, 4, 8)
    serve_per_client: int = 2
    serve_tokens: int = 64
    extras: dict[str, Any] = field(default_factory=dict)


PLANS = {
    # A fp32 baseline step of 8 GSM8K records (~1,400 tokens) takes ~7 s on 2 quiet cores.
    ("cpu", False): Plan(
        steps=6,
        batch_size=8,
        rounds=[
            ["baseline", "ours", "ours_fp32", "ours_grouped", "ours_other_packing"],
            ["ours", "baseline"],
        ],
        decode_tokens=128,
        reps=3,
        http_reps=5,
        startup_reps=3,
        profile=True,
        explore=True,
        matmul_n=2048,
        matmul_reps=3,
    ),
    ("cpu", True): Plan(
        steps=3,
        batch_size=8,
        rounds=[["baseline", "ours"]],
        decode_tokens=32,
        reps=1,
        http_reps=3,
        startup_reps=1,
        profile=False,
        explore=False,
        matmul_n=2048,
        matmul_reps=2,
        serve_clients=(1, 8),
        serve_per_client=2,
        serve_tokens=16,
    ),
    # A GPU run must fit 5 minutes: most of it is process start-up (imports, CUDA context, loading).
    ("cuda", False): Plan(
        steps=20,
        batch_size=16,
        rounds=[
            ["baseline", "baseline_amp", "ours", "ours_other_packing", "ours_qlora4"],
            ["ours", "baseline"],
        ],
        decode_tokens=128,
        reps=3,
        http_reps=5,
        startup_reps=1,
        profile=True,
        explore=True,
        matmul_n=8192,
        matmul_reps=10,
    ),
    ("cuda", True): Plan(
        steps=6,
        batch_size=16,
        rounds=[["baseline", "ours", "ours_qlora4"]],
        decode_tokens=64,
        reps=2,
        http_reps=3,
        startup_reps=1,
        profile=False,
        explore=False,
        matmul_n=8192,
        matmul_reps=5,
    ),
}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.plan = PLANS[(args.device, args.quick)]
        if args.steps:
            self.plan.steps = args.steps
        if args.variants:
            self.plan.rounds = [args.variants.split(",")]
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + args.budget_min * 60
        self.workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        self.failures: list[str] = []
        self.notes: list[str] = []

    # -- plumbing ------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def worker(
        self, module: str, name: str, spec: dict[str, Any], timeout: float = 1800, jemalloc: bool = False
    ) -> dict[str, Any]:
        """Run `python -m bench.<module> spec out` in a fresh process; its output goes to a log.
        `jemalloc`: preload it where the system has it, as our training entry points do."""
        spec = {"device": self.device, "threads": self.args.threads, "workdir": str(self.workdir), **spec}
        spec_path, out_path = self.workdir / f"{name}.spec.json", self.workdir / f"{name}.json"
        log_path = self.workdir / f"{name}.log"
        write_json(spec_path, spec)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
        # One compile cache for the run's servers, so that a user's cache neither helps nor changes.
        env.setdefault("SERVE_COMPILE_CACHE", str(self.workdir / "compiled"))
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # our trainer picks CUDA whenever it sees one
        if self.args.omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = self.args.omp_wait_policy.upper()
        if jemalloc:
            from finetune.training.allocator import with_jemalloc

            env = with_jemalloc(env)
        t0 = time.perf_counter()
        with open(log_path, "wb") as out:
            proc = subprocess.run(
                [sys.executable, "-m", f"bench.{module}", str(spec_path), str(out_path)],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        if proc.returncode != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace")[-2500:]
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); end of {log_path}:\n{tail}")
        log(f"{name}: {time.perf_counter() - t0:.0f} s (total {self.elapsed():.0f} s)")
        return read_json(out_path)

    # -- sections ------------------------------------------------------------------------------
    def matmul(self) -> dict[str, Any]:
        from bench.matmul import measure

        return measure(self.device, self.plan.matmul_n, self.plan.matmul_reps)

    def training_data(self) -> tuple[Path, int]:
        """The first steps x batch_size records of the data set, written to the work folder (one
        epoch of exactly the timed steps; the real data is never copied into the project)."""
        source = data_path()
        records = json.loads(source.read_text())
        need = self.plan.steps * self.plan.batch_size
        chosen = (records * (need // len(records) + 1))[:need]
        dest = self.workdir / "train.json"
        dest.write_text(json.dumps(chosen))
        return dest, len(chosen)

    def train(self, data: Path, ceiling: dict[str, Any]) -> dict[str, Any]:
        p = self.plan
        spec = {
            "data_path": str(data),
            "steps": p.steps,
            "batch_size": p.batch_size,
            "micro_batch_size": p.micro_batch_size,
            "learning_rate": p.learning_rate,
            "seed": p.seed,
            "cutoff_len": p.cutoff_len,
        }
        from bench.train_worker import other_packing_variant, preloads_jemalloc

        runs: list[dict[str, Any]] = []
        errors: list[str] = []
        round_seconds: list[float] = []
        for rnd, variants in enumerate(p.rounds, start=1):
            if rnd > 1:
                # Optional rounds repeat baseline and ours in reverse order; skip them when the
                # first round says they would not fit the time budget.
                estimate = round_seconds[0] * len(variants) / len(p.rounds[0]) * 1.3
                if time.perf_counter() + estimate + self.reserve_after_training() > self.deadline:
                    self.notes.append(f"training round {rnd} skipped: it would not fit the time budget")
                    continue
            t_round = time.perf_counter()
            for variant in variants:
                if variant == "ours_other_packing":
                    variant = other_packing_variant()
                try:
                    out = self.worker(
                        "train_worker",
                        f"train-r{rnd}-{variant}",
                        {**spec, "variant": variant},
                        jemalloc=preloads_jemalloc(variant),
                    )
                    out["round"] = rnd
                    runs.append(out)
                except Exception as exc:  # one variant failing (e.g. bitsandbytes missing) is reported
                    errors.append(f"{variant}: {str(exc).splitlines()[0]}")
                    self.failures.append(str(exc))
                    log(str(exc))
            round_seconds.append(time.perf_counter() - t_round)
        result: dict[str, Any] = {
            "settings": {
                **{
                    k: spec[k]
                    for k in ("steps", "batch_size", "micro_batch_size", "cutoff_len", "learning_rate")
                },
                "lora_r": BENCH_LORA["lora_r"],
                "targets": BENCH_LORA["lora_target_modules"],
            },
            "runs": runs,
            "variants": report.aggregate_training(runs, ceiling["bf16_gflops"], ceiling["fp32_gflops"]),
            "round_ratios": report.round_ratios(runs),
            "errors": errors,
        }
        if p.profile and time.perf_counter() + 60 + self.reserve_after_training() < self.deadline:
            try:
                result["profile"] = self.worker(
                    "profile_worker", "train-profile", {**spec, "variant": "ours"}
                )
            except Exception as exc:
                self.failures.append(str(exc))
        return result

    def reserve_after_training(self) -> float:
        """Seconds the inference and start-up sections need (2 CPU cores; on a GPU, mostly start-up)."""
        if self.device == "cuda":
            return 60 if self.args.quick else 120
        return 150 if self.args.quick else 260

    def inference(self, adapter: str | None) -> dict[str, Any]:
        p = self.plan
        explore = p.explore and self.deadline - time.perf_counter() > 240
        return self.worker(
            "infer_worker",
            "infer",
            {
                "adapter_dir": adapter,
                "decode_tokens": p.decode_tokens,
                "reps": p.reps,
                "http_reps": 0 if self.args.no_http else p.http_reps,
                "http_tokens": p.http_tokens,
                "explore": explore,
                "profile": p.profile,
            },
        )

    def startup(self, adapter: str | None) -> dict[str, Any]:
        """`ModelServer()` as Cog's setup() pays it (transformers' lazy imports included) three times;
        once with those imports done first (what construction alone costs); once with the adapter."""
        reps: dict[str, list[dict[str, Any]]] = {"base": [], "base_preimported": [], "adapter": []}
        for rep in range(self.plan.startup_reps):
            if rep and time.perf_counter() + 30 > self.deadline:
                self.notes.append(f"start-up: {rep} rep(s) only, to fit the time budget")
                break
            kinds = ["base"] + (["base_preimported", "adapter"] if rep == 0 and not self.args.quick else [])
            for kind in kinds:
                if kind == "adapter" and not adapter:
                    continue
                spec = {
                    "adapter_dir": adapter if kind == "adapter" else None,
                    "preimport": kind == "base_preimported",
                }
                reps[kind].append(self.worker("startup_worker", f"startup-{kind}-{rep}", spec))
        out: dict[str, Any] = {"how": "one fresh process per measurement, page cache warm"}
        for kind, runs in reps.items():
            if runs:
                out[kind] = {
                    "construct_s_median": round(median([r["construct_s"] for r in runs]), 3),
                    "import_s_median": round(median([r["import_s"] for r in runs]), 3),
                    "reps": [r["construct_s"] for r in runs],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                }
        return out

    def random_adapter(self) -> str:
        """The adapter the serving sections load when no training section made one."""
        from bench.infer_worker import random_adapter
        from finetune.model.weights import resolve_base_model

        return str(random_adapter(resolve_base_model(None), self.workdir / "random-adapter"))

    def quant(self, adapter: str) -> dict[str, Any]:
        """One process per serving precision, fp32 first (the others compare their greedy tokens
        with its); each alternates with plain `generate` fp32 for its ratio."""
        from finetune.serving.server import pick_quantization
        from finetune.settings import COMPILE_ENV, QUANT_ENV

        default = pick_quantization(os.environ.get(QUANT_ENV) or "auto", *_cpu_fp32())
        p = self.plan
        rows = []
        cache = str(self.workdir / "compiled-quant")
        for compile_on in (False, True):
            for mode in ("fp32", "bf16", "int8", "int4"):
                if compile_on and mode == "bf16":
                    continue  # cpu_compile.load leaves bf16 weights eager (it says why)
                spec = {
                    "mode": mode,
                    "compile": compile_on,
                    "compile_cache": cache,
                    "adapter_dir": adapter,
                    "decode_tokens": p.decode_tokens,
                    "reps": p.reps,
                }
                name = f"quant-{mode}{'-compiled' if compile_on else ''}"
                try:
                    rows.append(self.worker("quant_worker", name, spec))
                except Exception as exc:  # one mode failing (say, compiled bf16) keeps the others' rows
                    self.failures.append(str(exc))
                    log(str(exc))
        compile_default = (os.environ.get(COMPILE_ENV) or "auto") == "auto"
        out = {
            "default": "fp32" if default == "none" else default,
            "default_compiled": compile_default,
            "rows": rows,
        }
        if importlib.util.find_spec("llama_cpp") is None:
            self.notes.append("llama.cpp reference rows skipped: llama-cpp-python is not installed")
        else:
            spec = {"adapter_dir": adapter, "decode_tokens": p.decode_tokens, "reps": p.reps}
            try:
                out["llama_cpp"] = self.worker("llamacpp_worker", "quant-llamacpp", spec)["rows"]
            except Exception as exc:  # a reference, not ours: its failure keeps our rows
                self.failures.append(str(exc))
                log(str(exc))
        return out

    def serving(self, adapter: str) -> dict[str, Any]:
        p = self.plan
        spec = {
            "adapter_dir": adapter,
            "clients": list(p.serve_clients),
            "per_client": p.serve_per_client,
            "max_new_tokens": p.serve_tokens,
        }
        return self.worker("serve_worker", "serve", spec)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import peft
        import torch
        import transformers

        from bench.common import setup_torch

        setup_torch(self.device, self.args.threads)
        sections = set(self.args.sections.split(","))
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        results: dict[str, Any] = {}
        load_start = load_avg()
        data, n_records = self.training_data()
        log(f"bench on {self.device} ({'quick' if self.args.quick else 'full'}), work folder {self.workdir}")

        matmul_runs = []
        if "matmul" in sections or "train" in sections:
            matmul_runs.append(self.matmul())
            log(
                f"matmul: fp32 {matmul_runs[0]['fp32_gflops']} / bf16 {matmul_runs[0]['bf16_gflops']} GFLOP/s"
            )
        ceiling = _merge_matmul(matmul_runs)

        adapter = None
        if "train" in sections:
            results["training"] = self.train(data, ceiling)
            ours = [r for r in results["training"]["runs"] if r["variant"] == "ours"]
            adapter = ours[0]["adapter_dir"] if ours else None
        if sections & {"infer", "startup", "serve", "prefix"} and self.device == "cpu":
            # The default server compiles its decode step on a first start: once here, so that the
            # sections after it time warm starts (the quant section times first starts itself).
            first = self.worker("startup_worker", "compile-first-start", {"adapter_dir": None})
            results["compile_first_start_s"] = first["construct_s"]
            log(
                f"first start (compiles the decode step unless SERVE_COMPILE=off): {first['construct_s']:.1f} s"
            )
        if "infer" in sections:
            try:
                results["inference"] = self.inference(adapter)
                adapter = adapter or str(self.workdir / "random-adapter")
            except Exception as exc:
                self.failures.append(str(exc))
                log(str(exc))
        if "startup" in sections:
            try:
                results["startup"] = self.startup(adapter)
            except Exception as exc:
                self.failures.append(str(exc))
                log(str(exc))
        if "quant" in sections and self.device == "cpu":
            try:
                adapter = adapter or self.random_adapter()
                results["quant"] = self.quant(adapter)
            except Exception as exc:
                self.failures.append(str(exc))
                log(str(exc))
        if "serve" in sections:
            try:
                adapter = adapter or self.random_adapter()
                results["serving"] = self.serving(adapter)
            except Exception as exc:
                self.failures.append(str(exc))
                log(str(exc))
        if "prefix" in sections:
            try:
                results["prefix"] = self.worker("prefix_worker", "prefix", {})
                p = results["prefix"]
                log(
                    f"shared context ({p['context_tokens']} tokens): TTFT {p['ttft_ms_median_on']} ms cached, "
                    f"{p['ttft_ms_median_off']} ms not ({p['ratio']}x)"
                )
            except Exception as exc:
                self.failures.append(str(exc))
                log(str(exc))
        if matmul_runs:
            matmul_runs.append(self.matmul())  # again at the end: the ceiling is the best seen
            results["matmul"] = _merge_matmul(matmul_runs)
            if "training" in results:  # recompute shares against the final ceiling
                tr = results["training"]
                tr["variants"] = report.aggregate_training(
                    tr["runs"], results["matmul"]["bf16_gflops"], results["matmul"]["fp32_gflops"]
                )

        results["meta"] = {
            "started": started,
            "wall_seconds": round(self.elapsed(), 1),
            "mode": "quick" if self.args.quick else "full",
            "device": self.device,
            "device_name": _device_name(self.device),
            "cpus": os.cpu_count(),
            "threads": self.args.threads if self.device == "cpu" else torch.get_num_threads(),
            "omp_wait_policy": self.args.omp_wait_policy,
            "load_avg_start": load_start,
            "load_avg_end": load_avg(),
            "data": os.path.relpath(data_path(), ROOT),
            "records": n_records,
            "plan": asdict(self.plan),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        }
        results["headline"] = report.headline(results)
        results["targets"] = report.check_targets(results["headline"])
        results["notes"] = self.notes + _standard_notes(results)
        if self.failures:
            results["failures"] = self.failures
        return results


def _cpu_fp32() -> tuple[Any, Any]:
    import torch

    return torch.device("cpu"), torch.float32


def _merge_matmul(runs: list[dict[str, Any]]) -> dict[str, Any]:
    if not runs:
        return {"fp32_gflops": None, "bf16_gflops": None}
    merged = dict(runs[0])
    merged["fp32_gflops"] = max(r["fp32_gflops"] for r in runs)
    merged["bf16_gflops"] = max(r["bf16_gflops"] for r in runs)
    merged["samples"] = {k: [x for r in runs for x in r["samples"][k]] for k in ("fp32", "bf16")}
    merged["rounds"] = sum(r["rounds"] for r in runs)
    return merged


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = Path("/proc/cpuinfo").read_text()
                return name + (" with AMX" if "amx_bf16" in flags else "")
    except OSError:
        pass
    return platform.processor() or "cpu"


def _standard_notes(results: dict[str, Any]) -> list[str]:
    notes = []
    meta = results["meta"]
    if meta["load_avg_start"] > meta["cpus"] or meta["load_avg_end"] > meta["cpus"]:
        notes.append(
            f"the machine was shared (load average above {meta['cpus']}): absolute figures are low and noisy; "
            "read the ratios, which come from alternating runs"
        )
    http = results.get("inference", {}).get("http", {})
    if http.get("transport_ms") is not None and abs(http["overhead_ms"] - http["transport_ms"]) > 20:
        notes.append(
            f"HTTP overhead by the target's definition ({http['overhead_ms']} ms) is dominated by the Cog "
            f"worker and this process decoding at different speeds; the server + IPC part alone is "
            f"{http['transport_ms']} ms (HTTP wall − coglet's predict_time)"
        )
    if meta["omp_wait_policy"] == "passive":
        notes.append(
            "OMP_WAIT_POLICY=PASSIVE was set for every measured process: sleeping OpenMP threads are woken for every "
            "operator, which costs small-operator work such as decoding the most; absolute decode and TTFT "
            "figures are pessimistic"
        )
    runs = results.get("training", {}).get("runs", [])
    if meta["device"] == "cpu" and any(r["cpu_utilisation"] < 0.75 * meta["threads"] for r in runs):
        notes.append(
            "training used about "
            + ", ".join(f"{r['variant']} {r['cpu_utilisation']}" for r in runs)
            + f" CPU-seconds per second with {meta['threads']} threads (the CPU util column): the rest went "
            "to serial work, sleeping OpenMP threads or other processes"
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps and tokens: a smoke test")
    parser.add_argument("--steps", type=int, default=0, help="training steps per variant (default: per plan)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads in every measured process (CPU)"
    )
    parser.add_argument(
        "--variants", default="", help="training variants, comma list, one round (default: per plan)"
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--no-http", action="store_true", help="skip the Cog HTTP round trip")
    parser.add_argument(
        "--omp-wait-policy",
        choices=["auto", "default", "passive", "active"],
        default="auto",
        help="OMP_WAIT_POLICY for every measured process; auto = passive when the machine is already busy "
        "(spinning OpenMP threads collapse when another process takes a core), else the library default",
    )
    parser.add_argument("--budget-min", type=float, default=14.0, help="skip optional runs past this")
    parser.add_argument("--name", default="", help="results file stem (default: latest, or gpu on CUDA)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, adapters)")
    args = parser.parse_args(argv)
    if args.steps == 1:
        parser.error("--steps must be at least 2 (step 1 is the untimed warm-up)")
    if args.omp_wait_policy == "auto":
        busy = args.device == "cpu" and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
        args.omp_wait_policy = "passive" if busy else "default"
    if args.device == "cpu" and args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # before torch loads OpenMP
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        if not args.keep and not bench.failures:
            import shutil

            shutil.rmtree(bench.workdir, ignore_errors=True)
        else:
            log(f"work folder kept: {bench.workdir}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("gpu" if args.device == "cuda" else "latest")
    # The work folder is gone after the run: record its files relative to it, not as machine paths.
    results = json.loads(json.dumps(results).replace(str(bench.workdir), "<workdir>"))
    write_json(out / f"{stem}.json", results)
    text = report.markdown(results)
    (out / f"{stem}.md").write_text(text)
    print(text)
    log(f"wrote {out / stem}.json and .md in {bench.elapsed():.0f} s")
    core_failed = (
        any(v not in results.get("training", {}).get("variants", {}) for v in ("baseline", "ours"))
        and "train" in args.sections
    )
    return 1 if core_failed or "inference" not in results and "infer" in args.sections else 0


if __name__ == "__main__":
    sys.exit(main())
