#!/usr/bin/env bash
# The same benchmarks on one CUDA GPU, in under 5 minutes: bf16 + SDPA (ours), the classic HF
# Trainer in fp32 and in bf16 mixed precision, 4-bit QLoRA (bitsandbytes nf4), decode and TTFT,
# the Cog HTTP round trip and start-up; then decoding with CUDA graphs (bench/gpu_decode.py).
# Writes bench/results/gpu.{json,md} and bench/results/gpu-decode.{json,md}.
#
#   bash bench/gpu.sh            # full GPU plan
#   bash bench/gpu.sh --quick    # a smoke test of the CUDA paths (about a minute)
#
# Extra arguments go to bench/run.py. PY=/path/to/python picks the interpreter (default: the
# project's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA GPU is visible to torch; run bench/run.py on CPU instead")
print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
EOF

# QLoRA needs bitsandbytes. The Cog image installs it; other GPU machines may not have it, and
# the CPU venv leaves it out on purpose, so install the pinned version here if it is missing.
if ! "$PY" -c "import bitsandbytes" 2>/dev/null; then
    echo "bench/gpu.sh: installing bitsandbytes==0.50.2 for the 4-bit variant" >&2
    "$PY" -m pip install -q bitsandbytes==0.50.2 \
        || echo "bench/gpu.sh: bitsandbytes unavailable; the 4-bit variant will be reported as failed" >&2
fi

# The embedded default model (a no-op when weights/ already holds it, or BASE_MODEL names another).
# A GPU box without network access can run on random weights of the same shape instead (every
# throughput figure holds, the losses do not): BENCH_RANDOM_WEIGHTS=1 with the model folder's
# config and tokenizer files present.
MODEL_DIR=weights/smollm2-135m-instruct
if [ -z "${BASE_MODEL:-}" ] && [ ! -f "$MODEL_DIR/model.safetensors" ]; then
    if [ "${BENCH_RANDOM_WEIGHTS:-0}" = 1 ] && [ -f "$MODEL_DIR/config.json" ]; then
        echo "bench/gpu.sh: BENCH_RANDOM_WEIGHTS=1: random weights in $MODEL_DIR (losses meaningless)" >&2
        "$PY" -c 'import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])' "$MODEL_DIR"
    else
        "$PY" -m finetune fetch-default
    fi
fi

# 300 s is the hard stop; the plan's optional runs are skipped past --budget-min.
timeout 300 "$PY" bench/run.py --device cuda --budget-min 4.2 "$@"

# Decoding with and without CUDA graphs against generate, on the 135M shape and a 1B Llama shape
# (about 2 minutes; bench/results/gpu-decode.md).
exec timeout 240 "$PY" -m bench.gpu_decode ${BENCH_RANDOM_WEIGHTS:+--random}
