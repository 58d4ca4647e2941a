"""Index build throughput, and IVF-PQ vs Flat on the bundled corpus: recall@20, bytes/vector.

Usage: python benchmarks/bench_index.py [--max-tokens 256] [--limit N]
Queries are the held-out test documents, ground truth is the exact Flat index.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, bundled_corpus, print_table  # noqa: E402

from index_server.build import BuildConfig, build_index  # noqa: E402
from index_server.encoder import EncoderConfig, TextEncoder  # noqa: E402
from index_server.search import LocalIndex, SearchParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    corpus = bundled_corpus()
    files = tuple(sorted(corpus.glob("*.index.jsonl")))
    queries_text = [json.loads(l)["text"] for l in open(corpus / "stdlib_code.test.jsonl", encoding="utf-8")]
    encoder_config = EncoderConfig(max_tokens=args.max_tokens)
    queries = TextEncoder(encoder_config).encode(queries_text)

    rows, truth = [], None
    for factory, params in (("Flat", SearchParams()), ("IVF32,PQ32", SearchParams(nprobe=8)),
                            ("IVF32,PQ16", SearchParams(nprobe=8)), ("HNSW32", SearchParams(ef_search=64))):
        out = WORK / f"index-{factory.replace(',', '_')}"
        t = time.perf_counter()
        manifest = build_index(BuildConfig(corpus=files, output=out, encoder=encoder_config, factory=factory,
                                           overwrite=True, progress=False))
        seconds = time.perf_counter() - t
        index = LocalIndex(out, params)
        t = time.perf_counter()
        found = index.search(queries, args.k).ids
        search_ms = (time.perf_counter() - t) / len(queries) * 1000
        if truth is None:
            truth = found
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)]))
        shard_bytes = sum((out / s.file).stat().st_size for s in manifest.shards)
        rows.append([factory, manifest.n_vectors, round(seconds, 1), round(manifest.n_vectors / seconds, 1),
                     round(shard_bytes / manifest.n_vectors, 1), round(recall, 3), round(search_ms, 3)])
    print_table(f"bundled corpus, {len(queries)} held-out queries, encoder max_tokens={args.max_tokens}",
                ["factory", "vectors", "build s", "docs/s", "bytes/vector", f"recall@{args.k}", "ms/query"], rows)


if __name__ == "__main__":
    main()
