#!/usr/bin/env bash
# Accelerator speed check, one command, at most ~8 minutes on one GPU; writes one JSON file.
#   benchmarks/gpu.sh [out.json]        (default: $OUT/gpu_bench.json, or ./gpu_bench.json without $OUT)
# ViT-B/16-shaped random weights in bf16 (head fp32): full-model vs get_image_features image throughput at
# batch 256, caption-encoding throughput, and a 20-epoch full-method run on 118,287 COCO-scale cached captions
# with the features on the device (benchmarks/gpu_bench.py; `--tiny` there runs the same on a CPU at toy sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
out="${1:-${OUT:-.}/gpu_bench.json}"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
# the training run stops after the epoch that reaches --budget-s and projects the rest (marked "projected")
timeout 470 "$PY" benchmarks/gpu_bench.py --device cuda --dtype bfloat16 --epochs 20 --budget-s 300 --out "$out"
echo "wrote $out"
