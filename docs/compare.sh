#!/usr/bin/env bash
# Every method and configuration tuned on the same validation budget (8 documents of the
# index's own corpus, each excluded from its own neighbours; a grid of 3 to 6 values of its
# learning rate or main parameter, widened while the choice lands on an edge), then run on the
# same 8 held-out test documents of the bundled code task, then one report (bits per byte,
# against k, gradient steps and seconds per document, with the Pareto front).
# Run from the repository root after `make demo` (or `make`): bash docs/compare.sh
# Logs and tunes are resumed: a rerun after an interruption continues where it stopped.
# CHOSEN="name=value ..." gives the value an earlier run of the same tune chose (its grid and
# figures in docs/compare/validation.md) instead of tuning again (docs/tuning.sh).
set -euo pipefail
BIN=.venv/bin
OUT=${OUT:-work/compare}
TOP=${TOP:-6}  # train_layers of the cheaper configuration: the top 6 of SmolLM2-135M's 30 blocks
LM=$($BIN/ttt-nn paths | sed -n 's/^bundled_lm=//p')
TASKS=$($BIN/ttt-nn paths | sed -n 's/^task_configs=//p')
COMMON="--tasks ttt_stdlib_code --include_path $TASKS --limit 8 --device cpu --batch_size 1"
ARGS="max_length=256,log_dir=$OUT/logs"
CACHE="neighbour_cache=$OUT/cache"
NB="max_neighbor_tokens=256"
TUNE="--docs 8 --min-chars 500 --max-chars 10000 --max-length 256 --widen 3"
source "$(dirname "$0")/tuning.sh"
mkdir -p "$OUT"
tune ttt-nn ttt-nn lr 2e-5:5e-5:1e-4:2e-4 --k 10 --model-args $NB
tune context ttt-nn-context context_tokens 32:64:128:192 --k 10
tune interp ttt-nn-interp lambda 0.002:0.005:0.01:0.02:0.05:0.1 --k 10
tune dyneval ttt-nn-dyneval lr 2e-5:5e-5:1e-4:2e-4:5e-4:1e-3
LR=$(chosen ttt-nn)
# neighbours, then dynamic evaluation on the document: the document's rate, with the tuned neighbour rate
tune combined ttt-nn dyneval_lr 5e-5:1e-4:2e-4:5e-4 --k 10 --model-args "$NB,lr=$LR,dyneval_iterations=1"
tune top ttt-nn lr 1e-4:2e-4:5e-4:1e-3 --k 10 --model-args "$NB,train_layers=$TOP"
tune lora ttt-nn lr 1e-3:3e-3:1e-2 --k 10 --model-args "$NB,adapter=lora"
tune k5 ttt-nn lr 5e-5:1e-4:2e-4:5e-4 --k 5 --model-args $NB
tune top-combined ttt-nn dyneval_lr 1e-4:2e-4:5e-4:1e-3 --k 5 \
  --model-args "$NB,train_layers=$TOP,lr=$(chosen top),dyneval_iterations=1"
run() {  # name model args
  $BIN/lm_eval --model "$2" --model_args "$ARGS,$3" $COMMON --output_path "$OUT/runs/$1"
}
$BIN/lm_eval --model hf --model_args "pretrained=$LM,max_length=256" $COMMON --output_path "$OUT/runs/hf"
run k0 ttt-nn "k=0"  # equals hf, with its scoring cost logged per document
run ttt-nn ttt-nn "$CACHE,k=10,$NB,eval_at_k=0:1:2:5:10,lr=$LR$(tuned ttt-nn)"
run ttt-nn-farthest ttt-nn "$CACHE,k=10,$NB,order=farthest,lr=$LR$(tuned ttt-nn)"
run context ttt-nn-context "$CACHE,k=10,context_tokens=$(chosen context)$(tuned context)"
run interp ttt-nn-interp "$CACHE,k=10,lambda=$(chosen interp)$(tuned interp)"
run dyneval ttt-nn-dyneval "iterations=1,lr=$(chosen dyneval)$(tuned dyneval)"
run combined ttt-nn "$CACHE,k=10,$NB,lr=$LR,dyneval_iterations=1,dyneval_lr=$(chosen combined)$(tuned combined)"
run top ttt-nn "$CACHE,k=10,$NB,train_layers=$TOP,lr=$(chosen top)$(tuned top)"
run lora ttt-nn "$CACHE,k=10,$NB,adapter=lora,lr=$(chosen lora)$(tuned lora)"
run k5 ttt-nn "$CACHE,k=5,$NB,lr=$(chosen k5)$(tuned k5)"
run top-combined ttt-nn "$CACHE,k=5,$NB,train_layers=$TOP,lr=$(chosen top),dyneval_iterations=1,dyneval_lr=$(chosen top-combined)$(tuned top-combined)"
$BIN/ttt-nn report "$OUT/runs" --out "${REPORT:-docs/compare}"
for m in ttt-nn context interp dyneval combined top lora k5 top-combined; do echo "== $m"; cat "$OUT/tune-$m.txt"; done
