"""gRPC shard server: serves one or more shards of an index.

Unlike the reference (pickled objects over ``multiprocessing.connection`` with a hard-coded
key, full texts of every local top-k sent back), a shard answers ids and distances only,
texts are fetched for the final k, requests are bounded (k, batch, message size) and
checked, optional TLS and a bearer token protect the port, and SIGTERM drains in-flight
requests before exit.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._proto import knn_pb2, knn_pb2_grpc
from .corpus import CorpusStore
from .manifest import Manifest
from .search import SearchParams, ShardSearcher, merge_topk, open_corpus
from .wire import ID_DTYPE, VECTOR_DTYPE, pack, unpack

SERVICE_NAME = "tttnn.knn.v1.KnnShard"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
TOKEN_METADATA_KEY = "authorization"


@dataclass(frozen=True)
class ServerConfig:
    index: Path
    shards: tuple[int, ...] | None = None  # None: every shard of the index
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (printed at start)
    max_k: int = 1024
    max_batch: int = 4096
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 8
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    params: SearchParams = SearchParams()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        return cls(
            index=args.index,
            shards=tuple(args.shards) if getattr(args, "shards", None) else None,
            host=args.host,
            port=args.port,
            max_k=args.max_k,
            max_batch=args.max_batch,
            max_message_bytes=args.max_message_mb << 20,
            workers=args.workers,
            token=_read_token(args.token_file),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            params=SearchParams(nprobe=args.nprobe, ef_search=args.ef_search),
        )


def _read_token(path: Path | None) -> str | None:
    return Path(path).read_text().strip() if path else None


class KnnShardServicer(knn_pb2_grpc.KnnShardServicer):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.manifest = Manifest.load(config.index)
        wanted = config.shards if config.shards is not None else range(len(self.manifest.shards))
        for i in wanted:
            if not 0 <= i < len(self.manifest.shards):
                raise ValueError(f"shard {i} does not exist; index has {len(self.manifest.shards)} shards")
        self.manifest.verify(config.index, shards=list(wanted))
        self.searchers = [ShardSearcher(config.index, self.manifest.shards[i], config.params) for i in wanted]
        self.corpus: CorpusStore = open_corpus(config.index, self.manifest)
        self._corpus_lock = threading.Lock()  # mmap handles are opened lazily

    def _owns(self, doc_id: int) -> bool:
        return any(s.shard.start <= doc_id < s.shard.end for s in self.searchers)

    def _check_identity(self, requested: str, context: grpc.ServicerContext) -> None:
        if requested and requested != self.manifest.identity:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"index identity mismatch: server holds {self.manifest.identity}, client expects {requested}",
            )

    def Search(self, request, context):
        self._check_identity(request.index_identity, context)
        dim = self.manifest.dim
        if request.dim != dim:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"query dimension {request.dim} != index dimension {dim}")
        if not 1 <= request.k <= self.config.max_k:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"k must be in [1, {self.config.max_k}], got {request.k}")
        try:
            queries = unpack(request.vectors, VECTOR_DTYPE, dim)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"vectors: {e}")
        if not 1 <= len(queries) <= self.config.max_batch:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch must hold 1 to {self.config.max_batch} query vectors, got {len(queries)}",
            )
        if not np.isfinite(queries).all():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "query vectors contain NaN or infinity")
        distances, ids = merge_topk([s.search(queries, request.k) for s in self.searchers], request.k, self.manifest.metric)
        return knn_pb2.SearchResponse(
            n=len(queries), k=request.k, ids=pack(ids, ID_DTYPE), distances=pack(distances, VECTOR_DTYPE)
        )

    def FetchTexts(self, request, context):
        self._check_identity(request.index_identity, context)
        if len(request.ids) > self.config.max_batch * self.config.max_k:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"too many ids ({len(request.ids)}) in one request")
        foreign = [i for i in request.ids if not self._owns(i)]
        if foreign:
            context.abort(grpc.StatusCode.NOT_FOUND, f"ids not held by this server: {foreign[:10]}")
        with self._corpus_lock:
            texts = self.corpus.texts(request.ids)
        return knn_pb2.FetchTextsResponse(texts=texts)

    def Info(self, request, context):
        return knn_pb2.InfoResponse(
            index_identity=self.manifest.identity,
            manifest_json=self.manifest.to_json(),
            shards=[knn_pb2.ShardRange(index=s.shard.index, start=s.shard.start, end=s.shard.end) for s in self.searchers],
            n_vectors=sum(s.shard.count for s in self.searchers),
            dim=self.manifest.dim,
            max_k=self.config.max_k,
            max_batch=self.config.max_batch,
        )


class _TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks included)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if metadata.get(TOKEN_METADATA_KEY) != self._expected:
            return self._deny
        return continuation(handler_call_details)


def start_server(config: ServerConfig) -> tuple[grpc.Server, int, KnnShardServicer]:
    """Start serving in background threads; returns (server, bound port, servicer)."""
    servicer = KnnShardServicer(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    interceptors = [_TokenInterceptor(config.token)] if config.token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=options, interceptors=interceptors)
    knn_pb2_grpc.add_KnnShardServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert or config.tls_key:
        if not (config.tls_cert and config.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer


def serve_forever(config: ServerConfig, grace_s: float = 5.0) -> None:
    server, port, servicer = start_server(config)
    shards = ",".join(str(s.shard.index) for s in servicer.searchers)
    # One parseable line: launchers and tests read the bound port from it.
    print(f"serving index {servicer.manifest.identity} shards [{shards}] on {config.host}:{port}", flush=True)
    stopped = threading.Event()

    def stop(signum, frame):
        print(f"signal {signum}: draining in-flight requests ({grace_s:.0f}s grace)", file=sys.stderr, flush=True)
        server.stop(grace_s).wait()
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopped.wait()


def add_server_arguments(p: argparse.ArgumentParser, single_shard: bool = True) -> None:
    p.add_argument("index", type=Path, help="index directory written by `ttt-index build`")
    if single_shard:
        p.add_argument("--shards", type=int, nargs="+", help="shard numbers to serve (default: all)")
        p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default: %(default)s)")
    else:
        p.add_argument("--base-port", type=int, default=50051, help="port of shard 0; shard i gets base+i; 0 picks free ports (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s, loopback only)")
    p.add_argument("--max-k", type=int, default=1024, help="largest k accepted (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=4096, help="most query vectors per request (default: %(default)s)")
    p.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit in MiB (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="request handler threads (default: %(default)s)")
    p.add_argument("--nprobe", type=int, help="IVF lists probed per query")
    p.add_argument("--ef-search", type=int, help="HNSW efSearch")
    p.add_argument("--token-file", type=Path, help="file holding a bearer token clients must send")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
