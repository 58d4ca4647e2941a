"""Pile-scale index layouts measured at millions of vectors, and a projection for the Pile.

Usage: python benchmarks/bench_scale.py [--vectors 2000000] [--dim 384] [--nlist 2048] [--pq 48]
                                        [--nprobe N] [--refine-factor F] [--json PATH]
       python benchmarks/bench_scale.py --embeddings work/scale/embeddings \
                                        --queries-corpus work/scale/corpus/scale.test.jsonl [--json PATH]

With ``--embeddings``: the same layouts on real embeddings (``ttt-index embed`` parts), the
queries the held-out documents of ``--queries-corpus`` embedded with the same encoder, nlist
from ``ttt-index plan``'s rule unless given; no synthetic memory curve or projection.

Data: a Gaussian mixture with thousands of centres, rows normalised like MiniLM embeddings,
written as `ttt-index embed` parts; 1,000 held-out queries from the same mixture. Every
layout is built by `ttt-index build --embeddings` (4 shards, one process each, peak RSS
measured) and searched in-process (LocalIndex over the 4 shards) and over 4 loopback gRPC
shard servers. Per layout: bytes per vector resident and on disk, recall@20 against exact
search, p50/p99 latency of single queries and batches of 64, server RSS, build time and
peak RSS; build peak RSS of the on-disk layout at growing N; recall on the real embeddings
of the bundled corpus; and a projection for the full Pile next to the reference's
30 x 256 GB. Records its recalls in index_server/measured_recall.json under this data's source
(what `ttt-index plan` expects: the lower of the synthetic and the real figure).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import WORK, current_rss_mb, embeddings_from_vectors, parser, report, write_json  # noqa: E402

from index_server.build import default_nprobe  # noqa: E402
from index_server.client import GrpcIndex  # noqa: E402
from index_server.launcher import ShardProcess, start_shard_server  # noqa: E402
from index_server.manifest import Manifest  # noqa: E402
from index_server.options import NLIST_PER_NPROBE, REFINE_FACTOR, IndexOptions  # noqa: E402
from index_server.plan import MEASURED, default_nlist, human, record_measured_recall  # noqa: E402
from index_server.search import LocalIndex  # noqa: E402
from index_server.server import ServerConfig  # noqa: E402

BIN = Path(sys.executable).parent
K = 20
SHARDS = 4
REFERENCE = "reference TTT-NN: Flat fp32, 30 machines x 256 GB (810 GB index)"


def mixture(n: int, dim: int, centres: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(12345).standard_normal((centres, dim)).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 200_000):
        m = min(n, start + 200_000) - start
        block = means[rng.integers(centres, size=m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def real_data(args) -> tuple[Path, np.ndarray, str]:
    """Real embedding parts, and their held-out queries embedded with the same encoder (cached)."""
    import hashlib

    from index_server.build import load_parts
    from index_server.encoder import encoder_of, manifest_entry

    layout, metas = load_parts(args.embeddings)
    n = sum(m.n_docs for m in metas)
    args.vectors, args.dim = n, layout.dim
    args.nlist = args.nlist or default_nlist(n)
    args.train_size = min(args.train_size, n)
    entry = manifest_entry(layout.encoder, layout.encoder_dtype)
    key = hashlib.sha256(f"{args.queries_corpus.resolve()}:{args.queries_corpus.stat().st_size}:"
                         f"{json.dumps(entry, sort_keys=True)}".encode()).hexdigest()[:12]
    cached = WORK / f"scale-queries-{key}.npy"
    if not cached.is_file():
        texts = [json.loads(line)["text"] for line in open(args.queries_corpus, encoding="utf-8")]
        np.save(cached, encoder_of(entry).encode(texts, progress=True))
    queries = np.load(cached)
    return args.embeddings, queries, f"{n:,} x {layout.dim} real embeddings ({args.embeddings.name})"


def layouts(args) -> list[tuple[str, str, list[str], str]]:
    """(name, factory, build flags, measured-recall family)."""
    ivf, pq = f"IVF{args.nlist}", f"PQ{args.pq}"
    family = f"IVF,PQ(d/{args.dim // args.pq})"
    return [
        ("Flat", "Flat", [], "Flat"),
        (f"{ivf},Flat", f"{ivf},Flat", [], "IVF,Flat"),
        (f"{ivf},{pq}", f"{ivf},{pq}", [], family),
        (f"{ivf},{pq} + refine", f"{ivf},{pq}", ["--refine"], family + " + refine"),
        (f"{ivf},{pq} on-disk", f"{ivf},{pq}", ["--on-disk"], family),
        (f"{ivf},{pq} on-disk + refine", f"{ivf},{pq}", ["--on-disk", "--refine"], family + " + refine"),
    ]


def build(emb: Path, out: Path, factory: str, flags: list[str], train_size: int) -> tuple[float, float]:
    """`ttt-index build` in a fresh process; (seconds, that process's peak RSS in MB)."""
    cmd = [str(BIN / "ttt-index"), "build", "--embeddings", str(emb), "--out", str(out), "--factory", factory,
           "--shards", str(SHARDS), "--train-size", str(train_size), "--quiet", "--overwrite", *flags]
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "sys.stderr.write(r.stderr[-3000:]); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    code_, peak = proc.stdout.split()
    if int(code_) != 0:
        raise SystemExit(f"build {factory} {flags} failed:\n{proc.stderr}")
    return time.perf_counter() - start, float(peak)


def latencies(search, queries: np.ndarray, batch: int) -> tuple[float, float]:
    times = []
    for i in range(0, len(queries), batch):
        t = time.perf_counter()
        search(queries[i : i + batch], K)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))


