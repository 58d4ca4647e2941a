"""Retrieve once, up front: queries per second one by one vs in batches, embedding included.

Usage: python benchmarks/bench_retrieve.py [--vectors 1000000] [--batch 64] [--queries 192] [--json PATH]

The queries are the bundled held-out documents (real text, embedded with the index's
encoder). Two indexes: the bundled one (1.6k real vectors) and a Flat index of --vectors
synthetic vectors of the same width (>= 1M: search cost dominates there). Per index, the
same Retriever answers every query one at a time (embed one, search one: what the first
version did per document) and then in batches (one encoder batch and one search call per
--batch queries: what ttt-nn now does before training). Target: >= 10x.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, bundled_corpus, embeddings_from_vectors, parser, report, write_json  # noqa: E402

from index_server.build import BuildConfig, build_index  # noqa: E402
from lm_eval_ttt.retriever import Retriever  # noqa: E402
from lm_eval_ttt.settings import NeighbourSettings  # noqa: E402


def synthetic_index(n: int, dim: int) -> Path:
    out = WORK / f"retrieve-flat-{n}"
    if (out / "manifest.json").is_file():
        return out
    vectors = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    emb = embeddings_from_vectors(vectors, f"retrieve-{n}")
    build_index(BuildConfig(output=out, embeddings=emb, overwrite=True, progress=False))
    return out


def measure(index: Path, texts: list[str], k: int, batch: int) -> dict[str, tuple[float, float]]:
    """Seconds for all queries one by one and in batches: embedding, search, and both through
    the Retriever (fresh retrievers, no cache)."""
    one = Retriever.open(NeighbourSettings(index=str(index)))
    one.candidates(texts[0], k)  # warm up (model, pages)
    start = time.perf_counter()
    for text in texts:
        one.candidates(text + " ", k)  # a fresh query each time: nothing memoised
    total_one = time.perf_counter() - start
    batched = Retriever.open(NeighbourSettings(index=str(index)))
    batched.prefetch(texts[:batch], k, batch=batch, progress=False)  # warm up
    start = time.perf_counter()
    batched.prefetch([t + "  " for t in texts], k, batch=batch, progress=False)
    total_batched = time.perf_counter() - start
    encoder, searcher = batched.encoder, batched.index
    timings = {}
    start = time.perf_counter()
    vectors = np.concatenate([encoder.encode([t]) for t in texts])
    embed_one = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(texts), batch):
        encoder.encode(texts[i : i + batch])
    timings["embed"] = (embed_one, time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(len(vectors)):
        searcher.search(vectors[i : i + 1], k)
    search_one = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(vectors), batch):
        searcher.search(vectors[i : i + batch], k)
    timings["search"] = (search_one, time.perf_counter() - start)
    timings["embed + search (Retriever)"] = (total_one, total_batched)
    return timings


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--vectors", type=int, default=1_000_000, help="synthetic index size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--queries", type=int, default=192)
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    from lm_eval_ttt.assets import ensure_default_index

    corpus = bundled_corpus()
    texts = [json.loads(line)["text"] for name in ("stdlib_code.test.jsonl", "python_docs.test.jsonl")
             for line in open(corpus / name, encoding="utf-8")][: args.queries]
    bundled = ensure_default_index()
    from index_server.manifest import Manifest

    dim = Manifest.load(bundled).dim
    rows = []
    for name, index in (("bundled", bundled), (f"synthetic Flat {args.vectors}", synthetic_index(args.vectors, dim))):
        n = Manifest.load(index).n_vectors
        for stage, (one_s, batch_s) in measure(index, texts, args.k, args.batch).items():
            rows.append([name, n, stage, len(texts), round(len(texts) / one_s, 1), round(len(texts) / batch_s, 1),
                         round(one_s / batch_s, 2)])
    out = report(f"retrieval, k={args.k}, {len(texts)} held-out documents as queries, batches of {args.batch}; "
                 "queries per second", ["index", "vectors", "stage", "queries", "one-by-one q/s",
                                        "batched q/s", "speedup vs one-by-one"], rows,
                 ["index", "vectors", "stage", "queries", "one_by_one_queries_per_s", "batched_queries_per_s",
                  "speedup_vs_one_by_one"])
    best = max(r["speedup_vs_one_by_one"] for r in out if r["stage"].startswith("embed + search"))
    print(f"\nbest speed-up of batched retrieval: {best:.1f}x (target >= 10x): {'met' if best >= 10 else 'not met'}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
