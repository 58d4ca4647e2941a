# Sourced by docs/compare.sh and docs/scale.sh: a method's tune and the value it chose.
# Expects BIN, OUT and TUNE (the `ttt-nn tune` arguments every tune of the script shares).
# CHOSEN="name=value ..." gives the value an earlier run of the same tune chose instead of
# tuning again (the first value given for a name counts); such a run carries no tuned=.
given() { for kv in ${CHOSEN:-}; do [ "${kv%%=*}" != "$1" ] || { echo "${kv#*=}"; break; }; done; }
chosen() {
  local v; v=$(given "$1")
  [ -n "$v" ] && { echo "$v"; return 0; }
  $BIN/python -c "import json, sys; print(json.load(open(sys.argv[1]))['chosen'])" "$OUT/tune/$1/tune.json"
}
tuned() { [ -n "$(given "$1")" ] || echo ",tuned=$OUT/tune/$1/tune.json"; }
tune() {  # name method param grid [more tune arguments]
  local v; v=$(given "$1")
  [ -n "$v" ] && { echo "$1: $v given by CHOSEN" | tee "$OUT/tune-$1.txt"; return 0; }
  $BIN/ttt-nn tune --method "$2" --param "$3" --grid "$4" $TUNE "${@:5}" --out "$OUT/tune/$1" | tee "$OUT/tune-$1.txt"
}
