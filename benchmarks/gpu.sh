#!/usr/bin/env bash
# The GPU runs: bench_ttt in the paper's setting: the bundled model, 1024-token chunks,
# k=20 synthetic 1024-token neighbours; prints seconds per neighbour next to the paper's
# (GPT-2 5.45 s, GPT-2-large 18.7 s per neighbour on an A100, with one re-scoring each).
# Usage (repository root, on a machine with a CUDA GPU and torch built for it):
#   bash benchmarks/gpu.sh            # bench_ttt fp32, then bf16 autocast; then bench_lora
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for precision in fp32 bf16; do
  "$PY" benchmarks/bench_ttt.py --device cuda --docs 4 --k 20 --max-length 1024 --cap 1024 --synthetic \
    --precision "$precision" --skip-reference --json "work/bench/ttt-gpu-$precision.json" "$@"
done
# LoRA vs full TTT, doc_batch 1 vs 8 (issue target: doc_batch=8 >= 3x documents/s on a GPU)
"$PY" benchmarks/bench_lora.py --device cuda --json work/bench/lora-gpu.json
