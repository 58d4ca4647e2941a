#!/usr/bin/env bash
# LoRA's learning-rate default (settings.DEFAULT_LORA_LR), chosen at the default k (20) on the
# validation documents of docs/compare.sh (8 documents of the bundled index's own corpus,
# 256-token neighbours), with its validation curve over k so that it can be checked not to get
# worse up to k=20. Run from the repository root: bash docs/tune-defaults.sh; the table goes to
# docs/bench/tune-lora-lr.json.
set -euo pipefail
BIN=.venv/bin
OUT=${OUT:-work/tune-defaults}
TUNE="--docs 8 --min-chars 500 --max-chars 10000 --max-length 256 --k 20 --widen 3"
CURVE="max_neighbor_tokens=256,eval_at_k=0:1:2:5:10:20"
mkdir -p "$OUT" docs/bench
$BIN/ttt-nn tune --method ttt-nn --param lr --grid 1e-3:3e-3:1e-2 $TUNE --model-args "$CURVE,adapter=lora" \
  --out "$OUT/lora" | tee "$OUT/lora.txt"
cp "$OUT/lora/tune.json" docs/bench/tune-lora-lr.json
