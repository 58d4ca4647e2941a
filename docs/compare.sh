#!/usr/bin/env bash
# Every method on the same 8 held-out documents of the bundled code task, then one report.
# Run from the repository root after `make demo` (or `make`): bash docs/compare.sh
set -euo pipefail
BIN=.venv/bin
OUT=${OUT:-work/compare}
LM=$($BIN/ttt-nn paths | sed -n 's/^bundled_lm=//p')
COMMON="--tasks ttt_stdlib_code --include_path task_configs --limit 8 --device cpu --batch_size 1"
ARGS="max_length=256,log_dir=$OUT/logs"

$BIN/lm_eval --model hf --model_args pretrained=$LM,max_length=256 $COMMON --output_path $OUT/hf
$BIN/lm_eval --model ttt-nn --model_args $ARGS,k=10,max_neighbor_tokens=256,eval_at_k=0:1:2:5:10 $COMMON --output_path $OUT/ttt-nn
$BIN/lm_eval --model ttt-nn --model_args $ARGS,k=10,max_neighbor_tokens=256,order=farthest $COMMON --output_path $OUT/ttt-nn-farthest
$BIN/lm_eval --model ttt-nn-context --model_args $ARGS,k=10 $COMMON --output_path $OUT/context
# lambda chosen on validation documents from the index split (each excluded from its own neighbours):
LAMBDA=$($BIN/ttt-nn tune-lambda --k 10 --docs 16 --out $OUT/tune | sed -n 's/^best lambda on validation: \([0-9.]*\).*/\1/p')
$BIN/lm_eval --model ttt-nn-interp --model_args $ARGS,k=10,lambda=$LAMBDA $COMMON --output_path $OUT/interp
$BIN/lm_eval --model ttt-nn-dyneval --model_args $ARGS,iterations=1 $COMMON --output_path $OUT/dyneval
$BIN/ttt-nn report $OUT --out ${REPORT:-docs/compare}
