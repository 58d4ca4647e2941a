"""Index build throughput, and IVF-PQ / HNSW vs Flat on the bundled corpus.

Usage: python benchmarks/bench_index.py [--max-tokens 256] [--k 20]
The corpus is embedded once (timed: the throughput of a build is dominated by it); every
index type is then built from the same vectors through the same shard writer as
`ttt-index build`. Queries are the held-out test documents; ground truth is Flat.
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

from index_server.atomic import atomic_output  # noqa: E402
from index_server.build import BuildConfig, embed_corpus, write_index  # noqa: E402
from index_server.corpus import CorpusStore, scan_corpus  # noqa: E402
from index_server.encoder import EncoderConfig, TextEncoder  # noqa: E402
from index_server.search import LocalIndex, SearchParams  # noqa: E402

FACTORIES = (("Flat", SearchParams()), ("IVF32,PQ32", SearchParams(nprobe=8)),
             ("IVF32,PQ16", SearchParams(nprobe=8)), ("HNSW32", SearchParams(ef_search=64)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    corpus = bundled_corpus()
    files = tuple(sorted(corpus.glob("*.index.jsonl")))
    encoder_config = EncoderConfig(max_tokens=args.max_tokens)
    encoder = TextEncoder(encoder_config)

    t = time.perf_counter()
    scan = scan_corpus(files, progress=False)
    scan_s = time.perf_counter() - t
    store = CorpusStore.from_scan(scan)
    vectors = np.empty((len(store), encoder.dim), dtype=np.float32)
    t = time.perf_counter()
    embed_corpus(store, encoder, vectors, progress=False)
    embed_s = time.perf_counter() - t
    queries = encoder.encode([json.loads(l)["text"] for l in open(corpus / "stdlib_code.test.jsonl", encoding="utf-8")])

    rows, truth = [], None
    for factory, params in FACTORIES:
        out = WORK / f"index-{factory.replace(',', '_')}"
        config = BuildConfig(corpus=files, output=out, encoder=encoder_config, factory=factory, overwrite=True, progress=False)
        t = time.perf_counter()
        with atomic_output(out, overwrite=True) as scratch:
            manifest = write_index(scratch, scan, vectors, encoder_config.identity(), config)
        write_s = time.perf_counter() - t
        index = LocalIndex(out, params)
        t = time.perf_counter()
        found = index.search(queries, args.k).ids
        search_ms = (time.perf_counter() - t) / len(queries) * 1000
        truth = found if truth is None else truth
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)]))
        shard_bytes = sum((out / s.file).stat().st_size for s in manifest.shards)
        total_s = scan_s + embed_s + write_s
        try:  # per-vector code, without fixed codebooks
            code_bytes = index.shards[0].index.sa_code_size()
        except RuntimeError:  # HNSW: flat codes plus link lists, no standalone codec
            code_bytes = "-"
        rows.append([factory, manifest.n_vectors, round(write_s, 2), round(total_s, 1), round(manifest.n_vectors / total_s, 1),
                     code_bytes, round(shard_bytes / manifest.n_vectors, 1), round(recall, 3), round(search_ms, 3)])
    print(f"scan {scan_s:.1f} s; embedding {len(store)} documents at {args.max_tokens} tokens: {embed_s:.1f} s "
          f"({len(store) / embed_s:.1f} docs/s)")
    print_table(f"bundled corpus, {len(queries)} held-out queries; build = scan + embed + index write",
                ["factory", "vectors", "write s", "build s", "docs/s", "code bytes", "file bytes/vector", f"recall@{args.k}",
                 "ms/query"], rows)
    print("code bytes: encoded size of one vector; file bytes/vector also spreads fixed costs (PQ codebooks,\n"
          "IVF centroids, HNSW links) over this small corpus, so it overstates large-index cost for IVF-PQ.")


if __name__ == "__main__":
    main()
