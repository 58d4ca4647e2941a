"""gRPC shard server: serves one or more shards of an index.

A shard answers ids and distances only, texts are fetched for the final k, requests are
bounded (k, batch, ids, answer size) and checked *before* any work (a FetchTexts answer's
size is known from the document table before a byte of text is read), optional TLS and a
bearer token protect the port (compared in constant time; an empty token file is an error,
and a non-loopback address without a token needs ``--insecure``), and SIGTERM drains
in-flight requests before exit.

The servicer is ``KnnShardServicer``; ``serve()`` runs it until a signal.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import signal
import sys
import threading
import types
import typing
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ._proto import knn_pb2, knn_pb2_grpc
from .corpus import CorpusChangedError
from .manifest import Manifest
from .options import MAX_K, IndexOptions
from .search import (
    QueryError,
    SearchKnobs,
    ShardSearcher,
    check_queries,
    index_defaults,
    knobs_of,
    merge_topk,
    open_corpus,
    open_stored_vectors,
    owned_mask,
    vectors_from,
)
from .wire import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ID_DTYPE,
    MESSAGE_OVERHEAD,
    SERVICE_NAME,
    TOKEN_METADATA_KEY,
    VECTOR_DTYPE,
    pack,
    search_answer_bytes,
    unpack,
)


@dataclass(frozen=True)
class ServerConfig:
    index: Path
    shards: tuple[int, ...] | None = None  # None: every shard of the index
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (printed at start)
    max_k: int = MAX_K
    max_batch: int = 4096
    max_ids: int = 65536  # ids per FetchTexts / FetchVectors request
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    workers: int = 8
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False  # allow a non-loopback address without a token
    search: IndexOptions = field(default_factory=IndexOptions)  # nprobe, ef_search, refine_factor, corpus_root

    def __post_init__(self):
        if self.token is not None and not self.token.strip():
            raise ValueError("empty bearer token: it would turn authentication off")
        if not is_loopback(self.host) and self.token is None and not self.insecure:
            raise ValueError(f"refusing to serve on {self.host} without a token: anyone who can reach the port could "
                             f"read the corpus. Pass --token-file, or --insecure if the network is trusted")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        for name in ("max_k", "max_batch", "max_ids", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_message_bytes <= MESSAGE_OVERHEAD:
            raise ValueError(f"max_message_bytes must exceed {MESSAGE_OVERHEAD}, got {self.max_message_bytes}")

    def to_json(self) -> str:
        """Every field, so a server started from it (``launcher``) has this configuration whole;
        it holds the token, so it travels on a pipe, never on a command line."""
        return json.dumps(_plain(self))

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        return _typed(cls, json.loads(text))


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _typed(annotation, value):
    """``value`` (from ``_plain``) back as ``annotation``: dataclasses, paths, tuples, optionals."""
    if value is None:
        return None
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        return annotation(**{name: _typed(hints[name], v) for name, v in value.items()})
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        (member,) = (a for a in typing.get_args(annotation) if a is not type(None))
        return _typed(member, value)
    if origin is tuple:
        return tuple(_typed(typing.get_args(annotation)[0], v) for v in value)
    return Path(value) if annotation is Path else value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class KnnShardServicer(knn_pb2_grpc.KnnShardServicer):
    def __init__(self, config: ServerConfig):
        self.config = config
        self.manifest = Manifest.load(config.index)
        wanted = config.shards if config.shards is not None else range(len(self.manifest.shards))
        for i in wanted:
            if not 0 <= i < len(self.manifest.shards):
                raise ValueError(f"shard {i} does not exist; index has {len(self.manifest.shards)} shards")
        self.manifest.verify(config.index, shards=list(wanted), corpus_root=config.search.corpus_root)
        self.stored = open_stored_vectors(config.index, self.manifest)
        self.searchers = [ShardSearcher(config.index, self.manifest, self.manifest.shards[i], self.stored)
                          for i in wanted]
        self.corpus = open_corpus(config.index, self.manifest, config.search.corpus_root)
        self.defaults = knobs_of(config.search).over(index_defaults(self.manifest))

    def _check_identity(self, requested: str, context: grpc.ServicerContext) -> None:
        if requested and requested != self.manifest.identity:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"index identity mismatch: server holds {self.manifest.identity}, client expects {requested}",
            )

    def _check_ids(self, ids, context: grpc.ServicerContext) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) > self.config.max_ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"too many ids ({len(ids)}) in one request; "
                                                            f"at most {self.config.max_ids}")
        owned = owned_mask(self.searchers, ids)
        if not owned.all():
            context.abort(grpc.StatusCode.NOT_FOUND, f"ids not held by this server: {ids[~owned][:10].tolist()}")
        return ids

    def _check_answer_size(self, size: int, what: str, context: grpc.ServicerContext,
                           fewer: str = "ids") -> None:
        limit = self.config.max_message_bytes - MESSAGE_OVERHEAD
        if size > limit:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what} would take {size} bytes, over the {limit}-byte "
                                                              f"answer limit; ask for fewer {fewer} per request")

    def Search(self, request, context):
        self._check_identity(request.index_identity, context)
        try:
            if request.dim != self.manifest.dim:
                raise QueryError(f"query dimension {request.dim} != index dimension {self.manifest.dim}")
            queries = check_queries(unpack(request.vectors, VECTOR_DTYPE, self.manifest.dim), request.k,
                                    self.manifest.dim, self.config.max_k, self.config.max_batch)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e}")
        self._check_answer_size(search_answer_bytes(len(queries), request.k), "the search answer", context,
                                fewer="queries")
        knobs = SearchKnobs(request.nprobe or None, request.ef_search or None, request.refine_factor or None)
        knobs = knobs.over(self.defaults)
        distances, ids = merge_topk([s.search(queries, request.k, knobs) for s in self.searchers], request.k,
                                    self.manifest.metric)
        return knn_pb2.SearchResponse(
            n=len(queries), k=request.k, ids=pack(ids, ID_DTYPE), distances=pack(distances, VECTOR_DTYPE)
        )

    def FetchTexts(self, request, context):
        self._check_identity(request.index_identity, context)
        ids = self._check_ids(request.ids, context)
        self._check_answer_size(self.corpus.byte_length(ids), "the texts", context)
        try:
            texts = self.corpus.texts(ids)
        except CorpusChangedError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return knn_pb2.FetchTextsResponse(texts=texts)

    def FetchVectors(self, request, context):
        self._check_identity(request.index_identity, context)
        ids = self._check_ids(request.ids, context)
        self._check_answer_size(len(ids) * self.manifest.dim * VECTOR_DTYPE.itemsize, "the vectors", context)
        vectors, source = vectors_from(self.searchers, self.stored, ids)
        return knn_pb2.FetchVectorsResponse(dim=self.manifest.dim, source=source,
                                            vectors=pack(vectors, VECTOR_DTYPE) if vectors is not None else b"")

    def Info(self, request, context):
        return knn_pb2.InfoResponse(
            index_identity=self.manifest.identity,
            manifest_json=self.manifest.to_json(),
            shards=[knn_pb2.ShardRange(index=s.shard.index, start=s.shard.start,
                                       end=s.shard.end) for s in self.searchers],
            n_vectors=sum(s.shard.count for s in self.searchers),
            dim=self.manifest.dim,
            max_k=self.config.max_k,
            max_batch=self.config.max_batch,
            nprobe=self.defaults.nprobe or 0,
            ef_search=self.defaults.ef_search or 0,
            refine_factor=self.defaults.refine_factor or 0,
            max_message_bytes=self.config.max_message_bytes,
        )


class _TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks included);
    the comparison takes the same time whatever the wrong token shares with the right one."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get(TOKEN_METADATA_KEY, "")).encode()
        if not hmac.compare_digest(given, self._expected):
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
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=options,
                         interceptors=interceptors)
    knn_pb2_grpc.add_KnnShardServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        credentials = grpc.ssl_server_credentials([(Path(config.tls_key).read_bytes(),
                                                    Path(config.tls_cert).read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, servicer


def serve(config: ServerConfig, grace_s: float = 5.0) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests for ``grace_s``."""
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
