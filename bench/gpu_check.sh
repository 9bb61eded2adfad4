#!/usr/bin/env bash
# The users' real path on one CUDA GPU, in under 9 minutes (bench/gpu_check.py says what it runs):
#   (a) the GPU tests (`pytest -m gpu`);
#   (b) a 24 GB card emulated on a bigger one, random-weight Llama-2-7B and Llama-3-8B shapes built
#       from bench/configs: 3 training steps under each plan the planner picks and under a setting
#       it rejects (expected: out of memory), and 200-, 1,100- and 2,100-token prompts served, then
#       a short request that must be served after them;
#   (c) planned against measured memory, tokens/s and time to first token;
#   (d) training against HF Trainer + PEFT (bf16 and fp32) on the Llama-3.2-1B shape, profiled.
# Results: bench/results/gpu-check.{json,md} (and $OUT when that is set).
#
#   bash bench/gpu_check.sh --prepare   # here, with network: wheels and tokenizer files into .gpu/
#   bash bench/gpu_check.sh             # on the GPU machine (installs .gpu/wheels if present)
#   bash bench/gpu_check.sh --dry-run   # on a CPU: the same driver on tiny shapes, no GPU needed
#
# A GPU machine without network gets what it lacks from .gpu/ (git-ignored): this project's pins of
# transformers, peft and bitsandbytes for its Python, bitsandbytes trimmed to the CUDA 13.0 and CPU
# libraries it loads, and the embedded model's tokenizer and config (no weights: shapes are random).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
GPU_PY_VERSION=${GPU_PY_VERSION:-3.12}
WHEELS=.gpu/wheels

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$WHEELS" && mkdir -p "$WHEELS" .gpu/tokenizer
    pins=$(grep -E '^(transformers|peft|bitsandbytes)==' requirements.txt)
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" $pins
    "$PY" bench/gpu_check.py trim-wheel "$WHEELS"/bitsandbytes-*.whl --keep cuda130 cpu
    for f in config.json tokenizer.json tokenizer_config.json generation_config.json chat_template.jinja \
        special_tokens_map.json; do
        if [ -f "weights/smollm2-135m-instruct/$f" ]; then cp "weights/smollm2-135m-instruct/$f" .gpu/tokenizer/; fi
    done
    du -sh .gpu
    exit 0
fi

if [ "${1:-}" = "--dry-run" ]; then
    shift
    exec "$PY" bench/gpu_check.py run --dry-run "$@"
fi

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c 'import sys, torch
sys.exit(0 if torch.cuda.is_available() else "bench/gpu_check.sh: torch sees no CUDA GPU")'

mkdir -p bench/results
# (a) about a minute; its failures are reported, the measurements still run.
timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tee bench/results/gpu-check-tests.log \
    || echo "bench/gpu_check.sh: GPU tests failed (bench/results/gpu-check-tests.log)" >&2
# (b)-(d) within what is left of the 9 minutes.
timeout 420 "$PY" bench/gpu_check.py run "$@"
if [ -n "${OUT:-}" ]; then cp bench/results/gpu-check* "$OUT"/ 2>/dev/null || true; fi
