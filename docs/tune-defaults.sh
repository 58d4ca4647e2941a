#!/usr/bin/env bash
# The tuned defaults of settings.py, chosen at the default k (20) on the validation documents
# of docs/compare.sh (8 documents of the bundled index's own corpus, 256-token neighbours), each
# with its validation curve over k so that it can be checked not to get worse up to k=20:
#   DEFAULT_LORA_LR  (adapter=lora's lr)
#   DEFAULT_DYNEVAL_LR  (ttt-nn's dyneval_lr, with the paper's neighbour rate)
# Run from the repository root: bash docs/tune-defaults.sh [lora|dyneval] (default: both); the
# tables go to docs/bench/.
set -euo pipefail
BIN=.venv/bin
OUT=${OUT:-work/tune-defaults}
TUNE="--docs 8 --min-chars 500 --max-chars 10000 --max-length 256 --k 20 --widen 3"
CURVE="max_neighbor_tokens=256,eval_at_k=0:1:2:5:10:20"
mkdir -p "$OUT" docs/bench
WHICH=${1:-lora dyneval}
if [[ " $WHICH " == *" lora "* ]]; then
$BIN/ttt-nn tune --method ttt-nn --param lr --grid 1e-3:3e-3:1e-2 $TUNE --model-args "$CURVE,adapter=lora" \
  --out "$OUT/lora" | tee "$OUT/lora.txt"
cp "$OUT/lora/tune.json" docs/bench/tune-lora-lr.json
fi
if [[ " $WHICH " == *" dyneval "* ]]; then
$BIN/ttt-nn tune --method ttt-nn --param dyneval_lr --grid 1e-4:2e-4:5e-4 $TUNE \
  --model-args "max_neighbor_tokens=256,dyneval_iterations=1" --out "$OUT/dyneval" | tee "$OUT/dyneval.txt"
cp "$OUT/dyneval/tune.json" docs/bench/tune-dyneval-lr.json
fi
