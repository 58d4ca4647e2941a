"""``ttt-index``: write the default corpus, embed, build, plan, inspect and serve sharded indexes.

Argument defaults come from the config dataclasses (``EncoderConfig``, ``EmbedConfig``,
``BuildConfig``, ``ServerConfig``, ``IndexOptions``), never repeated here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .build import TRAIN_POINTS_PER_CENTROID, BuildConfig
from .embed import DEFAULT_PART_BYTES, STORE_DTYPES, EmbedConfig
from .encoder import ENCODER_DTYPES, EncoderConfig
from .launcher import MAX_RESTARTS
from .options import NLIST_PER_NPROBE, REFINE_FACTOR, IndexOptions
from .server import ServerConfig
from .source_corpus import SourceCorpusConfig

DEFAULT_WORK_DIR = Path("work")


def defaults(cls) -> dict:
    """Field defaults of a config dataclass (default factories called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


ENCODER, EMBED, BUILD, SERVER, OPTIONS, CORPUS = (
    defaults(c) for c in (EncoderConfig, EmbedConfig, BuildConfig, ServerConfig, IndexOptions, SourceCorpusConfig))


def _encoder(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(args.encoder, args.max_tokens, args.batch_size)


def _cmd_default_corpus(args: argparse.Namespace) -> None:
    from .default_corpus import write_default_corpus

    stats = write_default_corpus(args.out, progress=not args.quiet)
    for subset, s in stats.items():
        print(f"{subset}: {s.index} index documents, {s.test} held-out test documents"
              + (f", {len(s.skipped)} skipped (not UTF-8)" if s.skipped else ""))
    print(f"written under {args.out}")


def _cmd_corpus(args: argparse.Namespace) -> None:
    from .source_corpus import SourceCorpusConfig, summary_lines, write_source_corpus

    summary = write_source_corpus(SourceCorpusConfig(
        output=args.out, inputs=tuple(args.inputs), packages=tuple(args.package or ()), name=args.name,
        include=tuple(args.include or ()), exclude=CORPUS["exclude"] + tuple(args.exclude or ()),
        min_bytes=args.min_bytes, max_bytes=args.max_bytes, validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction, overwrite=args.overwrite, progress=not args.quiet))
    print("\n".join(summary_lines(summary)))
    print(f"written under {args.out}: " + ", ".join(summary["files"].values()))


def _cmd_embed(args: argparse.Namespace) -> None:
    from .embed import missing_parts, run_embed

    layout = run_embed(EmbedConfig(corpus=tuple(args.corpus), output=args.out, encoder=_encoder(args),
                                   num_parts=args.num_parts, parts=tuple(args.part or ()), store_dtype=args.store_dtype,
                                   device=args.device, dtype=args.dtype, progress=not args.quiet))
    missing = missing_parts(args.out, layout)
    print(f"{layout.num_parts - len(missing)} of {layout.num_parts} parts embedded in {args.out}"
          + (f"; still missing: {' '.join(map(str, missing[:20]))}" if missing else "; ready for "
             f"`ttt-index build --embeddings {args.out}`"))


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import build_index

    if args.max_memory:
        from .plan import choose_layout

        if args.factory is not None or args.on_disk or args.refine:
            raise ValueError("--max-memory chooses the factory, --on-disk and --refine: give it or them, not both")
        chosen = choose_layout(args.max_memory, args.embeddings, tuple(args.corpus), _encoder(args))
        print(f"--max-memory {args.max_memory}: chose {chosen.describe()}")
        args.factory, args.on_disk, args.refine = chosen.factory, chosen.on_disk, chosen.refine
    manifest = build_index(BuildConfig(
        output=args.out, corpus=tuple(args.corpus), embeddings=args.embeddings, encoder=_encoder(args),
        factory=args.factory or BUILD["factory"], metric=args.metric, shards=args.shards, train_size=args.train_size,
        on_disk=args.on_disk, store_vectors=args.refine, num_parts=args.num_parts, store_dtype=args.store_dtype,
        overwrite=args.overwrite, device=args.device, progress=not args.quiet,
    ))
    print(f"index {manifest.identity}: {manifest.n_vectors} vectors x {manifest.dim} dims, "
          f"{len(manifest.shards)} shard(s) of {manifest.factory!r}, metric {manifest.metric}"
          + (", on-disk lists" if args.on_disk else "")
          + (", stored vectors for exact re-ranking" if args.refine else "")
          + (f", {manifest.empty_documents} empty documents left out" if manifest.empty_documents else ""))
    print(f"written to {args.out}")


def _cmd_plan(args: argparse.Namespace) -> None:
    from .plan import plan_table

    print(plan_table(args.vectors, args.dim, args.max_memory, args.max_disk))


def _cmd_info(args: argparse.Namespace) -> None:
    from .manifest import Manifest

    manifest = Manifest.load(args.index)
    if args.verify or args.full:
        manifest.verify(args.index, full=args.full, corpus_root=args.corpus_root)
        print("verified: corpus and index files match the manifest" + (" (full hashes)" if args.full else ""),
              file=sys.stderr)
    print(manifest.to_json())


def _search_options(args: argparse.Namespace) -> IndexOptions:
    return IndexOptions(nprobe=args.nprobe, ef_search=args.ef_search, refine_factor=args.refine_factor,
                        corpus_root=args.corpus_root)


def _server_config(args: argparse.Namespace) -> ServerConfig:
    from .options import read_token_file

    return ServerConfig(
        index=args.index, shards=tuple(args.shards) if args.shards else None, host=args.host, port=args.port,
        max_k=args.max_k, max_batch=args.max_batch, max_message_bytes=args.max_message_mb << 20, workers=args.workers,
        token=read_token_file(args.token_file) if args.token_file else None, tls_cert=args.tls_cert,
        tls_key=args.tls_key, insecure=args.insecure, search=_search_options(args),
    )


def _cmd_serve(args: argparse.Namespace) -> None:
    from .server import serve

    serve(_server_config(args))


def _cmd_serve_all(args: argparse.Namespace) -> None:
    from .launcher import serve_all

    args.shards, args.port = None, 0
    serve_all(_server_config(args), args.base_port, max_restarts=args.max_restarts)


def add_encoder_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default=ENCODER["name_or_path"],
                   help="HF encoder hub id or local path (default: %(default)s, bundled)")
    p.add_argument("--max-tokens", type=int, default=ENCODER["max_tokens"],
                   help="tokens of each document to embed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=ENCODER["batch_size"],
                   help="documents per encoder batch (default: %(default)s)")
    p.add_argument("--device", default=EMBED["device"], help="torch device of the encoder (default: %(default)s)")
    p.add_argument("--num-parts", type=int,
                   help=f"cut the corpus into this many byte-range parts (default: one per "
                        f"{DEFAULT_PART_BYTES >> 20} MiB)")
    p.add_argument("--store-dtype", choices=STORE_DTYPES, default=EMBED["store_dtype"],
                   help="dtype of the stored embeddings (default: %(default)s)")


def add_server_arguments(p: argparse.ArgumentParser, single: bool = True) -> None:
    p.add_argument("index", type=Path, help="index directory written by `ttt-index build`")
    if single:
        p.add_argument("--shards", type=int, nargs="+", help="shard numbers to serve (default: all)")
        p.add_argument("--port", type=int, default=SERVER["port"],
                       help="port; 0 picks a free one (default: %(default)s)")
    else:
        p.add_argument("--base-port", type=int, default=50051,
                       help="port of shard 0; shard i gets base+i; 0 picks free ports (default: %(default)s)")
        p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                       help="restarts of a shard server that dies (default: %(default)s)")
    p.add_argument("--host", default=SERVER["host"],
                   help="bind address (default: %(default)s, loopback only; others need --token-file or --insecure)")
    p.add_argument("--max-k", type=int, default=SERVER["max_k"], help="largest k accepted (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=SERVER["max_batch"],
                   help="most query vectors per request (default: %(default)s)")
    p.add_argument("--max-message-mb", type=int, default=SERVER["max_message_bytes"] >> 20,
                   help="gRPC message size limit in MiB (default: %(default)s)")
    p.add_argument("--workers", type=int, default=SERVER["workers"],
                   help="request handler threads (default: %(default)s)")
    p.add_argument("--nprobe", type=int, default=OPTIONS["nprobe"],
                   help=f"IVF lists probed per query (default: the index's, nlist/{NLIST_PER_NPROBE})")
    p.add_argument("--ef-search", type=int, default=OPTIONS["ef_search"], help="HNSW efSearch")
    p.add_argument("--refine-factor", type=int, default=OPTIONS["refine_factor"],
                   help=f"--refine indexes: candidates per neighbour re-ranked exactly (default: {REFINE_FACTOR})")
    p.add_argument("--corpus-root", type=Path, help="directory holding the corpus files, if they moved since the build")
    p.add_argument("--token-file", type=Path,
                   help="file holding the bearer token clients must send (must not be empty)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttt-index",
        description="Corpus store, sharded Faiss index build and gRPC k-NN shard servers for ttt-nn.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("default-corpus", help="write the bundled Pile-format corpus (CPython stdlib code + docs)",
                       description="Write stdlib_code.{index,test}.jsonl and python_docs.{index,test}.jsonl "
                                   "from the running Python installation, split ~90/10 by file.")
    p.add_argument("--out", type=Path, default=DEFAULT_WORK_DIR / "corpus",
                   help="output directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_default_corpus)

    p = sub.add_parser("corpus", help="turn source trees and Python distributions into a Pile-format corpus",
                       description="One document per file of directories, archives (wheels, sdists, tarballs, zips) "
                                   "and installed distributions, with path, source, version and licence in meta; "
                                   "binary, non-UTF-8, unreadable and out-of-size files skipped and counted, exact "
                                   "duplicates kept once, and a split into index / validation / test by a hash of "
                                   "the path. Globs match the path inside its source (fnmatch: * crosses /).")
    p.add_argument("inputs", type=Path, nargs="*", help="directories and archives")
    p.add_argument("--package", action="append", help="an installed distribution, by name (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output directory (written whole or not at all)")
    p.add_argument("--name", default=CORPUS["name"], help="file prefix: NAME.index.jsonl, NAME.validation.jsonl, "
                                                          "NAME.test.jsonl (default: %(default)s)")
    p.add_argument("--include", action="append", help="keep only paths matching this glob (repeatable), e.g. '*.py'")
    p.add_argument("--exclude", action="append",
                   help=f"drop paths matching this glob (repeatable; always: {' '.join(CORPUS['exclude'])})")
    p.add_argument("--min-bytes", type=int, default=CORPUS["min_bytes"],
                   help="smallest file kept (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=CORPUS["max_bytes"],
                   help="largest file kept (default: %(default)s)")
    p.add_argument("--validation-fraction", type=float, default=CORPUS["validation_fraction"],
                   help="share of paths for validation (default: %(default)s)")
    p.add_argument("--test-fraction", type=float, default=CORPUS["test_fraction"],
                   help="share of paths held out for test (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only one written by this)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("embed", help="embed a JSONL corpus into resumable parts (parallel: --part, or RANK/WORLD_SIZE)",
                       description="Cut the corpus into byte-range parts, validate and embed each (first "
                                   "--max-tokens tokens, masked mean pooling) and write it atomically. Finished parts "
                                   "are skipped, so a killed run resumes. --part I embeds only part I (a Slurm array); "
                                   "under torchrun / accelerate launch each rank takes parts RANK, RANK+WORLD_SIZE, "
                                   "...")
    p.add_argument("corpus", type=Path, nargs="+",
                   help="Pile-format JSONL files ({\"text\": ..., \"meta\": ...} per line)")
    p.add_argument("--out", type=Path, required=True, help="embeddings directory (shared by every job)")
    p.add_argument("--part", type=int, nargs="+", help="embed only these parts")
    p.add_argument("--dtype", default=EMBED["dtype"], choices=ENCODER_DTYPES,
                   help="encoder arithmetic, recorded in the index manifest and used for its queries: bfloat16 on a "
                        "CPU with bf16 instructions (avx512_bf16, AMX), float16 on a GPU (default: %(default)s)")
    add_encoder_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("build", help="build S Faiss shards plus a manifest, from a corpus or from embeddings",
                       description="Embed every document (or read --embeddings), train the index once on a sample "
                                   "and add vectors block by block into --shards shards built from an index_factory "
                                   "string.")
    p.add_argument("corpus", type=Path, nargs="*", help="Pile-format JSONL files (or use --embeddings)")
    p.add_argument("--embeddings", type=Path, help="directory written by `ttt-index embed` (all parts present)")
    p.add_argument("--out", type=Path, required=True, help="index directory to create")
    add_encoder_arguments(p)
    p.add_argument("--factory",
                   help=f"faiss index_factory string, e.g. Flat, IVF4096,PQ64, HNSW32 (default: {BUILD['factory']})")
    p.add_argument("--metric", choices=("l2", "ip"), default=BUILD["metric"], help="distance (default: %(default)s)")
    p.add_argument("--shards", type=int, default=BUILD["shards"],
                   help="number of shards, contiguous id ranges (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=BUILD["train_size"],
                   help=f"vectors sampled to train IVF/PQ (default: {TRAIN_POINTS_PER_CENTROID} per centroid)")
    p.add_argument("--on-disk", action="store_true", help="IVF inverted lists in an on-disk file per shard")
    p.add_argument("--refine", action="store_true", help="store float16 vectors and re-rank candidates exactly")
    p.add_argument("--max-memory", help="choose factory/--on-disk/--refine for this RAM budget (e.g. 64G; see `plan`)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing index directory (only one built by ttt-index)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("plan", help="index layouts for a corpus size and a memory budget, and the one chosen",
                       description="Prints candidate factory strings with bytes per vector in RAM and on disk, "
                                   "the recall measured by benchmarks/bench_scale.py, and the layout chosen.")
    p.add_argument("--vectors", required=True, help="number of vectors, e.g. 210M")
    p.add_argument("--dim", type=int, required=True, help="embedding dimension")
    p.add_argument("--max-memory", required=True, help="RAM budget of one machine, e.g. 64G")
    p.add_argument("--max-disk", help="disk budget, e.g. 2T (default: unlimited)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("info", help="print an index manifest; --verify checks files against it")
    p.add_argument("index", type=Path)
    p.add_argument("--verify", action="store_true",
                   help="quick check: sizes and sampled hashes of every corpus and index file")
    p.add_argument("--full", action="store_true", help="re-hash every corpus and index file")
    p.add_argument("--corpus-root", type=Path, help="directory holding the corpus files, if they moved since the build")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("serve", help="serve one or more shards of an index over gRPC",
                       description="Start a gRPC k-NN server for the given shards (default: all) of an index. "
                                   "Stops cleanly on SIGTERM/SIGINT.")
    add_server_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("serve-all", help="start one local server process per shard and print their addresses",
                       description="Start one shard server process per shard (each with these options), print the "
                                   "grpc:// address list for --model_args index=..., restart a server that dies, stop "
                                   "them all on Ctrl-C.")
    add_server_arguments(p, single=False)
    p.set_defaults(func=_cmd_serve_all)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"ttt-index: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
