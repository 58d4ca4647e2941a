"""Fan-out gRPC client: one persistent channel per server, exact global top-k.

``GrpcIndex`` has the same ``manifest`` / ``search`` / ``texts`` surface as the in-process
``LocalIndex``. Every server's manifest identity is checked at connect time and its shard
ranges must tile the index exactly. Queries go to all servers in parallel with a deadline,
transient failures are retried with backoff, and a server that stays down either fails the
call (``fail``, naming it) or is left out and recorded per query (``degrade``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import numpy as np

from ._proto import knn_pb2, knn_pb2_grpc
from .manifest import Manifest, ManifestMismatchError
from .search import SearchResult, merge_topk
from .server import DEFAULT_MAX_MESSAGE_BYTES, TOKEN_METADATA_KEY
from .wire import ID_DTYPE, VECTOR_DTYPE, pack, unpack

_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}


class ShardUnavailableError(RuntimeError):
    """A shard server could not answer; the message names it and says why."""


@dataclass(frozen=True)
class ClientConfig:
    addresses: tuple[str, ...]
    timeout_s: float = 30.0  # deadline of each call
    retries: int = 2  # extra attempts on transient errors
    backoff_s: float = 0.2  # first retry delay, doubled each time
    failure_policy: Literal["fail", "degrade"] = "fail"
    token: str | None = None
    tls_ca: Path | None = None  # PEM root certificate: enables TLS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    expected_identity: str | None = None

    def __post_init__(self):
        if self.failure_policy not in ("fail", "degrade"):
            raise ValueError(f"failure_policy must be 'fail' or 'degrade', got {self.failure_policy!r}")
        if not self.addresses:
            raise ValueError("no server addresses given")


def parse_addresses(spec: str) -> tuple[str, ...]:
    """``grpc://h:p+h:p`` (or with commas) -> ("h:p", "h:p").

    ``+`` is the separator to use inside ``--model_args``, which lm-eval splits on commas.
    """
    body = spec.removeprefix("grpc://").replace("+", ",")
    addresses = tuple(a.strip().removeprefix("grpc://") for a in body.split(",") if a.strip())
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad server address {a!r} in {spec!r}: expected host:port")
    return addresses


class _Server:
    """One channel and stub plus the shard ranges the server reported."""

    def __init__(self, address: str, config: ClientConfig):
        self.address = address
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if config.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(config.tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = knn_pb2_grpc.KnnShardStub(self.channel)
        self.info: knn_pb2.InfoResponse | None = None

    @property
    def label(self) -> str:
        shards = ",".join(str(s.index) for s in self.info.shards) if self.info else "?"
        return f"{self.address} (shards {shards})"


def _unavailable(server: _Server, method: str, error: grpc.RpcError) -> ShardUnavailableError:
    return ShardUnavailableError(f"shard server {server.label} failed {method}: {error.code().name}: {error.details()}")


class GrpcIndex:
    def __init__(self, config: ClientConfig):
        self.config = config
        self._metadata = ((TOKEN_METADATA_KEY, f"Bearer {config.token}"),) if config.token else ()
        self.servers = [_Server(a, config) for a in config.addresses]
        for server in self.servers:
            server.info = self._call(server, "Info", knn_pb2.InfoRequest())
        self.manifest = self._check_servers()

    def _check_servers(self) -> Manifest:
        first = self.servers[0]
        manifest = Manifest.from_json(first.info.manifest_json, source=first.address)
        expected = self.config.expected_identity or manifest.identity
        for server in self.servers:
            if server.info.index_identity != expected:
                ours = Manifest.from_json(server.info.manifest_json, source=server.address)
                raise ManifestMismatchError(
                    f"shard server {server.label} belongs to index {server.info.index_identity} "
                    f"(encoder {ours.encoder['name_or_path']}, {ours.n_vectors} vectors, corpus "
                    f"{[c.sha256[:12] for c in ours.corpus]}), expected index {expected} (encoder "
                    f"{manifest.encoder['name_or_path']}, {manifest.n_vectors} vectors, corpus "
                    f"{[c.sha256[:12] for c in manifest.corpus]})"
                )
        served = sorted((s.index, s.start, s.end) for server in self.servers for s in server.info.shards)
        wanted = sorted((s.index, s.start, s.end) for s in manifest.shards)
        if served != wanted:
            missing = sorted({w[0] for w in wanted} - {s[0] for s in served})
            raise ManifestMismatchError(
                f"servers {list(self.config.addresses)} do not cover the index exactly: missing shards {missing}, "
                f"served {[s[0] for s in served]}"
            )
        return manifest

    def _call(self, server: _Server, method: str, request):
        """Unary call with deadline and retries; raises ShardUnavailableError naming the server."""
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                return getattr(server.stub, method)(request, timeout=self.config.timeout_s, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() in _TRANSIENT and attempt < self.config.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise _unavailable(server, method, e) from e

    def _fan_out(self, method: str, requests: dict[int, object]) -> tuple[dict[int, object], dict[int, Exception]]:
        """Send requests[i] to servers[i] concurrently (gRPC futures), retrying transient errors."""
        answers, errors = {}, {}
        pending = {
            i: getattr(self.servers[i].stub, method).future(r, timeout=self.config.timeout_s, metadata=self._metadata)
            for i, r in requests.items()
        }
        for i, future in pending.items():
            try:
                answers[i] = future.result()
            except grpc.RpcError as e:
                if e.code() in _TRANSIENT and self.config.retries:
                    try:
                        answers[i] = self._call(self.servers[i], method, requests[i])
                    except ShardUnavailableError as retry_error:
                        errors[i] = retry_error
                else:
                    errors[i] = _unavailable(self.servers[i], method, e)
        return answers, errors

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        request = knn_pb2.SearchRequest(
            k=k, dim=queries.shape[1], vectors=pack(queries, VECTOR_DTYPE), index_identity=self.manifest.identity
        )
        answers, errors = self._fan_out("Search", {i: request for i in range(len(self.servers))})
        if errors and (self.config.failure_policy == "fail" or not answers):
            raise next(iter(errors.values()))
        parts = [
            (unpack(a.distances, VECTOR_DTYPE, a.k), unpack(a.ids, ID_DTYPE, a.k)) for a in answers.values()
        ]
        distances, ids = merge_topk(parts, k, self.manifest.metric)
        missing = sorted(s.index for i in errors for s in self.servers[i].info.shards)
        return SearchResult(ids=ids, distances=distances, missing_shards=[list(missing) for _ in range(len(ids))])

    def texts(self, ids: Sequence[int]) -> list[str]:
        """Texts for ids, each fetched from the server that owns it, in the given order."""
        owner_of = {}
        for server_idx, server in enumerate(self.servers):
            for s in server.info.shards:
                owner_of[s.index] = server_idx
        by_server: dict[int, list[int]] = {}
        for doc_id in ids:
            by_server.setdefault(owner_of[self.manifest.shard_of(int(doc_id)).index], []).append(int(doc_id))
        answers, errors = self._fan_out(
            "FetchTexts",
            {i: knn_pb2.FetchTextsRequest(ids=group, index_identity=self.manifest.identity) for i, group in by_server.items()},
        )
        if errors:
            raise next(iter(errors.values()))
        found = {doc_id: text for i, group in by_server.items() for doc_id, text in zip(group, answers[i].texts)}
        return [found[int(doc_id)] for doc_id in ids]

    def close(self) -> None:
        for server in self.servers:
            server.channel.close()
