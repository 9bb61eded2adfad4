"""Start-up: `ModelServer(...)` construction in a fresh process (what a Cog `setup()` pays).

    python -m bench.startup_worker SPEC.json OUT.json

Imports are timed separately: they are paid once per process whatever the model."""

from __future__ import annotations

import sys
import time

from bench.common import peak_rss_mb, read_json, setup_torch, write_json


def main(spec_path: str, out_path: str) -> None:
    spec = read_json(spec_path)
    t0 = time.perf_counter()
    setup_torch(spec["device"], spec["threads"])
    from finetune.serving.server import ModelServer

    if spec.get("preimport"):
        # What ModelServer() imports lazily (tokenizer, Llama model, PEFT), done before the clock.
        import peft  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    t1 = time.perf_counter()
    server = ModelServer(adapter=spec.get("adapter_dir"), device=spec["device"])
    t2 = time.perf_counter()
    write_json(
        out_path,
        {
            "adapter": bool(spec.get("adapter_dir")),
            "preimported": bool(spec.get("preimport")),
            "merged": server.merged,
            "import_s": round(t1 - t0, 3),
            "construct_s": round(t2 - t1, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
