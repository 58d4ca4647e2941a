#!/usr/bin/env bash
# The scale corpus: fetch the pinned packages of docs/scale/sources.txt, turn them into one
# Pile-format corpus split by path into index / validation / test, embed the index split in
# resumable parts and build a Flat index from them. Every step skips what is already done, so
# a killed run resumes. Times on the 2-core CPU are in docs/indexes.md ("Real code at scale").
#   bash docs/scale-corpus.sh            # everything under work/scale
#   bash docs/scale-corpus.sh corpus     # stop once the corpus is split (no embedding)
# EMBED_ARGS adds options to `ttt-index embed` (e.g. "--dtype bfloat16"; the manifest records them).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
W=${SCALE_DIR:-work/scale}
mkdir -p "$W/downloads"
inputs=()
while read -r registry name version _; do
  case "$registry" in
    ""|\#*) continue ;;
    pypi)
      wheel=$(ls "$W/downloads/${name//-/_}-${version}-"*.whl 2>/dev/null | head -n 1 || true)
      if [ -z "$wheel" ]; then
        $BIN/pip download --quiet --no-deps --only-binary=:all: --dest "$W/downloads" "$name==$version"
        wheel=$(ls "$W/downloads/${name//-/_}-${version}-"*.whl | head -n 1)
      fi
      inputs+=("$wheel") ;;
    debian)
      deb="$W/downloads/${name}_${version}_all.deb"
      [ -f "$deb" ] || (cd "$W/downloads" && apt-get download "$name=$version")
      [ -d "$W/downloads/$name" ] || dpkg -x "$deb" "$W/downloads/$name"
      inputs+=("$(ls "$W/downloads/$name"/usr/src/*.tar.xz | head -n 1)") ;;
    *) echo "docs/scale/sources.txt: unknown registry $registry" >&2; exit 2 ;;
  esac
done < docs/scale/sources.txt

[ -f "$W/corpus/summary.json" ] || $BIN/ttt-index corpus "${inputs[@]}" --out "$W/corpus" --name scale \
    --validation-fraction 0.01 --test-fraction 0.01
[ "${1:-}" = corpus ] && exit 0
$BIN/ttt-index embed "$W/corpus/scale.index.jsonl" --out "$W/embeddings" --num-parts 64 ${EMBED_ARGS:-}
[ -f "$W/index-flat/manifest.json" ] || $BIN/ttt-index build --embeddings "$W/embeddings" --out "$W/index-flat"
echo "scale corpus ready: $W/corpus (splits), $W/embeddings, $W/index-flat"
