#!/usr/bin/env bash
# Every method tuned on the same validation budget (8 documents of the index's own corpus,
# each excluded from its own neighbours; 4 to 6 values per method), then run on the same 8
# held-out test documents of the bundled code task, then one report.
# Run from the repository root after `make demo` (or `make`): bash docs/compare.sh
set -euo pipefail
BIN=.venv/bin
OUT=${OUT:-work/compare}
LM=$($BIN/ttt-nn paths | sed -n 's/^bundled_lm=//p')
TASKS=$($BIN/ttt-nn paths | sed -n 's/^task_configs=//p')
COMMON="--tasks ttt_stdlib_code --include_path $TASKS --limit 8 --device cpu --batch_size 1"
ARGS="max_length=256,log_dir=$OUT/logs"
CACHE="neighbour_cache=$OUT/cache"
TUNE="--docs 8 --min-chars 500 --max-chars 10000 --max-length 256"
chosen() { $BIN/python -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'])" "$OUT/tune/$1/tune.json"; }
tune() {  # method param grid [more tune arguments]
  $BIN/ttt-nn tune --method "$1" --param "$2" --grid "$3" $TUNE "${@:4}" --out "$OUT/tune/$1" | tee "$OUT/tune-$1.txt"
}
mkdir -p "$OUT"
tune ttt-nn lr 2e-5:5e-5:1e-4:2e-4 --k 10 --model-args max_neighbor_tokens=256
tune ttt-nn-context context_tokens 32:64:128:192 --k 10
tune ttt-nn-interp lambda 0.002:0.005:0.01:0.02:0.05:0.1 --k 10
tune ttt-nn-dyneval lr 2e-5:5e-5:1e-4:2e-4:5e-4:1e-3
LR=$(chosen ttt-nn)
run() {  # name model args
  $BIN/lm_eval --model "$2" --model_args "$ARGS,$3" $COMMON --output_path "$OUT/runs/$1"
}
$BIN/lm_eval --model hf --model_args "pretrained=$LM,max_length=256" $COMMON --output_path "$OUT/runs/hf"
run ttt-nn ttt-nn "$CACHE,k=10,max_neighbor_tokens=256,eval_at_k=0:1:2:5:10,lr=$LR,tuned=$OUT/tune/ttt-nn/tune.json"
run ttt-nn-farthest ttt-nn "$CACHE,k=10,max_neighbor_tokens=256,order=farthest,lr=$LR,tuned=$OUT/tune/ttt-nn/tune.json"
run context ttt-nn-context "$CACHE,k=10,context_tokens=$(chosen ttt-nn-context),tuned=$OUT/tune/ttt-nn-context/tune.json"
run interp ttt-nn-interp "$CACHE,k=10,lambda=$(chosen ttt-nn-interp),tuned=$OUT/tune/ttt-nn-interp/tune.json"
run dyneval ttt-nn-dyneval "iterations=1,lr=$(chosen ttt-nn-dyneval),tuned=$OUT/tune/ttt-nn-dyneval/tune.json"
$BIN/ttt-nn report "$OUT/runs" --out "${REPORT:-docs/compare}"
for m in ttt-nn ttt-nn-context ttt-nn-interp ttt-nn-dyneval; do echo "== $m"; cat "$OUT/tune-$m.txt"; done
