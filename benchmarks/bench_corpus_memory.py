"""Memory of indexing a >= 200 MB JSONL corpus: our store vs loading texts into a dict.

Usage: python benchmarks/bench_corpus_memory.py [--copies 7] [--json PATH]
Each measurement runs in a fresh process and reports its peak RSS. The corpus is the
bundled code corpus repeated (each copy with its own header line, so no two documents are
identical). Embedding uses 16 tokens per document: memory, not retrieval quality, is measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, bundled_corpus, parser, report, write_json  # noqa: E402

CHILD = r"""
import json, sys, resource
from pathlib import Path
mode, corpus, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from index_server.encoder import EncoderConfig, TextEncoder
import torch, transformers
runtime = rss()
if mode == "model":  # what loading the encoder alone costs: the floor of any build
    enc = TextEncoder(EncoderConfig(max_tokens=16, batch_size=64))
    enc.encode(["warm up"] * 64)
    n, dim = 0, enc.dim
elif mode == "store":
    from index_server.build import BuildConfig, build_index
    m = build_index(BuildConfig(output=out, corpus=(corpus,), encoder=EncoderConfig(max_tokens=16, batch_size=64),
                                overwrite=True, progress=False))
    n, dim = m.n_vectors, m.dim
else:  # reference style: every text in a dict, then embed
    texts = {i: json.loads(l)["text"] for i, l in enumerate(open(corpus, encoding="utf-8"))}
    enc = TextEncoder(EncoderConfig(max_tokens=16, batch_size=64))
    vectors = enc.encode(list(texts.values()))
    n, dim = vectors.shape
enc_params = sum(p.numel() * p.element_size() for p in TextEncoder(EncoderConfig()).model.parameters())
print(json.dumps({"runtime_mb": runtime, "peak_mb": rss(), "n": n, "vectors_mb": n * dim * 4 / 2**20,
                  "model_mb": enc_params / 2**20}))
"""


def make_corpus(copies: int) -> Path:
    path = WORK / f"corpus-x{copies}.jsonl"
    if path.is_file():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    source = (bundled_corpus() / "stdlib_code.index.jsonl").read_text(encoding="utf-8").splitlines()
    with open(path, "w", encoding="utf-8") as f:
        for copy in range(copies):
            for line in source:
                record = json.loads(line)
                record["text"] = f"# copy {copy}\n" + record["text"]
                f.write(json.dumps(record) + "\n")
    return path


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--copies", type=int, default=7)
    args = p.parse_args()
    corpus = make_corpus(args.copies)
    size_mb = corpus.stat().st_size / 2**20
    rows = []
    for mode in ("model", "store", "dict"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(corpus), str(WORK / "memory-index")],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        n, vectors_mb = r["n"], r["vectors_mb"]
        growth = r["peak_mb"] - r["runtime_mb"]
        rows.append([mode, n, round(r["runtime_mb"]), round(r["peak_mb"]), round(growth), round(vectors_mb, 1),
                     round(r["model_mb"], 1), round(growth / (vectors_mb + r["model_mb"]), 2)])
    out = report(f"indexing a {size_mb:.0f} MB corpus, memory in MB. runtime = RSS with python + torch + transformers "
                 "imported; growth = peak RSS - runtime; x = growth / (vectors + model parameters)",
                 ["mode", "docs", "runtime", "peak", "growth", "vectors", "model", "x"], rows,
                 ["mode", "docs", "runtime_mb", "peak_mb", "growth_mb", "vectors_mb", "model_mb", "growth_per_payload"])
    print("model: load the encoder and embed one batch, no corpus. store: `ttt-index build` (offsets + memory-mapped "
          "reads). dict: every text loaded into a dict first, as the reference shard servers did.")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
