#!/usr/bin/env bash
# Nearest neighbours vs SIFT selection at equal gradient steps, and adaptive compute, on the
# same 8 held-out test documents as docs/compare.sh (run that first: it tunes ttt-nn's lr).
# SIFT's lambda is chosen on validation documents from the index's corpus, never on test.
# Run from the repository root: bash docs/select.sh
set -euo pipefail
BIN=.venv/bin
OUT=${OUT:-work/select}
COMPARE=${COMPARE:-work/compare}
TASKS=$($BIN/ttt-nn paths | sed -n 's/^task_configs=//p')
COMMON="--tasks ttt_stdlib_code --include_path $TASKS --limit 8 --device cpu --batch_size 1"
LR=$($BIN/python -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'])" "$COMPARE/tune/ttt-nn/tune.json")
ARGS="max_length=256,max_neighbor_tokens=256,lr=$LR,log_dir=$OUT/logs,neighbour_cache=$COMPARE/cache"
mkdir -p "$OUT"
$BIN/ttt-nn tune --method ttt-nn --param sift_lambda --grid 0.001:0.01:0.1:1:10:100 --docs 8 --min-chars 500 \
  --max-chars 10000 --max-length 256 --k 10 --model-args "select=sift,candidates=200,max_neighbor_tokens=256,lr=$LR" \
  --out "$OUT/tune/sift" | tee "$OUT/tune-sift.txt"
LAMBDA=$($BIN/python -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'])" "$OUT/tune/sift/tune.json")
run() {  # name args
  $BIN/lm_eval --model ttt-nn --model_args "$ARGS,$2" $COMMON --output_path "$OUT/runs/$1"
}
$BIN/lm_eval --model hf --model_args "pretrained=$($BIN/ttt-nn paths | sed -n 's/^bundled_lm=//p'),max_length=256" \
  $COMMON --output_path "$OUT/runs/hf"
run nearest "k=20,eval_at_k=0:5:10:20"
run sift "k=20,eval_at_k=0:5:10:20,select=sift,candidates=200,sift_lambda=$LAMBDA,tuned=$OUT/tune/sift/tune.json"
for ALPHA in ${ALPHAS:-0.5 2}; do
  run "sift-alpha-$ALPHA" "k=20,select=sift,candidates=200,sift_lambda=$LAMBDA,alpha=$ALPHA"
done
$BIN/ttt-nn report "$OUT/runs" --out "${REPORT:-docs/select}"