def serve(index: Path, search: IndexOptions) -> tuple[list[ShardProcess], tuple[str, ...]]:
    procs = [start_shard_server(ServerConfig(index, shards=(i,), search=search)) for i in range(SHARDS)]
    return procs, tuple(p.address for p in procs)


def resident_bytes(manifest: Manifest) -> float:
    """Bytes per vector that stay in RAM: the shard files (codes, ids, quantizers). On-disk
    inverted lists and stored float16 vectors are memory-mapped and read through the page cache."""
    return sum(s.file.size for s in manifest.shards) / manifest.n_vectors


def disk_bytes(index: Path, manifest: Manifest) -> float:
    files = [f for s in manifest.shards for f in s.files()] + [manifest.doc_table] + (
        [manifest.vectors] if manifest.vectors else [])
    return sum(f.size for f in files) / manifest.n_vectors


def real_recall(args) -> dict[str, float]:
    """Recall@20 of each layout family on the bundled corpus's real embeddings."""
    from index_server.build import BuildConfig, build_index
    from index_server.embed import EmbedConfig, run_embed
    from index_server.encoder import EncoderConfig, TextEncoder
    from lm_eval_ttt.assets import ensure_default_corpus

    corpus = ensure_default_corpus()
    emb = WORK / "scale-real.emb"
    if not (emb / "embeddings.json").is_file():
        run_embed(EmbedConfig(corpus=tuple(sorted(corpus.glob("*.index.jsonl"))), output=emb, progress=False))
    texts = [json.loads(line)["text"] for line in open(corpus / "stdlib_code.test.jsonl", encoding="utf-8")]
    queries = TextEncoder(EncoderConfig()).encode(texts)
    out, truth = {}, None
    nlist = 32  # 1,643 vectors: ~50 per list
    for name, factory, flags, family in layouts(args):
        factory = factory.replace(f"IVF{args.nlist}", f"IVF{nlist}")
        if "on-disk" in name:
            continue  # same codes as in RAM
        path = WORK / f"scale-real-{name.replace(' ', '_').replace(',', '_')}"
        build_index(BuildConfig(output=path, embeddings=emb, factory=factory, store_vectors="--refine" in flags,
                                overwrite=True, progress=False))
        found = LocalIndex(path, IndexOptions(nprobe=8, refine_factor=args.refine_factor)).search(queries, K).ids
        truth = found if truth is None else truth
        out[family] = recall(found, truth)
    return out


