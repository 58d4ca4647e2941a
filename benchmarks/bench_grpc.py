"""gRPC shard service vs the in-process index: latency, throughput, concurrency.

Usage: python benchmarks/bench_grpc.py [--vectors 100000] [--k 20] [--json PATH]
Builds Flat indexes of random 384-d vectors over a synthetic corpus (S = 1 and 4 shards),
starts one `ttt-index serve` process per shard on loopback, and prints p50/p99 latency per
query and queries/s for single queries and batches of 32, in-process and over gRPC side by
side, then 8 concurrent clients x 1000 queries (errors must be 0).
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, embeddings_from_vectors, parser, report, write_json  # noqa: E402

from index_server.build import BuildConfig, build_index  # noqa: E402
from index_server.client import GrpcIndex  # noqa: E402
from index_server.launcher import ShardProcess, start_shard_server  # noqa: E402
from index_server.search import LocalIndex  # noqa: E402
from index_server.server import ServerConfig  # noqa: E402

DIM = 384


def build(n: int, shards: int) -> Path:
    out = WORK / f"synthetic-{n}-s{shards}"
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    emb = embeddings_from_vectors(vectors, f"grpc-{n}")
    build_index(BuildConfig(output=out, embeddings=emb, shards=shards, overwrite=True, progress=False))
    return out


def serve(index: Path, shards: int) -> tuple[list[ShardProcess], tuple[str, ...]]:
    procs = [start_shard_server(ServerConfig(index, shards=(i,))) for i in range(shards)]
    return procs, tuple(p.address for p in procs)


def timed(search, queries: np.ndarray, batch: int, k: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, queries/s) with one call per ``batch`` queries; latency per call."""
    latencies = []
    start = time.perf_counter()
    for i in range(0, len(queries), batch):
        t = time.perf_counter()
        search(queries[i : i + batch], k)
        latencies.append((time.perf_counter() - t) * 1000)
    qps = len(queries) / (time.perf_counter() - start)
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99)), qps


def concurrent(addresses: tuple[str, ...], queries: np.ndarray, k: int, clients: int,
               per_client: int) -> tuple[int, int, float]:
    errors, done = [], []

    def worker(seed: int) -> None:
        client = GrpcIndex(addresses)
        rng = np.random.default_rng(seed)
        for _ in range(per_client):
            try:
                client.search(queries[rng.integers(len(queries))][None], k)
                done.append(1)
            except Exception as e:  # counted, reported below
                errors.append(repr(e))
        client.close()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(done), len(errors), len(done) / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=1000)
    args = p.parse_args()
    queries = np.random.default_rng(1).standard_normal((args.queries, DIM)).astype(np.float32)
    rows, load_rows = [], []
    for shards in (1, 4):
        index = build(args.vectors, shards)
        local = LocalIndex(index)
        procs, addresses = serve(index, shards)
        try:
            remote = GrpcIndex(addresses)
            np.testing.assert_array_equal(remote.search(queries, args.k).ids, local.search(queries, args.k).ids)
            for batch in (1, 32):
                for name, backend in (("in-process", local), ("gRPC", remote)):
                    p50, p99, qps = timed(backend.search, queries, batch, args.k)
                    rows.append([shards, batch, name, round(p50, 2), round(p99, 2), round(qps, 1)])
            ok, failed, qps = concurrent(addresses, queries, args.k, args.clients, args.per_client)
            load_rows.append([shards, args.clients, ok, failed, round(qps, 1)])
        finally:
            for p in procs:
                p.stop()
    out = report(f"{args.vectors} vectors x {DIM} dims, Flat, k={args.k}; latency per call",
                 ["shards", "batch", "backend", "p50 ms", "p99 ms", "queries/s"], rows,
                 ["shards", "batch", "backend", "p50_ms", "p99_ms", "queries_per_s"])
    out += report(f"{args.clients} concurrent gRPC clients x {args.per_client} single queries",
                  ["shards", "clients", "answered", "errors", "queries/s"], load_rows,
                  ["shards", "clients", "answered", "errors", "queries_per_s"])
    write_json(args.json, out)


if __name__ == "__main__":
    main()
