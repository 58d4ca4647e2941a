"""``ttt-index``: write the default corpus, build, inspect and serve sharded indexes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .encoder import DEFAULT_ENCODER, EncoderConfig

DEFAULT_WORK_DIR = Path("work")


def _cmd_default_corpus(args: argparse.Namespace) -> None:
    from .default_corpus import write_default_corpus

    stats = write_default_corpus(args.out, progress=not args.quiet)
    for subset, s in stats.items():
        print(f"{subset}: {s.index} index documents, {s.test} held-out test documents"
              + (f", {len(s.skipped)} skipped (not UTF-8)" if s.skipped else ""))
    print(f"written under {args.out}")


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import BuildConfig, build_index

    manifest = build_index(
        BuildConfig(
            corpus=tuple(args.corpus),
            output=args.out,
            encoder=EncoderConfig(args.encoder, args.max_tokens, args.batch_size),
            factory=args.factory,
            metric=args.metric,
            shards=args.shards,
            train_size=args.train_size,
            overwrite=args.overwrite,
            device=args.device,
            progress=not args.quiet,
        )
    )
    print(f"index {manifest.identity}: {manifest.n_vectors} vectors x {manifest.dim} dims, "
          f"{len(manifest.shards)} shard(s) of {manifest.factory!r}, metric {manifest.metric}"
          + (f", {manifest.empty_documents} empty documents left out" if manifest.empty_documents else ""))
    print(f"written to {args.out}")


def _cmd_info(args: argparse.Namespace) -> None:
    from .manifest import Manifest

    manifest = Manifest.load(args.index)
    if args.verify or args.full:
        manifest.verify(args.index, full=args.full)
        print("verified: corpus and shard files match the manifest", file=sys.stderr)
    print(manifest.to_json())


def _cmd_serve(args: argparse.Namespace) -> None:
    from .server import ServerConfig, serve_forever

    serve_forever(ServerConfig.from_args(args))


def _cmd_serve_all(args: argparse.Namespace) -> None:
    from .launcher import serve_all

    serve_all(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ttt-index",
        description="Corpus store, sharded Faiss index build and gRPC k-NN shard servers for ttt-nn.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("default-corpus", help="write the bundled Pile-format corpus (CPython stdlib code + docs)",
                       description="Write stdlib_code.{index,test}.jsonl and python_docs.{index,test}.jsonl "
                                   "from the running Python installation, split ~90/10 by file.")
    p.add_argument("--out", type=Path, default=DEFAULT_WORK_DIR / "corpus", help="output directory (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_default_corpus)

    p = sub.add_parser("build", help="embed a JSONL corpus and write S Faiss shards plus a manifest",
                       description="Embed every document (first --max-tokens tokens, masked mean pooling) and write "
                                   "--shards Faiss shards built from an index_factory string.")
    p.add_argument("corpus", type=Path, nargs="+", help="Pile-format JSONL files ({\"text\": ..., \"meta\": ...} per line)")
    p.add_argument("--out", type=Path, required=True, help="index directory to create")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="HF encoder hub id or local path (default: %(default)s, bundled)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens of each document to embed (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per encoder batch (default: %(default)s)")
    p.add_argument("--factory", default="Flat", help="faiss index_factory string, e.g. Flat, IVF256,PQ16, HNSW32 (default: %(default)s)")
    p.add_argument("--metric", choices=("l2", "ip"), default="l2", help="distance (default: %(default)s)")
    p.add_argument("--shards", type=int, default=1, help="number of shards, contiguous id ranges (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=100_000, help="vectors sampled to train IVF/PQ (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for the encoder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("info", help="print an index manifest; --verify checks files against it")
    p.add_argument("index", type=Path)
    p.add_argument("--verify", action="store_true", help="quick check: corpus sizes and head/tail hashes, shard files present")
    p.add_argument("--full", action="store_true", help="re-hash every corpus and shard file")
    p.set_defaults(func=_cmd_info)

    from .server import add_server_arguments

    p = sub.add_parser("serve", help="serve one or more shards of an index over gRPC",
                       description="Start a gRPC k-NN server for the given shards (default: all) of an index. "
                                   "Stops cleanly on SIGTERM/SIGINT.")
    add_server_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("serve-all", help="start one local server process per shard and print their addresses",
                       description="Launch one `ttt-index serve` process per shard on consecutive ports, print the "
                                   "grpc:// address list for --model_args index=..., and stop them all on Ctrl-C.")
    add_server_arguments(p, single_shard=False)
    p.set_defaults(func=_cmd_serve_all)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"ttt-index: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
