#!/usr/bin/env bash
# The GPU checks of the grouped experts and of serving, for a session with a device (one H100/H200: about 14 minutes).
#
#   bash bench/gpu.sh                 # on the GPU machine, from the repository root
#
# Prepare once on the CPU machine (the GPU machine reaches no package registry, and its image lacks bitsandbytes
# and carries older transformers/peft): `bash bench/gpu.sh --fetch-wheels` downloads the pinned wheels into
# .gpu-wheels/ (git-ignored, about 55 MiB); carry that folder with the run (device tool: carry [".gpu-wheels"]).
# Results land in $OUT (or ./gpu-results): gpu_checks.jsonl, train_step_*.txt/json. Copy the figures into
# BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    mkdir -p .gpu-wheels
    for pkg in bitsandbytes transformers peft; do
        pin=$(grep -i "^${pkg}==" constraints.txt)
        pip download --no-deps --only-binary=:all: --platform manylinux_2_24_x86_64 --python-version 3.12 \
            -d .gpu-wheels "$pin"
    done
    exit 0
fi

OUT_DIR=${OUT:-gpu-results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
if ls .gpu-wheels/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-deps --no-index .gpu-wheels/*.whl
fi
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"

# 1. CUDA parity (grouped jagged/padded vs eager, bf16) and a 4-bit load with no dense expert copy on the device.
timeout 240 $PY bench/gpu_checks.py | tee "$OUT_DIR/gpu_checks.jsonl"

# 2. Training step, the default 16-expert model and a 4-layer slice of Qwen3-30B-A3B's shape (128 experts, top-8),
#    bf16, against the plain stack (transformers + PEFT + bnb) and the studio's eager loop.
timeout 150 $PY bench/train_step.py --device cuda --dtype bfloat16 --batch-size 8 --seq-len 1024 \
    --json "$OUT_DIR/train_step_default.json" | tee "$OUT_DIR/train_step_default.txt"
timeout 240 $PY bench/train_step.py --device cuda --dtype bfloat16 \
    --config studio/models/known_configs/Qwen--Qwen3-30B-A3B.json --layers 4 --batch-size 4 --seq-len 2048 \
    --steps 5 --warmup 2 --json "$OUT_DIR/train_step_qwen3_30b_slice.json" | tee "$OUT_DIR/train_step_qwen3_30b_slice.txt"

# 3. Serving (bench/serve.py): hot-swap vs reload, single/base and mixed/single decode throughput, and decode tokens/s
#    of 1, 8 and 32 concurrent streams through `studio serve`, on the default 16-expert model and a 64-expert top-8 one.
timeout 200 $PY bench/serve.py --device cuda --layers 8 --batch-size 32 --new-tokens 64 --streams 1,8,32 \
    --json "$OUT_DIR/serve_16e.json" | tee "$OUT_DIR/serve_16e.txt"
timeout 200 $PY bench/serve.py --device cuda --layers 8 --batch-size 32 --new-tokens 64 --experts 64 --top-k 8 \
    --moe-intermediate 192 --streams 1,8,32 --json "$OUT_DIR/serve_64e.json" | tee "$OUT_DIR/serve_64e.txt"
