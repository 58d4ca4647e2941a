#!/usr/bin/env bash
# Every method on the scale corpus (bash docs/scale-corpus.sh builds it and its Flat index).
# The documents, by a rule fixed before any run (task_data.seeded_sample):
#   validation: scale.validation.jsonl, documents of 500-10000 characters, permutation seeded 0, first 8
#   test:       scale.test.jsonl, documents of 500-10000 characters, permutation seeded 0, first 16
# None of them is in the index (the corpus is split by path). Every method is tuned on the
# validation documents with the same budget (a grid of 3 values of its rate or main parameter,
# widened while the choice lands on an edge), runs at k=10 on the test documents, and one
# report is written to docs/scale/. The nearest-neighbour curve runs to k=50. Logs are
# resumed: a rerun after an interruption continues where it stopped.
# RUNS="hf nearest-k50 ..." runs only the named runs (and the tunes they need); CHOSEN as in
# docs/compare.sh (docs/tuning.sh) gives a rate instead of tuning it.
set -euo pipefail
BIN=.venv/bin
W=${SCALE_DIR:-work/scale}
OUT=${OUT:-$W/method}
INDEX=${INDEX:-$W/index-flat}
TOP=${TOP:-6}
C=$W/corpus
LM=$($BIN/ttt-nn paths | sed -n 's/^bundled_lm=//p')
TASKS=$($BIN/ttt-nn paths | sed -n 's/^task_configs=//p')
META="{\"corpus_file\": \"$C/scale.test.jsonl\", \"sample\": 16, \"seed\": 0, \"min_chars\": 500, \"max_chars\": 10000}"
ARGS="max_length=256,log_dir=$OUT/logs,index=$INDEX"
NB="max_neighbor_tokens=256"
TUNE="--index $INDEX --validation-file $C/scale.validation.jsonl --docs 8 --min-chars 500 --max-chars 10000"
TUNE="$TUNE --max-length 256 --widen 2"
source "$(dirname "$0")/tuning.sh"
want() { [ -z "${RUNS:-}" ] || [[ " $RUNS " == *" $1 "* ]]; }
wants() { local r; for r; do want "$r" && return 0; done; return 1; }
run() {  # name model args
  $BIN/lm_eval --model "$2" --model_args "$3" --tasks ttt_corpus --include_path "$TASKS" --metadata "$META" \
    --device cpu --batch_size 1 --output_path "$OUT/runs/$1"
}
mkdir -p "$OUT"
if wants nearest nearest-k50 nearest-dedup sift combined; then  # the runs at ttt-nn's rate
  tune ttt-nn ttt-nn lr 5e-5:1e-4:2e-4 --k 10 --model-args $NB
  LR=$(chosen ttt-nn)
fi
want sift && tune sift ttt-nn sift_lambda 0.1:1:10 --k 10 --model-args "$NB,lr=$LR,select=sift,candidates=200"
want lora && tune lora ttt-nn lr 1e-3:3e-3:1e-2 --k 10 --model-args "$NB,adapter=lora"
want context && tune context ttt-nn-context context_tokens 32:64:128 --k 10
want interp && tune interp ttt-nn-interp lambda 0.005:0.01:0.05 --k 10
want dyneval && tune dyneval ttt-nn-dyneval lr 5e-5:2e-4:5e-4
want combined && tune combined ttt-nn dyneval_lr 1e-4:2e-4:5e-4 --k 10 --model-args "$NB,lr=$LR,dyneval_iterations=1"
wants top top-combined && tune top ttt-nn lr 2e-4:5e-4:1e-3 --k 10 --model-args "$NB,train_layers=$TOP"
want top-combined && tune top-combined ttt-nn dyneval_lr 2e-4:5e-4:1e-3 --k 5 \
  --model-args "$NB,train_layers=$TOP,lr=$(chosen top),dyneval_iterations=1"

want near-duplicates && $BIN/python docs/near_duplicates.py "$C/scale.test.jsonl" --index "$INDEX" \
  | tee "$OUT/near-duplicates.txt"
want hf && run hf hf "pretrained=$LM,max_length=256"
want k0 && run k0 ttt-nn "$ARGS,k=0"
want nearest-k50 && run nearest-k50 ttt-nn "$ARGS,k=50,$NB,lr=$LR,eval_at_k=0:1:2:5:10:20:50"
want nearest && run nearest ttt-nn "$ARGS,k=10,$NB,lr=$LR$(tuned ttt-nn)"
want nearest-dedup && run nearest-dedup ttt-nn "$ARGS,k=10,$NB,lr=$LR,exclude_duplicates=true"
want sift && run sift ttt-nn "$ARGS,k=10,$NB,lr=$LR,select=sift,candidates=200,sift_lambda=$(chosen sift)$(tuned sift)"
want lora && run lora ttt-nn "$ARGS,k=10,$NB,adapter=lora,lr=$(chosen lora)$(tuned lora)"
want context && run context ttt-nn-context "$ARGS,k=10,context_tokens=$(chosen context)$(tuned context)"
want interp && run interp ttt-nn-interp "$ARGS,k=10,lambda=$(chosen interp)$(tuned interp)"
want dyneval && run dyneval ttt-nn-dyneval "max_length=256,log_dir=$OUT/logs,iterations=1,lr=$(chosen dyneval)$(tuned dyneval)"
want combined && run combined ttt-nn "$ARGS,k=10,$NB,lr=$LR,dyneval_iterations=1,dyneval_lr=$(chosen combined)$(tuned combined)"
want top && run top ttt-nn "$ARGS,k=10,$NB,train_layers=$TOP,lr=$(chosen top)$(tuned top)"
want top-combined && run top-combined ttt-nn \
  "$ARGS,k=5,$NB,train_layers=$TOP,lr=$(chosen top),dyneval_iterations=1,dyneval_lr=$(chosen top-combined)$(tuned top-combined)"
$BIN/ttt-nn report "$OUT/runs" --out "${REPORT:-docs/scale}"
[ ! -f "$OUT/near-duplicates.txt" ] || cp "$OUT/near-duplicates.txt" "${REPORT:-docs/scale}/near-duplicates.txt"
for m in ttt-nn sift lora context interp dyneval combined top top-combined; do
  [ ! -f "$OUT/tune-$m.txt" ] || { echo "== $m"; cat "$OUT/tune-$m.txt"; }
done
