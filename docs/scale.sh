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
chosen() { $BIN/python -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'])" "$OUT/tune/$1/tune.json"; }
tune() {  # name method param grid [more tune arguments]
  $BIN/ttt-nn tune --method "$2" --param "$3" --grid "$4" $TUNE "${@:5}" --out "$OUT/tune/$1" | tee "$OUT/tune-$1.txt"
}
run() {  # name model args
  $BIN/lm_eval --model "$2" --model_args "$3" --tasks ttt_corpus --include_path "$TASKS" --metadata "$META" \
    --device cpu --batch_size 1 --output_path "$OUT/runs/$1"
}
mkdir -p "$OUT"
tune ttt-nn ttt-nn lr 5e-5:1e-4:2e-4 --k 10 --model-args $NB
LR=$(chosen ttt-nn)
tune sift ttt-nn sift_lambda 0.1:1:10 --k 10 --model-args "$NB,lr=$LR,select=sift,candidates=200"
tune lora ttt-nn lr 1e-3:3e-3:1e-2 --k 10 --model-args "$NB,adapter=lora"
tune context ttt-nn-context context_tokens 32:64:128 --k 10
tune interp ttt-nn-interp lambda 0.005:0.01:0.05 --k 10
tune dyneval ttt-nn-dyneval lr 5e-5:2e-4:5e-4
tune combined ttt-nn dyneval_lr 1e-4:2e-4:5e-4 --k 10 --model-args "$NB,lr=$LR,dyneval_iterations=1"
tune top ttt-nn lr 2e-4:5e-4:1e-3 --k 10 --model-args "$NB,train_layers=$TOP"

run hf hf "pretrained=$LM,max_length=256"
run k0 ttt-nn "$ARGS,k=0"
run nearest-k50 ttt-nn "$ARGS,k=50,$NB,lr=$LR,eval_at_k=0:1:2:5:10:20:50"
run nearest ttt-nn "$ARGS,k=10,$NB,lr=$LR,tuned=$OUT/tune/ttt-nn/tune.json"
run nearest-dedup ttt-nn "$ARGS,k=10,$NB,lr=$LR,exclude_duplicates=true"
run sift ttt-nn "$ARGS,k=10,$NB,lr=$LR,select=sift,candidates=200,sift_lambda=$(chosen sift),tuned=$OUT/tune/sift/tune.json"
run lora ttt-nn "$ARGS,k=10,$NB,adapter=lora,lr=$(chosen lora),tuned=$OUT/tune/lora/tune.json"
run context ttt-nn-context "$ARGS,k=10,context_tokens=$(chosen context),tuned=$OUT/tune/context/tune.json"
run interp ttt-nn-interp "$ARGS,k=10,lambda=$(chosen interp),tuned=$OUT/tune/interp/tune.json"
run dyneval ttt-nn-dyneval "max_length=256,log_dir=$OUT/logs,iterations=1,lr=$(chosen dyneval),tuned=$OUT/tune/dyneval/tune.json"
run combined ttt-nn "$ARGS,k=10,$NB,lr=$LR,dyneval_iterations=1,dyneval_lr=$(chosen combined),tuned=$OUT/tune/combined/tune.json"
run top ttt-nn "$ARGS,k=10,$NB,train_layers=$TOP,lr=$(chosen top),tuned=$OUT/tune/top/tune.json"
$BIN/python docs/near_duplicates.py "$C/scale.test.jsonl" --index "$INDEX" | tee "$OUT/near-duplicates.txt"
$BIN/ttt-nn report "$OUT/runs" --out "${REPORT:-docs/scale}"
cp "$OUT/near-duplicates.txt" "${REPORT:-docs/scale}/near-duplicates.txt"
for m in ttt-nn sift lora context interp dyneval combined top; do echo "== $m"; cat "$OUT/tune-$m.txt"; done
