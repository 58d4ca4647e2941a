"""Fan-out gRPC client: one persistent channel per server, exact global top-k.

``GrpcIndex`` is a ``KnnIndex`` (``index.py``), with the in-process ``LocalIndex``'s surface.
Every server's manifest identity is checked and the live servers' shard ranges must tile
the index. Queries go to all servers in parallel with a deadline. Retries are gRPC's own
(the channel's service config): a call that fails UNAVAILABLE is retried with exponential
backoff within its deadline; a refusal (RESOURCE_EXHAUSTED, INVALID_ARGUMENT, a wrong
token) and a missed deadline are not.

Search settings (nprobe, efSearch, refine factor) are resolved at connect time (this client's,
else the servers' defaults) and travel with every request, so ``knobs`` is what every answer
used. Batches are split to fit the servers' batch and message limits. Failure policy ``fail``
raises, naming the server. ``degrade`` answers from the live servers and reports the missing
shards with every result (searches and text fetches alike); it starts even while some
servers are down, and a server that just failed is skipped at once, without a call or its
retries, until ``DEAD_COOLDOWN_S`` has passed, when one call (with the channel's retries)
probes it again (a server that comes back is checked before it is used).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from ._proto import knn_pb2, knn_pb2_grpc
from .manifest import Manifest, ManifestMismatchError
from .options import TOKEN_ENV, IndexOptions
from .search import SearchKnobs, SearchResult, check_queries, knobs_of, merge_topk
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

# A server that answers with these is down or too slow (degrade mode skips it); any other
# status is a refusal of the request itself and never degrades a result.
_TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
DEAD_COOLDOWN_S = 5.0
MAX_BACKOFF_S = 2.0


def service_config(options: IndexOptions) -> str:
    """The channel's gRPC service config: UNAVAILABLE retried ``options.retries`` times with
    exponential backoff from ``options.backoff_s`` (gRPC draws each delay at random up to
    the current backoff); nothing else is retried."""
    if not options.retries:
        return json.dumps({})
    policy = {"maxAttempts": options.retries + 1, "initialBackoff": f"{max(options.backoff_s, 1e-3):.3f}s",
              "maxBackoff": f"{max(MAX_BACKOFF_S, options.backoff_s):.3f}s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": policy}]})


class ShardUnavailableError(RuntimeError):
    """A shard server could not answer; the message names it and says why. ``code`` is the
    gRPC status (None when the server was skipped as known to be down)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code

    @property
    def transient(self) -> bool:
        return self.code is None or self.code in _TRANSIENT


def parse_addresses(spec: str) -> tuple[str, ...]:
    """``grpc://h:p+h:p`` (or with commas) -> ("h:p", "h:p").

    ``+`` is the separator to use inside ``--model_args``, which lm-eval splits on commas.
    """
    body = spec.removeprefix("grpc://").replace("+", ",")
    addresses = tuple(a.strip().removeprefix("grpc://") for a in body.split(",") if a.strip())
    if not addresses:
        raise ValueError(f"no server addresses in {spec!r}")
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad server address {a!r} in {spec!r}: expected host:port")
    return addresses


class _Server:
    """One channel and stub, the shard ranges the server reported, and whether it is down."""

    def __init__(self, address: str, options: IndexOptions):
        self.address = address
        channel_options = [
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Own connections per client: gRPC otherwise shares them process-wide, and a new
            # client would inherit another's backoff from a server that has since come back.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(options)),
            # retried requests are buffered whole: room for the largest message we send
            ("grpc.per_rpc_retry_buffer_size", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.retry_buffer_size", 4 * DEFAULT_MAX_MESSAGE_BYTES),
        ]
        if options.tls_ca:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(options.tls_ca).read_bytes())
            self.channel = grpc.secure_channel(address, creds, options=channel_options)
        else:
            self.channel = grpc.insecure_channel(address, options=channel_options)
        self.stub = knn_pb2_grpc.KnnShardStub(self.channel)
        self.info: knn_pb2.InfoResponse | None = None
        self.dead_until = 0.0

    @property
    def label(self) -> str:
        shards = ",".join(str(s.index) for s in self.info.shards) if self.info else "?"
        return f"{self.address} (shards {shards})"