def projection(families: dict[str, dict], args) -> list[list]:
    """RAM, disk and machines for the full Pile from the measured layouts' bytes per vector."""
    from index_server.plan import candidates

    rows = []
    for n, dim, encoder in ((210_000_000, 1024, "RoBERTa-large 1024-d"), (210_000_000, 384, "MiniLM 384-d")):
        for layout in candidates(n, dim):
            if "SQ8" in layout.factory or (layout.family not in families and layout.factory != "Flat"):
                continue
            measured = families.get(layout.family, {})
            machines = math.ceil(layout.ram_bytes / (256 * 2**30))
            options = " ".join(o for o, on in (("on-disk", layout.on_disk), ("refine", layout.refine)) if on)
            rows.append([encoder, f"{layout.factory} {options}".strip(), human(layout.ram_bytes),
                         human(layout.disk_bytes),
                         machines, "yes" if layout.ram_bytes < 64 * 2**30 else "no",
                         round(measured.get("recall", layout.recall or float("nan")), 3)])
    return rows


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--vectors", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--centres", type=int, default=4000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, help="IVF lists (default: 2048; with --embeddings, plan's rule)")
    p.add_argument("--pq", type=int, default=48)
    p.add_argument("--nprobe", type=int, help=f"lists probed (default: what an index built here records, "
                                             f"nlist/{NLIST_PER_NPROBE}, so that the recorded recall is a default "
                                             f"search's)")
    p.add_argument("--refine-factor", type=int, default=REFINE_FACTOR,
                   help=f"--refine layouts: candidates per neighbour re-ranked (default: the search's, "
                        f"{REFINE_FACTOR})")
    p.add_argument("--train-size", type=int, default=40 * 2048)
    p.add_argument("--rss-sizes", default="500000,1000000", help="smaller N for the build-memory curve")
    p.add_argument("--no-measured-recall", action="store_true", help="do not write index_server/measured_recall.json")
    p.add_argument("--embeddings", type=Path, help="real embeddings (`ttt-index embed` parts) instead of the mixture")
    p.add_argument("--queries-corpus", type=Path, help="with --embeddings: held-out JSONL documents as the queries")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.embeddings:
        emb, queries, data = real_data(args)
    else:
        args.nlist = args.nlist or 2048
        vectors = mixture(args.vectors, args.dim, args.centres, seed=0)
        queries = mixture(args.queries, args.dim, args.centres, seed=1)
        emb = embeddings_from_vectors(vectors, f"scale-{args.vectors}")
        del vectors
        data = f"{args.vectors:,} x {args.dim} clustered vectors"
    print(f"data: {data}, {len(queries)} queries ({time.perf_counter() - started:.0f} s)", flush=True)

    args.nprobe = args.nprobe or default_nprobe(args.nlist)
    rows, families, truth = [], {}, None
    options = IndexOptions(nprobe=args.nprobe, refine_factor=args.refine_factor)
    for name, factory, flags, family in layouts(args):
        out = WORK / f"scale-{args.vectors}-{name.replace(' ', '_').replace(',', '_')}"
        build_s, build_peak = build(emb, out, factory, flags, args.train_size)
        manifest = Manifest.load(out)
        rss_before = current_rss_mb()
        index = LocalIndex(out, IndexOptions() if factory == "Flat" else options)
        found = index.search(queries, K).ids
        truth = found if truth is None else truth  # the first layout is Flat: exact search
        single = latencies(index.search, queries, 1)
        batched = latencies(index.search, queries, 64)
        in_process_rss = current_rss_mb() - rss_before
        del index
        procs, addresses = serve(out, IndexOptions() if factory == "Flat" else options)
        try:
            remote = GrpcIndex(addresses)
            assert np.array_equal(remote.search(queries[:50], K).ids, found[:50]), "gRPC != in-process"
            grpc_single = latencies(remote.search, queries[:300], 1)
            grpc_batched = latencies(remote.search, queries, 64)
            server_rss = sum(current_rss_mb(proc.process.pid) for proc in procs)
            remote.close()
        finally:
            for proc in procs:
                proc.stop()
        r = recall(found, truth)
        resident = resident_bytes(manifest)
        row = {"layout": name, "vectors": manifest.n_vectors, "bytes_per_vector_resident": round(resident, 1),
               "bytes_per_vector_disk": round(disk_bytes(out, manifest), 1), "recall_at_20": round(r, 4),
               "p50_ms": round(single[0], 2), "p99_ms": round(single[1], 2), "batch64_p50_ms": round(batched[0], 1),
               "batch64_p99_ms": round(batched[1], 1), "grpc_p50_ms": round(grpc_single[0], 2),
               "grpc_p99_ms": round(grpc_single[1], 2), "grpc_batch64_p50_ms": round(grpc_batched[0], 1),
               "server_rss_mb": round(server_rss), "in_process_rss_growth_mb": round(in_process_rss),
               "build_s": round(build_s), "build_peak_rss_mb": round(build_peak),
               "nprobe": None if factory == "Flat" else args.nprobe,  # what the recall was searched with
               "refine_factor": args.refine_factor if "--refine" in flags else None}
        rows.append(row)
        families.setdefault(family, {"recall": r})
        print(json.dumps(row), flush=True)
        if name != f"IVF{args.nlist},PQ{args.pq} on-disk + refine" and name != "Flat":
            shutil.rmtree(out, ignore_errors=True)  # keep the disk use bounded

    kind = "real" if args.embeddings else "synthetic"
    source = f"{data}, nlist {args.nlist}, nprobe {args.nprobe}, refine {args.refine_factor} (bench_scale.py)"
    if not args.no_measured_recall:
        record_measured_recall(kind, source, {f: v["recall"] for f, v in families.items()})
        print(f"recorded in {MEASURED} as the {kind} measurement: {source}")
    if args.embeddings:
        report(f"{data}, {SHARDS} shards, k={K}, nprobe {args.nprobe}, refine factor {args.refine_factor}; latency "
               f"per call; 2 CPU cores", ["layout", "vectors", "B/vec RAM", "B/vec disk", "recall@20", "p50 ms",
                                          "p99 ms", "batch64 p50", "gRPC p50", "gRPC b64 p50", "server RSS MB",
                                          "build s", "build RSS MB"],
               [[r[k] for k in ("layout", "vectors", "bytes_per_vector_resident", "bytes_per_vector_disk",
                                "recall_at_20", "p50_ms", "p99_ms", "batch64_p50_ms", "grpc_p50_ms",
                                "grpc_batch64_p50_ms", "server_rss_mb", "build_s", "build_peak_rss_mb")] for r in rows])
        write_json(args.json, rows)
        print(f"total {time.perf_counter() - started:.0f} s")
        return

    memory_rows = []
    on_disk_factory, on_disk_flags = f"IVF{args.nlist},PQ{args.pq}", ["--on-disk"]
    for n in [int(x) for x in args.rss_sizes.split(",") if x] + [args.vectors]:
        sub = emb if n == args.vectors else embeddings_from_vectors(mixture(n, args.dim, args.centres, seed=0),
                                                                   f"scale-{n}")
        _, peak = build(sub, WORK / f"scale-rss-{n}", on_disk_factory, on_disk_flags, args.train_size)
        memory_rows.append([n, round(peak), round(peak * 2**20 / n, 1)])
        shutil.rmtree(WORK / f"scale-rss-{n}", ignore_errors=True)

    real = real_recall(args)
    flat_resident = rows[0]["bytes_per_vector_resident"]
    table = [[r["layout"], r["vectors"], r["bytes_per_vector_resident"], r["bytes_per_vector_disk"], r["recall_at_20"],
              round(real.get(next(f for n, _, _, f in layouts(args) if n == r["layout"]), float("nan")), 3),
              r["p50_ms"], r["p99_ms"], r["batch64_p50_ms"], r["grpc_p50_ms"], r["grpc_batch64_p50_ms"],
              r["server_rss_mb"], r["build_s"], r["build_peak_rss_mb"]] for r in rows]
    report(f"{data}, {SHARDS} shards, k={K}, nprobe {args.nprobe}, refine factor {args.refine_factor}; latency per "
           f"call; 2 CPU cores",
           ["layout", "vectors", "B/vec RAM", "B/vec disk", "recall@20", "recall@20 real", "p50 ms", "p99 ms",
            "batch64 p50", "gRPC p50", "gRPC b64 p50", "server RSS MB", "build s", "build RSS MB"], table)
    report(f"build peak RSS of {on_disk_factory} --on-disk against N (train sample {args.train_size}, blocks of 65536)",
           ["vectors", "peak RSS MB", "bytes/vector"], memory_rows)
    pile = projection(families, args)
    report(f"projection for the full Pile (210M documents), RAM per layout; {REFERENCE}",
           ["encoder", "layout", "RAM", "disk", "256 GB machines", "fits 64 GB", "recall@20 (measured at 2M)"], pile)

    good = [r for r in rows if r["recall_at_20"] >= 0.95 and r["bytes_per_vector_resident"] <= flat_resident / 8]
    single_ok = [r for r in rows if r["p50_ms"] <= 20 and r["layout"] != "Flat"]
    peaks = [m[1] for m in memory_rows]
    fits = [row for row in pile if row[5] == "yes" and row[6] == row[6] and row[6] >= 0.95]
    print("\ntargets:")
    print(f"  recall@20 >= 0.95 at <= 1/8 of Flat's resident bytes: {'met' if good else 'not met'} "
          f"({', '.join(r['layout'] for r in good) or 'none'})")
    print(f"  single-query p50 <= 20 ms in-process at {args.vectors:,}: {'met' if single_ok else 'not met'} "
          f"({', '.join(r['layout'] for r in single_ok)})")
    print(f"  build peak RSS flat in N ({', '.join(f'{m[0]:,}: {m[1]} MB' for m in memory_rows)}): "
          f"{'met' if max(peaks) <= 1.25 * min(peaks) else 'not met'}")
    print("  a Pile projection that fits one machine with < 64 GB RAM at recall >= 0.95: "
          + ("met" if fits else "not met"))
    write_json(args.json, rows + [{"layout": f"build RSS at {m[0]}", "vectors": m[0], "build_peak_rss_mb": m[1]}
                                  for m in memory_rows])
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
