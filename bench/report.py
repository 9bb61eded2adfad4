"""Results dict -> headline figures, target checks and the Markdown report."""

from __future__ import annotations

from typing import Any

# (key, label, unit, comparison, threshold): the issue's targets.
TARGETS = (
    ("training_speedup", "training tokens/s ≥ 3× baseline (our defaults)", "×", ">=", 3.0),
    ("training_speedup_best", "training tokens/s ≥ 3× baseline (best of our variants)", "×", ">=", 3.0),
    (
        "training_ceiling_share",
        "training ≥ 50 % of the matmul ceiling (faster of bf16, fp32)",
        "%",
        ">=",
        50.0,
    ),
    ("decode_speedup", "decode tokens/s ≥ 3× plain generate", "×", ">=", 3.0),
    ("ttft_ms", "time to first token ≤ 100 ms", "ms", "<=", 100.0),
    ("setup_s", "setup (ModelServer construction) ≤ 3 s", "s", "<=", 3.0),
    ("http_overhead_ms", "Cog HTTP overhead ≤ 20 ms", "ms", "<=", 20.0),
    ("quant_decode_x", "default serving precision decodes ≥ 2.5× plain generate fp32", "×", ">=", 2.5),
    ("quant_decode_tps", "default serving precision decodes ≥ 70 tokens/s", "tok/s", ">=", 70.0),
    ("quant_ttft_ms", "default serving precision: time to first token ≤ 60 ms", "ms", "<=", 60.0),
    ("quant_setup_s", "default serving precision: setup ≤ 3 s warm", "s", "<=", 3.0),
    ("quant_loss_delta_pct", "default serving precision: held-out loss within 2 % of fp32", "%", "<=", 2.0),
    ("serve_scaling", "serving: 8 clients' throughput ≥ 4× one client's", "×", ">=", 4.0),
    ("serve_ttft_p95_ms", "serving: p95 time to first token at 8 clients ≤ 1 s", "ms", "<=", 1000.0),
    ("serve_mixed_share", "serving: 4 mixed adapters ≥ 0.8× the setup adapter's throughput", "×", ">=", 0.8),
    ("serve_one_client", "serving: one client no slower than the one-at-a-time server", "×", ">=", 1.0),
)