def _describe(error: grpc.RpcError, token_sent: bool) -> str:
    if error.code() == grpc.StatusCode.UNAUTHENTICATED and not token_sent:
        return (f"UNAUTHENTICATED: the server requires a bearer token and none was sent (give the file holding it: "
                f"index_token_file=PATH in the model arguments, --token-file for ttt-index; or set ${TOKEN_ENV})")
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return f"UNAUTHENTICATED: the server refused the bearer token (check index_token_file / ${TOKEN_ENV})"
    return f"{error.code().name}: {error.details()}"


def _unavailable(server: _Server, method: str, error: grpc.RpcError, token_sent: bool) -> ShardUnavailableError:
    return ShardUnavailableError(f"shard server {server.label} failed {method}: {_describe(error, token_sent)}",
                                 error.code())


class GrpcIndex:
    def __init__(self, addresses: Sequence[str], options: IndexOptions = IndexOptions()):
        self.options = options
        token = options.token()
        self._metadata = ((TOKEN_METADATA_KEY, f"Bearer {token}"),) if token else ()
        self.servers = [_Server(a, options) for a in addresses]
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        errors = []
        for server in self.servers:
            try:
                server.info = self._call(server, "Info", knn_pb2.InfoRequest())
            except ShardUnavailableError as e:
                if self.options.failure_policy == "fail" or not e.transient:  # a refused token is no outage
                    raise
                errors.append(e)
        live = [s for s in self.servers if s.info is not None]
        if not live:
            raise errors[0]
        self.manifest = Manifest.from_json(live[0].info.manifest_json, source=live[0].address)
        for server in live:
            self._check_server(server)
        self._check_coverage()
        info = live[0].info  # what the servers apply where this client leaves a setting unset
        # Resolved once and sent with every search, so servers started with different
        # defaults still search alike and ``knobs`` is what every answer used.
        self.knobs = knobs_of(self.options).over(
            SearchKnobs(info.nprobe or None, info.ef_search or None, info.refine_factor or None))

    # -- connection state -----------------------------------------------------------------
    def _check_server(self, server: _Server) -> None:
        if server.info.index_identity != self.manifest.identity:
            ours = Manifest.from_json(server.info.manifest_json, source=server.address)
            raise ManifestMismatchError(
                f"shard server {server.label} belongs to index {server.info.index_identity} "
                f"(encoder {ours.encoder['name_or_path']}, {ours.n_vectors} vectors, corpus "
                f"{[c.sha256[:12] for c in ours.corpus]}), expected index {self.manifest.identity} (encoder "
                f"{self.manifest.encoder['name_or_path']}, {self.manifest.n_vectors} vectors, corpus "
                f"{[c.sha256[:12] for c in self.manifest.corpus]})"
            )

    def _check_coverage(self) -> None:
        served = sorted((s.index, s.start, s.end) for server in self.servers if server.info
                        for s in server.info.shards)
        wanted = sorted((s.index, s.start, s.end) for s in self.manifest.shards)
        if len(served) != len(set(served)) or not set(served) <= set(wanted):
            raise ManifestMismatchError(f"servers {[s.address for s in self.servers]} serve overlapping or unknown "
                                        f"shards {[s[0] for s in served]}")
        missing = sorted({w[0] for w in wanted} - {s[0] for s in served})
        if missing and not (self.options.failure_policy == "degrade" and any(s.info is None for s in self.servers)):
            raise ManifestMismatchError(
                f"servers {[s.address for s in self.servers]} do not cover the index exactly: missing shards "
                f"{missing}, "
                f"served {[s[0] for s in served]}"
            )

    def _missing_shards(self, failed: Sequence[int]) -> list[int]:
        """Shards not answered: those of failed servers, plus those no live server holds."""
        served = {s.index for i, server in enumerate(self.servers) if server.info and i not in failed
                  for s in server.info.shards}
        return sorted({s.index for s in self.manifest.shards} - served)

    def _usable(self, server: _Server) -> bool:
        """False for a server that failed within the cooldown (degrade mode: skip it now)."""
        if self.options.failure_policy == "fail" or server.dead_until <= time.monotonic():
            return True
        return False

    def _mark(self, server: _Server, ok: bool) -> None:
        server.dead_until = 0.0 if ok else time.monotonic() + DEAD_COOLDOWN_S

    # -- calls ----------------------------------------------------------------------------
    def _call(self, server: _Server, method: str, request):
        """Unary call with deadline (the channel retries UNAVAILABLE); raises
        ShardUnavailableError naming the server."""
        try:
            return getattr(server.stub, method)(request, timeout=self.options.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _unavailable(server, method, e, bool(self._metadata)) from e

    def _revive(self, server: _Server) -> bool:
        """A server that was down at connect time: fetch and check its Info before use."""
        if server.info is not None:
            return True
        try:
            server.info = self._call(server, "Info", knn_pb2.InfoRequest())
        except ShardUnavailableError as e:
            if not e.transient:
                raise
            self._mark(server, False)
            return False
        self._check_server(server)
        self._check_coverage()
        return True

    def _fan_out(self, method: str, requests: dict[int, object]) -> tuple[dict[int, object], dict[int, Exception]]:
        """Send requests[i] to servers[i] concurrently (gRPC futures, retried by the channel);
        servers known to be down (degrade mode) fail at once."""
        answers, errors, pending = {}, {}, {}
        for i, request in requests.items():
            server = self.servers[i]
            if not self._usable(server) or not self._revive(server):
                errors[i] = ShardUnavailableError(f"shard server {server.label} is down (failed within the last "
                                                  f"{DEAD_COOLDOWN_S:.0f} s)")
                continue
            pending[i] = getattr(server.stub, method).future(request, timeout=self.options.timeout_s,
                                                              metadata=self._metadata)
        for i, future in pending.items():
            server = self.servers[i]
            try:
                answers[i] = future.result()
            except grpc.RpcError as e:
                if e.code() not in _TRANSIENT:  # a refusal (bad request, too large, wrong token): never degraded
                    raise _unavailable(server, method, e, bool(self._metadata)) from e
                errors[i] = _unavailable(server, method, e, bool(self._metadata))
            self._mark(server, i in answers)
        if errors and (self.options.failure_policy == "fail" or not answers):
            raise next(iter(errors.values()))
        return answers, errors

    # -- the index surface ----------------------------------------------------------------
    def _limits(self) -> tuple[int, int, int]:
        """(max k, queries per request, message bytes) that every known server accepts; a
        server that was down at connect is asked first, so its limits count once it is back."""
        for server in self.servers:
            if server.info is None and self._usable(server):
                self._revive(server)
        infos = [server.info for server in self.servers if server.info is not None]
        max_k = min([self.options.max_k] + [i.max_k for i in infos])
        max_batch = min((i.max_batch for i in infos), default=1 << 30)
        message = min([DEFAULT_MAX_MESSAGE_BYTES] + [i.max_message_bytes for i in infos if i.max_message_bytes])
        return max_k, max_batch, message - MESSAGE_OVERHEAD

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Global top-k, in requests small enough for every server (batch and message limits)."""
        max_k, max_batch, payload = self._limits()
        queries = check_queries(queries, k, self.manifest.dim, max_k)
        if not len(queries):
            return SearchResult(ids=np.empty((0, k), ID_DTYPE), distances=np.empty((0, k), np.float32),
                                missing_shards=[])
        per_request = max(1, min(max_batch, payload // search_answer_bytes(1, k),
                                 payload // (self.manifest.dim * VECTOR_DTYPE.itemsize)))
        results = [self._search(queries[start : start + per_request], k)
                   for start in range(0, len(queries), per_request)]
        return SearchResult(ids=np.concatenate([r.ids for r in results]),
                            distances=np.concatenate([r.distances for r in results]),
                            missing_shards=[m for r in results for m in r.missing_shards])

    def _search(self, queries: np.ndarray, k: int) -> SearchResult:
        knobs = self.knobs
        request = knn_pb2.SearchRequest(
            k=k, dim=queries.shape[1], vectors=pack(queries, VECTOR_DTYPE), index_identity=self.manifest.identity,
            nprobe=knobs.nprobe or 0, ef_search=knobs.ef_search or 0, refine_factor=knobs.refine_factor or 0,
        )
        answers, errors = self._fan_out("Search", {i: request for i in range(len(self.servers))})
        parts = [(unpack(a.distances, VECTOR_DTYPE, a.k), unpack(a.ids, ID_DTYPE, a.k)) for a in answers.values()]
        distances, ids = merge_topk(parts, k, self.manifest.metric)
        missing = self._missing_shards(list(errors))
        return SearchResult(ids=ids, distances=distances, missing_shards=[list(missing) for _ in range(len(ids))])

    def _by_owner(self, ids: Sequence[int]) -> dict[int, list[int]]:
        """Ids grouped by the server owning them; ids whose shard no known server holds go to -1."""
        owner_of = {s.index: i for i, server in enumerate(self.servers) if server.info for s in server.info.shards}
        groups: dict[int, list[int]] = {}
        for doc_id in ids:
            shard = self.manifest.shard_of(int(doc_id)).index
            groups.setdefault(owner_of.get(shard, -1), []).append(int(doc_id))
        return groups

    def _fetch(self, method: str, ids: Sequence[int], make, unpack_answer) -> dict[int, object]:
        groups = self._by_owner(ids)
        unknown = groups.pop(-1, [])
        if unknown and self.options.failure_policy == "fail":
            raise ShardUnavailableError(f"no live server holds ids {unknown[:10]}")
        answers, _ = self._fan_out(method, {i: make(group) for i, group in groups.items()}) if groups else ({}, {})
        found = {}
        for i, answer in answers.items():
            found.update(zip(groups[i], unpack_answer(answer, len(groups[i]))))
        return found

    def texts(self, ids: Sequence[int]) -> list[str | None]:
        """Texts for ids in the given order, each from the server that owns it; in degrade
        mode None for ids whose shard is down."""
        found = self._fetch(
            "FetchTexts", ids, lambda group: knn_pb2.FetchTextsRequest(ids=group,
                                                                       index_identity=self.manifest.identity),
            lambda answer, n: list(answer.texts))
        return [found.get(int(doc_id)) for doc_id in ids]

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray | None, str]:
        """Vectors of ids (float32) and their source ("stored-f16", "exact"), or (None, "none")
        when a shard keeps only lossy codes or is down."""
        sources = set()

        def unpack_answer(answer, n):
            sources.add(answer.source)
            if answer.source == "none":
                return [None] * n
            return list(unpack(answer.vectors, VECTOR_DTYPE, answer.dim))

        found = self._fetch(
            "FetchVectors", ids,
            lambda group: knn_pb2.FetchVectorsRequest(ids=group, index_identity=self.manifest.identity), unpack_answer)
        rows = [found.get(int(doc_id)) for doc_id in ids]
        if "none" in sources or any(r is None for r in rows):
            return None, "none"
        return np.stack(rows).astype(np.float32), "stored-f16" if "stored-f16" in sources else "exact"

    def close(self) -> None:
        for server in self.servers:
            server.channel.close()
