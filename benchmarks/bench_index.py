"""Index build throughput, and IVF-PQ / HNSW vs Flat on the bundled corpus.

Usage: python benchmarks/bench_index.py [--max-tokens 256] [--k 20] [--json PATH]
The corpus is embedded once with `ttt-index embed` (timed: a build's throughput is
dominated by it); every index type is then built from the same embeddings by
`ttt-index build --embeddings`. Queries are the held-out test documents; ground truth is Flat.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, bundled_corpus, parser, report, write_json  # noqa: E402

from index_server.build import BuildConfig, build_index  # noqa: E402
from index_server.embed import EmbedConfig, run_embed  # noqa: E402
from index_server.encoder import EncoderConfig, TextEncoder  # noqa: E402
from index_server.options import IndexOptions  # noqa: E402
from index_server.search import LocalIndex  # noqa: E402

FACTORIES = (("Flat", IndexOptions()), ("IVF32,PQ32", IndexOptions(nprobe=8)),
             ("IVF32,PQ16", IndexOptions(nprobe=8)), ("HNSW32", IndexOptions(ef_search=64)))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--k", type=int, default=20)
    args = p.parse_args()
    corpus = bundled_corpus()
    files = tuple(sorted(corpus.glob("*.index.jsonl")))
    encoder_config = EncoderConfig(max_tokens=args.max_tokens)
    emb = WORK / "index-embeddings"
    shutil.rmtree(emb, ignore_errors=True)
    t = time.perf_counter()
    layout = run_embed(EmbedConfig(corpus=files, output=emb, encoder=encoder_config, progress=False))
    embed_s = time.perf_counter() - t
    queries = TextEncoder(encoder_config).encode(
        [json.loads(line)["text"] for line in open(corpus / "stdlib_code.test.jsonl", encoding="utf-8")])

    rows, truth = [], None
    for factory, options in FACTORIES:
        out = WORK / f"index-{factory.replace(',', '_')}"
        t = time.perf_counter()
        manifest = build_index(BuildConfig(output=out, embeddings=emb, factory=factory, overwrite=True, progress=False))
        write_s = time.perf_counter() - t
        index = LocalIndex(out, options)
        t = time.perf_counter()
        found = index.search(queries, args.k).ids
        search_ms = (time.perf_counter() - t) / len(queries) * 1000
        truth = found if truth is None else truth
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, truth)]))
        shard_bytes = sum(s.file.size for s in manifest.shards)
        try:  # per-vector code, without fixed codebooks
            code_bytes = index.shards[0].index.sa_code_size()
        except RuntimeError:  # HNSW: flat codes plus link lists, no standalone codec
            code_bytes = "-"
        rows.append([factory, manifest.n_vectors, round(write_s, 2), round(embed_s + write_s, 1),
                     round(manifest.n_vectors / (embed_s + write_s), 1), code_bytes,
                     round(shard_bytes / manifest.n_vectors, 1), round(recall, 3), round(search_ms, 3)])
    print(f"embedding {rows[0][1]} documents at {args.max_tokens} tokens in {layout.num_parts} part(s): "
          f"{embed_s:.1f} s "
          f"({rows[0][1] / embed_s:.1f} docs/s)")
    out = report(f"bundled corpus, {len(queries)} held-out queries; build = embed + index write",
                 ["factory", "vectors", "write s", "build s", "docs/s", "code bytes", "file bytes/vector",
                  f"recall@{args.k}", "ms/query"], rows,
                 ["factory", "vectors", "write_s", "build_s", "docs_per_s", "code_bytes", "file_bytes_per_vector",
                  "recall_at_k", "ms_per_query"])
    print("code bytes: encoded size of one vector; file bytes/vector also spreads fixed costs (PQ codebooks,\n"
          "IVF centroids, HNSW links) over this small corpus, so it overstates large-index cost for IVF-PQ.")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