def serving_rows(results: dict[str, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    """case -> clients -> row."""
    return {
        c["case"]: {r["clients"]: r for r in c["rows"]} for c in results.get("serving", {}).get("cases", [])
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def aggregate_training(runs: list[dict[str, Any]], bf16_gflops: float, fp32_gflops: float) -> dict[str, Any]:
    """Per variant: tokens/s over all its runs' timed steps, FLOP/s (4 x params x tokens/s for LoRA),
    shares of the measured ceilings, memory and loss."""
    variants: dict[str, Any] = {}
    ceiling = max(bf16_gflops or 0, fp32_gflops or 0)
    for name in dict.fromkeys(r["variant"] for r in runs if "error" not in r):
        mine = [r for r in runs if r.get("variant") == name and "error" not in r]
        tps = sum(r["steady_tokens"] for r in mine) / sum(r["steady_seconds"] for r in mine)
        gflops = 4 * mine[0]["total_params"] * tps / 1e9
        losses = mine[0]["loss_per_step"]
        last = losses[-min(3, len(losses)) :]
        variants[name] = {
            "about": mine[0]["about"],
            "compute_dtype": mine[0]["compute_dtype"],
            "jemalloc": mine[0].get("jemalloc", False),
            "runs": len(mine),
            "tokens_per_second": round(tps, 2),
            "runs_tokens_per_second": [r["tokens_per_second"] for r in mine],
            "achieved_gflops": round(gflops, 1),
            # The ceiling is the faster dtype here: bf16 on AMX or a GPU, fp32 where bf16 is a slow
            # fallback (an AVX2 CPU: 1.8 against 66 GFLOP/s), and training computes in fp32.
            "share_of_ceiling_pct": round(100 * gflops / ceiling, 1) if ceiling else None,
            "share_of_fp32_ceiling_pct": round(100 * gflops / fp32_gflops, 1) if fp32_gflops else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "peak_gpu_mb": max((r["peak_gpu_mb"] or 0) for r in mine) or None,
            "loss_step1": losses[0] if losses else None,
            "loss_last3_mean": round(sum(last) / len(last), 4) if last else None,
            "loss_per_step": losses,
            "cpu_utilisation": [r["cpu_utilisation"] for r in mine],
            "padding_efficiency": mine[0]["padding_efficiency"],
        }
    base = variants.get("baseline", {}).get("tokens_per_second")
    for v in variants.values():
        v["x_baseline"] = _ratio(v["tokens_per_second"], base)
    return variants


def round_ratios(runs: list[dict[str, Any]]) -> list[float]:
    """ours / baseline within each round that ran both (the noise-robust view)."""
    out = []
    for rnd in sorted({r["round"] for r in runs}):
        tps = {r["variant"]: r["tokens_per_second"] for r in runs if r["round"] == rnd and "error" not in r}
        if "ours" in tps and "baseline" in tps:
            out.append(round(tps["ours"] / tps["baseline"], 2))
    return out


def headline(results: dict[str, Any]) -> dict[str, Any]:
    h: dict[str, Any] = {}
    tv = results.get("training", {}).get("variants", {})
    if "ours" in tv:
        h["training_speedup"] = tv["ours"].get("x_baseline")
        # Variants that change the data order or precision count; fp32 is only there for reference.
        best = max(
            (k for k in tv if k.startswith("ours") and k != "ours_fp32"),
            key=lambda k: tv[k]["tokens_per_second"],
        )
        h["training_speedup_best"] = tv[best].get("x_baseline")
        h["training_best_variant"] = best
        h["training_ceiling_share"] = tv[best]["share_of_ceiling_pct"]
    inf = results.get("inference", {})
    if "ours" in inf:
        h["decode_speedup"] = _ratio(inf["ours"]["decode_tps"], inf["baseline"]["decode_tps"])
        h["ttft_ms"] = inf["ours"]["ttft_ms"]
    if inf.get("http", {}).get("overhead_ms") is not None:
        h["http_overhead_ms"] = inf["http"]["overhead_ms"]
    st = results.get("startup", {}).get("base")
    if st:
        h["setup_s"] = st["construct_s_median"]
    qt = results.get("quant")
    if qt:
        by_mode = {(r["mode"], r.get("compiled", False)): r for r in qt["rows"]}
        d = by_mode.get((qt["default"], qt.get("default_compiled", False)))
        fp32 = by_mode.get(("fp32", False))
        if d:
            h["quant_default"] = qt["default"] + (" compiled" if d.get("compiled") else "")
            h["quant_decode_x"] = d["vs_generate_fp32"]
            h["quant_decode_tps"] = d["decode_tps"]
            h["quant_ttft_ms"] = d["ttft_ms"]
            h["quant_setup_s"] = d["setup_s"]
            if fp32:
                h["quant_loss_delta_pct"] = round(100 * abs(d["heldout_loss"] / fp32["heldout_loss"] - 1), 2)
    sv = serving_rows(results)
    ours, base, mixed = sv.get("setup_adapter", {}), sv.get("baseline", {}), sv.get("four_adapters", {})
    if 1 in ours and 8 in ours:
        h["serve_scaling"] = _ratio(ours[8]["tokens_per_second"], ours[1]["tokens_per_second"])
        h["serve_ttft_p95_ms"] = ours[8]["ttft_ms_p95"]
    if 8 in ours and 8 in mixed:
        h["serve_mixed_share"] = _ratio(mixed[8]["tokens_per_second"], ours[8]["tokens_per_second"])
    if 1 in ours and 1 in base:
        h["serve_one_client"] = _ratio(ours[1]["tokens_per_second"], base[1]["tokens_per_second"])
    return h


def check_targets(h: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, label, unit, op, threshold in TARGETS:
        value = h.get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        if key in ("training_speedup_best", "training_ceiling_share") and h.get("training_best_variant"):
            label += f" — {h['training_best_variant']}"
        out.append({"key": key, "target": label, "value": value, "unit": unit, "met": met})
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def _mark(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "NOT met")


def _ops_table(title: str, prof: dict[str, Any], top: int = 6) -> list[str]:
    fam = ", ".join(f"{k} {v} %" for k, v in prof["families_pct"].items())
    lines = [
        f"*{title}* — wall {prof['wall_ms']:.0f} ms under the profiler, operators {prof['op_total_ms']:.0f} ms "
        f"({prof['clock']}); by family: {fam}",
        "",
        "| operator | self ms | share | calls |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share_pct']} % | {o['calls']} |"
        for o in prof["top_ops"][:top]
    ]
    return lines + [""]


def headline_table(results: dict[str, Any]) -> list[str]:
    """Baseline against ours, side by side, with the ratio."""
    rows = []
    tv = results.get("training", {}).get("variants", {})
    b, o = tv.get("baseline"), tv.get("ours")
    if b and o:
        rows += [
            ("training tokens/s (non-padding)", b["tokens_per_second"], o["tokens_per_second"], 1),
            ("training % of the matmul ceiling", b["share_of_ceiling_pct"], o["share_of_ceiling_pct"], 1),
            ("training peak RSS MB", b["peak_rss_mb"], o["peak_rss_mb"], 0),
            ("training loss, mean of last 3 steps", b["loss_last3_mean"], o["loss_last3_mean"], 4),
        ]
    inf = results.get("inference", {})
    if "ours" in inf:
        rows += [
            ("decode tokens/s", inf["baseline"]["decode_tps"], inf["ours"]["decode_tps"], 2),
            ("time to first token ms", inf["baseline"]["ttft_ms"], inf["ours"]["ttft_ms"], 1),
        ]
    if inf.get("http", {}).get("http_ms") is not None:
        rows.append(
            (
                "short generation ms: in-process → HTTP",
                inf["http"]["in_process_ms"],
                inf["http"]["http_ms"],
                1,
            )
        )
    if not rows:
        return []
    lines = [
        "## Baseline vs ours",
        "",
        "| figure | baseline | ours | ours / baseline |",
        "|---|---:|---:|---:|",
    ]
    for label, base, ours, digits in rows:
        lines.append(
            f"| {label} | {_fmt(base, digits)} | {_fmt(ours, digits)} | {_fmt(_ratio(ours, base), 2)} |"
        )
    return lines + [""]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# Benchmark — {meta['device_name']} ({meta['mode']})",
        "",
        f"{meta['started']} · {meta['wall_seconds']:.0f} s total · torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}, peft {meta['versions']['peft']} · "
        f"threads {meta['threads']} · OMP_WAIT_POLICY {meta['omp_wait_policy']} · "
        f"load average {meta['load_avg_start']} → {meta['load_avg_end']} on {meta['cpus']} CPUs",
        "",
        f"Data: `{meta['data']}` ({meta['records']} records, first ones, same order for every variant).",
        "",
        *headline_table(results),
        "## Targets",
        "",
        "| target | value | |",
        "|---|---:|---|",
    ]
    for t in results.get("targets", []):
        lines.append(f"| {t['target']} | {_fmt(t['value'], 2)} {t['unit']} | {_mark(t['met'])} |")

    mm = results.get("matmul")
    if mm:
        lines += [
            "",
            f"## Matmul ceiling ({mm['n']}³, best of {mm['reps']} × {mm['rounds']} rounds, start and end of the run)",
            "",
            f"fp32 **{_fmt(mm['fp32_gflops'])} GFLOP/s**, bf16 **{_fmt(mm['bf16_gflops'])} GFLOP/s** "
            f"(bf16/fp32 {_fmt(_ratio(mm['bf16_gflops'], mm['fp32_gflops']), 2)}×); samples {mm['samples']}",
        ]
        if mm.get("bf16_n", mm["n"]) != mm["n"]:
            lines.append(
                f"bf16 was timed on one {mm['bf16_n']}³ product a round: this CPU has no AMX or "
                "AVX512-BF16, and its bf16 GEMM is a slow fallback."
            )

    tr = results.get("training")
    if tr and tr.get("variants"):
        s = tr["settings"]
        lines += [
            "",
            f"## Training ({s['steps']} steps × {s['batch_size']} records, micro-batch {s['micro_batch_size']}, "
            f"LoRA r={s['lora_r']} on {'/'.join(s['targets'])}, cutoff {s['cutoff_len']}, lr {s['learning_rate']})",
            "",
            "Non-padding tokens/s over steps 2..N (step 1 pays one-off costs), measured the same way for "
            "every variant; FLOP/s = 4 × params × tokens/s.",
            "",
            "| variant | compute | tokens/s | × baseline | GFLOP/s | % of ceiling | peak RSS MB | "
            "loss step 1 | loss, mean of last 3 | CPU util |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, v in tr["variants"].items():
            lines.append(
                f"| {name} ({v['about']}) | {v['compute_dtype']}{', jemalloc' if v.get('jemalloc') else ''} | "
                f"{_fmt(v['tokens_per_second'])} | "
                f"{_fmt(v['x_baseline'], 2)} | {_fmt(v['achieved_gflops'])} | "
                f"{_fmt(v['share_of_ceiling_pct'])} | {_fmt(v['peak_rss_mb'], 0)} | "
                f"{_fmt(v['loss_step1'], 4)} | {_fmt(v['loss_last3_mean'], 4)} | {v['cpu_utilisation']} |"
            )
        if tr.get("round_ratios"):
            lines += ["", f"ours / baseline within each round: {tr['round_ratios']}"]
        if tr.get("errors"):
            lines += ["", "Failed variants: " + "; ".join(tr["errors"])]
        prof = tr.get("profile")
        if prof:
            lines += [
                "",
                f"### Where a training micro-batch goes ({prof['examples']} examples, {prof['tokens']} tokens)",
                "",
            ]
            for name in prof.get("cases", []):
                if name in prof:
                    p = prof[name]
                    lines += _ops_table(
                        f"{name} (rows×width {p['rows_x_width']}, {p['step_ms']:.0f} ms unprofiled)", p
                    )

    inf = results.get("inference")
    if inf and "ours" in inf:
        b, o = inf["baseline"], inf["ours"]
        lines += [
            "",
            f"## Inference ({inf['prompt_tokens']}-token prompt, {inf['max_new_tokens']} new tokens, greedy, "
            f"median of {inf['reps']}; adapter: {inf['adapter']})",
            "",
            "| | TTFT ms | decode tokens/s | tokens |",
            "|---|---:|---:|---|",
            f"| baseline: `generate`, fp32, LoRA unmerged | {_fmt(b['ttft_ms'])} | {_fmt(b['decode_tps'], 2)} | {b['tokens']} |",
            f"| ours: ModelServer ({inf['server_precision']}, merged={inf['server_merged']}) | "
            f"{_fmt(o['ttft_ms'])} | {_fmt(o['decode_tps'], 2)} | {o['tokens']} |",
            f"| ratio ours/baseline | {_fmt(_ratio(o['ttft_ms'], b['ttft_ms']), 2)} | "
            f"{_fmt(_ratio(o['decode_tps'], b['decode_tps']), 2)} | |",
            "",
            f"Same text from both: {inf['same_output']}. Per rep: baseline {b['reps_decode_tps']} tok/s, "
            f"ours {o['reps_decode_tps']} tok/s.",
        ]
        if inf.get("whatif"):
            lines += [
                "",
                "What-if (one rep each after a warm-up; `server_bf16_weights` is the `SERVE_DTYPE=bfloat16` opt-in, "
                "median of the reps):",
                "",
                "| variant | TTFT ms | decode tokens/s | same text as ours (fp32) |",
                "|---|---:|---:|---|",
            ]
            for k, v in inf["whatif"].items():
                same = v.get("same_text_as_fp32", "–")
                lines.append(f"| {k} | {_fmt(v['ttft_ms'])} | {_fmt(v['decode_tps'], 2)} | {same} |")
        floor = inf.get("floor")
        if floor:
            need = 1000 / (3 * b["decode_tps"]) if b.get("decode_tps") else None
            lines += [
                "",
                f"Weight-streaming floor: one matrix-vector pass over the {floor['matrices']} weight matrices "
                f"({floor['parameters'] / 1e6:.0f} M parameters, what every decoded token must read) takes "
                f"**{floor['fp32']['ms']} ms** in fp32 ({floor['fp32']['mb']} MB at {floor['fp32']['gb_per_s']} GB/s) "
                f"and **{floor['bf16']['ms']} ms** in bf16 ({floor['bf16']['mb']} MB at "
                f"{floor['bf16']['gb_per_s']} GB/s), against {_fmt(1000 / o['decode_tps'] if o.get('decode_tps') else None)} "
                f"ms per token for ours; 3× plain generate would need {_fmt(need)} ms per token.",
            ]
        prof = inf.get("profile")
        if prof:
            lines += ["", f"### Where a {prof['tokens']}-token generation goes ({prof['note']})", ""]
            lines += _ops_table("ours (merged)", prof["ours_ops"])
            lines += _ops_table("baseline (generate, unmerged LoRA)", prof["baseline_ops"])
            py = prof["ours_python"]
            lines += [
                f"*ours, Python view (cProfile, own time; wall {py['wall_ms']:.0f} ms)*",
                "",
                "| function | own ms | share | calls |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| `{f['function']}` | {f['own_ms']} | {f['share_pct']} % | {f['calls']} |"
                for f in py["top_functions"]
            ]
        http = inf.get("http")
        if http and "error" in http:
            lines += ["", f"Cog HTTP round trip failed: {http['error'].splitlines()[0]}"]
        elif http:
            lines += [
                "",
                f"## Cog HTTP round trip ({http['max_new_tokens']} new tokens, greedy, median of {http['reps']})",
                "",
                f"HTTP `POST /predictions` {_fmt(http['http_ms'])} ms vs in-process `ModelServer.generate` "
                f"{_fmt(http['in_process_ms'])} ms → overhead **{_fmt(http['overhead_ms'])} ms** "
                f"(coglet's own predict_time {_fmt(http['cog_predict_time_ms'])} ms, so server + IPC alone "
                f"{_fmt(http.get('transport_ms'))} ms per request; server READY after "
                f"{http['server_ready_s']} s; same output: {http['same_output']}).",
            ]

    qt = results.get("quant")
    if qt:
        fp32 = next((r for r in qt["rows"] if r["mode"] == "fp32" and not r.get("compiled")), None)
        lines += [
            "",
            f"## Serving precision (one stream, greedy, setup adapter merged; default: {qt['default']}"
            f"{', compiled' if qt.get('default_compiled') else ''})",
            "",
            "Each mode in its own process, alternating rep by rep with plain `generate` fp32. Held-out loss: "
            "`data/demo/persona_heldout.json` with every row through the quantized kernels; agreement: "
            "share of greedy tokens equal to fp32's, position by position, on 4 prompts. × transformers "
            "forward: the same server with the engine on transformers' forward instead of ours (decoder.py), "
            "alternating. Compiled: `SERVE_COMPILE=auto` (the decode step compiled ahead of time; prompts "
            "prefill eagerly); setup is a warm start, first start the one that compiled (an empty cache). "
            "The held-out loss runs the model's own forward, the same weights compiled or not; the compiled "
            "step's rounding shows in the agreement.",
            "",
            "| mode | decode tok/s | × generate fp32 | × transformers forward | TTFT ms | setup s | first start s "
            "| RSS MB | low-bit MB | held-out loss | Δ vs fp32 | greedy agreement |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in qt["rows"]:
            delta = 100 * (r["heldout_loss"] / fp32["heldout_loss"] - 1) if fp32 else None
            label = r["mode"] + (" compiled" if r.get("compiled") else "")
            lines.append(
                f"| {label} | {_fmt(r['decode_tps'])} | {_fmt(r['vs_generate_fp32'], 2)} | "
                f"{_fmt(r.get('vs_transformers_forward'), 2)} | {_fmt(r['ttft_ms'])} | {_fmt(r['setup_s'], 2)} | "
                f"{_fmt(r.get('first_start_s'), 1)} | {r['rss_mb']} | {_fmt(r['quantized_mb'])} | "
                f"{r['heldout_loss']:.4f} | {_fmt(delta, 2)} % | {_fmt(r['greedy_agreement'], 3)} |"
            )
        for r in qt.get("llama_cpp", []):
            lines.append(
                f"| {r['mode']} ({r['version']}, our `export gguf`, {_fmt(r['file_mb'])} MB file) | "
                f"{_fmt(r['decode_tps'])} | {_fmt(r['vs_generate_fp32'], 2)} | – | {_fmt(r['ttft_ms'])} | – | – | – "
                "| – | – | – | – |"
            )

    sv = results.get("serving")
    if sv:
        lines += [
            "",
            f"## Serving through the Cog server ({sv['max_new_tokens']} new tokens, greedy, SSE; each client sends "
            f"{sv['per_client']} requests back to back; concurrency {sv['concurrency']})",
            "",
            sv["how"],
            "",
            "| case | clients | tokens/s | × 1 client | × baseline | TTFT p50 / p95 ms | per token p50 / p95 ms | 409s "
            "| same text as solo (as fp32) |",
            "|---|---:|---:|---:|---:|---|---|---:|---|",
        ]
        rows = serving_rows(results)
        for case, by_clients in rows.items():
            one = by_clients.get(min(by_clients))
            for n, r in by_clients.items():
                base = rows.get("baseline", {}).get(n)
                err = f" ({len(r['errors'])} failed)" if r["errors"] else ""
                as_fp32 = f" ({r['same_as_fp32']})" if "same_as_fp32" in r else ""
                lines.append(
                    f"| {case}{err} | {n} | {_fmt(r['tokens_per_second'])} | "
                    f"{_fmt(_ratio(r['tokens_per_second'], one['tokens_per_second']), 2)} | "
                    f"{_fmt(_ratio(r['tokens_per_second'], base['tokens_per_second']) if base else None, 2)} | "
                    f"{_fmt(r['ttft_ms_p50'])} / {_fmt(r['ttft_ms_p95'])} | "
                    f"{_fmt(r['tpot_ms_p50'])} / {_fmt(r['tpot_ms_p95'])} | {r['refused_409']} | "
                    f"{r.get('same_as_solo', '–')}{as_fp32} |"
                )

        ip = sv.get("in_process")
        if ip:
            cb = (
                f"transformers' `generate_batch` (paged KV cache) {_fmt(ip['transformers_cb_tps'])} tokens/s "
                f"(greedy tokens agreeing with ours: {ip['transformers_cb_same_greedy']})"
                if "transformers_cb_tps" in ip
                else f"transformers' `generate_batch` failed: {ip.get('transformers_cb_error')}"
            )
            mm = ", ".join(f"{k} {v} µs" for k, v in ip["linear_us"].items())
            lines += [
                "",
                f"In process, {ip['requests']} requests, {ip['tokens']} tokens: our engine one at a time "
                f"{_fmt(ip['engine_one_at_a_time_tps'])} tokens/s, all at once {_fmt(ip['engine_batch_tps'])} "
                f"tokens/s (same greedy tokens as alone: {ip['engine_batch_same_as_solo']}); {cb}. "
                f"Why 8 rows cost more than one step: fp32 `F.linear` at 1 and 8 rows: {mm}.",
            ]

    st = results.get("startup")
    if st:
        lines += [
            "",
            f"## Start-up ({st['how']})",
            "",
            "| | construct s (median) | reps | import s |",
            "|---|---:|---|---:|",
        ]
        for key, label in (
            ("base", "`ModelServer()` (as Cog setup() pays it)"),
            ("base_preimported", "`ModelServer()` after importing transformers/peft first"),
            ("adapter", "`ModelServer(adapter=...)` (merged)"),
        ):
            if key in st:
                lines.append(
                    f"| {label} | {_fmt(st[key]['construct_s_median'], 2)} | {st[key]['reps']} | "
                    f"{_fmt(st[key]['import_s_median'], 2)} |"
                )
        if results.get("compile_first_start_s") is not None:
            lines += [
                "",
                f"Before these, a first start with an empty compile cache took {results['compile_first_start_s']:.1f} s "
                "(it compiles the decode step; later starts load the file).",
            ]
    px = results.get("prefix")
    if px:
        lines += [
            "",
            "## Shared context (`bench/prefix_worker.py`)",
            "",
            f"{px['questions']} questions, each after the same {px['context_tokens']}-token context at the start of "
            f"the instruction, the defaults, prefix cache on (`PREFIX_CACHE_TOKENS={px['prefix_cache_tokens']}`) and "
            f"off alternating; medians leave out the first question (nothing cached yet).",
            "",
            "| | time to first token (median) | each |",
            "|---|---:|---|",
            f"| prefix cache on | {_fmt(px['ttft_ms_median_on'])} ms | {px['ttft_ms_on']} |",
            f"| off | {_fmt(px['ttft_ms_median_off'])} ms | {px['ttft_ms_off']} |",
            "",
            f"On / off: **{px['ratio']}×**; same texts both ways: {px['same_texts']}; "
            f"{px['held_tokens']} tokens held at the end.",
        ]
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"
