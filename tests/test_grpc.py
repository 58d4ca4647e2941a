import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import BIN, build_small, make_cert

from index_server._proto import knn_pb2, knn_pb2_grpc
from index_server.client import GrpcIndex, ShardUnavailableError, parse_addresses
from index_server.index import open_index
from index_server.launcher import start_shard_server
from index_server.manifest import Manifest, ManifestMismatchError
from index_server.options import IndexOptions
from index_server.search import LocalIndex, QueryError
from index_server.server import ServerConfig, start_server


@pytest.fixture(scope="module")
def sharded(small_corpus, tmp_path_factory) -> Path:
    return build_small(small_corpus, tmp_path_factory.mktemp("grpc") / "idx4", shards=4)


@pytest.fixture(scope="module")
def queries(sharded):
    rng = np.random.default_rng(0)
    return rng.standard_normal((16, LocalIndex(sharded).manifest.dim)).astype(np.float32)


def start(index: Path, shards=None, **kw):
    server, port, _ = start_server(ServerConfig(index=index, shards=shards, **kw))
    return server, f"127.0.0.1:{port}"


def spec(*addresses: str) -> str:
    return "grpc://" + "+".join(addresses)


@pytest.mark.parametrize("layout", ["one server, all shards", "one server per shard"])
def test_grpc_equals_in_process_exactly(sharded, queries, layout):
    local = LocalIndex(sharded)
    servers = [start(sharded)] if layout.startswith("one server,") else [start(sharded, (i,)) for i in range(4)]
    client = open_index(spec(*(a for _, a in servers)))
    try:
        for k in (1, 7, 40):
            want, got = local.search(queries, k), client.search(queries, k)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.distances, want.distances)
            assert got.missing_shards == [[]] * len(queries)
        ids = want.ids[:3].ravel()
        assert client.texts(ids) == local.texts(ids)
        (remote_vectors, source), (local_vectors, _) = client.vectors(ids), local.vectors(ids)
        assert source == "exact"
        np.testing.assert_array_equal(remote_vectors, local_vectors)
    finally:
        client.close()
        for server, _ in servers:
            server.stop(0)


def test_bad_requests_get_readable_status_and_server_keeps_serving(sharded, queries):
    server, address = start(sharded, max_k=50, max_batch=8, max_message_bytes=128 << 10)
    stub = knn_pb2_grpc.KnnShardStub(grpc.insecure_channel(address))
    dim = queries.shape[1]

    def search(vectors, k, d=dim):
        return stub.Search(knn_pb2.SearchRequest(k=k, dim=d, vectors=np.asarray(vectors, "<f4").tobytes()), timeout=10)

    big = int(np.argmax(np.load(sharded / "docs.npy")["length"]))  # the largest document, repeated
    cases = [
        (lambda: search(queries[:1], 0), grpc.StatusCode.INVALID_ARGUMENT, r"k must be in \[1, 50\], got 0"),
        (lambda: search(queries[:1], 51), grpc.StatusCode.INVALID_ARGUMENT, r"k must be in \[1, 50\], got 51"),
        (lambda: search(queries[:1, :10], 5, d=10), grpc.StatusCode.INVALID_ARGUMENT,
         r"query dimension 10 != index dimension"),
        (lambda: search(queries[:0], 5), grpc.StatusCode.INVALID_ARGUMENT,
         r"batch must hold 1 to 8 query vectors, got 0"),
        (lambda: search(queries[:9], 5), grpc.StatusCode.INVALID_ARGUMENT, r"got 9"),
        (lambda: search(queries[:1] * np.nan, 5), grpc.StatusCode.INVALID_ARGUMENT, r"NaN or infinity"),
        (lambda: search(np.zeros((400, dim)), 5), grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger than max"),
        (lambda: stub.FetchTexts(knn_pb2.FetchTextsRequest(ids=[10**9])), grpc.StatusCode.NOT_FOUND,
         r"not held by this server"),
        (lambda: stub.FetchTexts(knn_pb2.FetchTextsRequest(ids=[big] * 2000)), grpc.StatusCode.RESOURCE_EXHAUSTED,
         r"the texts would take \d+ bytes, over the"),
        (lambda: stub.Search(knn_pb2.SearchRequest(k=1, dim=dim, vectors=b"abc")), grpc.StatusCode.INVALID_ARGUMENT,
         r"not a whole number"),
    ]
    try:
        for call, code, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == code
            assert re.search(message, err.value.details()), err.value.details()
            assert len(np.frombuffer(search(queries[:2], 3).ids, "<i8")) == 6  # still serving
    finally:
        server.stop(0)


def test_fetch_texts_size_is_checked_before_reading(sharded, monkeypatch):
    """An 8-byte request must not make the server read and buffer hundreds of MB of texts."""
    from index_server.corpus import CorpusStore

    read = []
    monkeypatch.setattr(CorpusStore, "texts", lambda self, ids: read.append(len(ids)) or [""] * len(ids))
    server, address = start(sharded, max_message_bytes=128 << 10)
    stub = knn_pb2_grpc.KnnShardStub(grpc.insecure_channel(address))
    big = int(np.argmax(np.load(sharded / "docs.npy")["length"]))
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchTexts(knn_pb2.FetchTextsRequest(ids=[big] * 2000), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and read == []
    finally:
        server.stop(0)


@pytest.fixture
def search_calls(monkeypatch):
    """Counts the Search calls servers in this process receive; ``fail[0]`` more of them are
    answered with ``fail[1]`` (an outage, or a refusal) before the real answer."""
    from index_server.server import KnnShardServicer

    calls, fail = [], [0, grpc.StatusCode.UNAVAILABLE]
    search = KnnShardServicer.Search

    def counted(self, request, context):
        calls.append(time.perf_counter())
        if len(calls) <= fail[0]:
            context.abort(fail[1], "injected failure")
        return search(self, request, context)

    monkeypatch.setattr(KnnShardServicer, "Search", counted)
    return calls, fail


def test_unavailable_is_retried_with_backoff_by_the_channel(sharded, queries, search_calls):
    calls, fail = search_calls
    server, address = start(sharded)
    try:
        fail[0] = 2
        client = GrpcIndex((address,), IndexOptions(retries=2, backoff_s=0.05))
        assert client.search(queries[:1], 3).ids.shape == (1, 3)  # two outages, then the answer
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(ShardUnavailableError, match="UNAVAILABLE: injected failure"):
            GrpcIndex((address,), IndexOptions(retries=1, backoff_s=0.05)).search(queries[:1], 3)
        assert len(calls) == 2  # retries=1: one more attempt, then the error
    finally:
        server.stop(0)


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT])
def test_refusals_are_not_retried(sharded, queries, search_calls, code):
    calls, fail = search_calls
    server, address = start(sharded, max_k=10)
    client = GrpcIndex((address,), IndexOptions(retries=3, backoff_s=0.5))
    start_time = time.perf_counter()
    try:
        with pytest.raises(QueryError, match=r"k must be in \[1, 10\]"):
            client.search(queries[:1], 11)  # the client knows the server's limit: refused before any call
        assert calls == []
        with pytest.raises(ShardUnavailableError, match="INVALID_ARGUMENT"):
            client._search(queries[:1], 11)  # the server refuses it too, once
        assert len(calls) == 1
        fail[:] = [2, code]
        with pytest.raises(ShardUnavailableError, match=code.name):
            client.search(queries[:1], 3)
        assert len(calls) == 2 and time.perf_counter() - start_time < 0.5  # no retry, no backoff
    finally:
        server.stop(0)


def test_token_is_required_when_configured_and_an_empty_token_is_an_error(sharded, queries, tmp_path):
    from index_server.server import _TokenInterceptor

    server, address = start(sharded, token="s3cret")
    token = tmp_path / "token"
    try:
        with pytest.raises(ShardUnavailableError, match="UNAUTHENTICATED: the server requires a bearer token and none"):
            GrpcIndex((address,), IndexOptions(retries=0))
        token.write_text("wrong\n")
        with pytest.raises(ShardUnavailableError, match="UNAUTHENTICATED: the server refused the bearer token"):
            GrpcIndex((address,), IndexOptions(retries=0, token_file=token))
        token.write_text("s3cret\n")
        client = GrpcIndex((address,), IndexOptions(token_file=token))
        assert client.search(queries[:1], 3).ids.shape == (1, 3)
    finally:
        server.stop(0)
    for content in ("", "  \n"):
        token.write_text(content)
        with pytest.raises(ValueError, match="token file is empty"):
            IndexOptions(token_file=token).token()
        proc = subprocess.run([str(BIN / "ttt-index"), "serve", str(sharded), "--token-file", str(token)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "token file is empty" in proc.stderr
    with pytest.raises(ValueError, match="empty bearer token"):
        ServerConfig(index=sharded, token="")
    assert "compare_digest" in _TokenInterceptor.intercept_service.__code__.co_names  # constant-time comparison


def test_non_loopback_without_a_token_needs_insecure(sharded):
    proc = subprocess.run([str(BIN / "ttt-index"), "serve", str(sharded), "--host", "0.0.0.0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "refusing to serve on 0.0.0.0 without a token" in proc.stderr
    server, _ = start(sharded, host="0.0.0.0", insecure=True)
    server.stop(0)


def test_shard_from_another_index_is_refused(sharded, small_corpus, tmp_path):
    other = build_small(small_corpus, tmp_path / "other", shards=4, max_tokens=16)  # other encoder setting
    (s0, a0), (s1, a1) = start(sharded, (0, 1, 2)), start(other, (3,))
    try:
        with pytest.raises(ManifestMismatchError, match=rf"shard server {re.escape(a1)} \(shards 3\) belongs to index"):
            GrpcIndex((a0, a1))
        with pytest.raises(ManifestMismatchError, match=r"missing shards \[3\]"):
            GrpcIndex((a0,))
    finally:
        s0.stop(0)
        s1.stop(0)


def test_killed_shard_fail_and_degrade_then_recovery(sharded, queries):
    procs = [start_shard_server(ServerConfig(sharded, shards=(i,))) for i in range(4)]
    addresses = tuple(p.address for p in procs)
    local = LocalIndex(sharded)
    try:
        fail = GrpcIndex(addresses, IndexOptions(retries=1, backoff_s=0.05, timeout_s=5))
        degrade = GrpcIndex(addresses, IndexOptions(retries=1, backoff_s=0.05, timeout_s=5, failure_policy="degrade"))
        procs[2].process.kill()
        procs[2].process.wait()
        with pytest.raises(ShardUnavailableError,
                           match=rf"shard server {re.escape(addresses[2])} \(shards 2\) failed Search: UNAVAILABLE"):
            fail.search(queries, 5)
        partial = degrade.search(queries, 5)
        assert partial.missing_shards == [[2]] * len(queries)
        shard2 = local.manifest.shards[2]
        assert not ((partial.ids >= shard2.start) & (partial.ids < shard2.end)).any()
        texts = degrade.texts([shard2.start, 0])  # texts on the dead shard degrade too
        assert texts[0] is None and texts[1] == local.texts([0])[0]
        t = time.perf_counter()
        degrade.search(queries, 5)  # the shard is known dead: no retry backoff
        assert time.perf_counter() - t < 0.3
        with pytest.raises(ShardUnavailableError, match="UNAVAILABLE"):  # a degrade client starts with a shard down
            GrpcIndex(addresses, IndexOptions(retries=0, timeout_s=2))
        late = GrpcIndex(addresses, IndexOptions(retries=0, timeout_s=2, failure_policy="degrade"))
        assert late.search(queries, 5).missing_shards == [[2]] * len(queries)
        procs[2] = start_shard_server(ServerConfig(sharded, shards=(2,),
                                                   port=procs[2].port))  # restart on the same port
        deadline = time.time() + 20
        while True:
            try:
                full = fail.search(queries, 5)
                break
            except ShardUnavailableError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        np.testing.assert_array_equal(full.ids, local.search(queries, 5).ids)
        time.sleep(5.2)  # past the dead-server cooldown: the degrade clients probe it again
        assert degrade.search(queries, 5).missing_shards == [[]] * len(queries)
        np.testing.assert_array_equal(late.search(queries, 5).ids, full.ids)  # checked, then used
    finally:
        assert [p.stop() for p in procs] == [0] * 4  # clean shutdown on SIGTERM


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_serve_all_restarts_a_dead_shard_and_its_children_die_with_it(sharded, queries):
    """Its servers get every server option (here: limits and the search default)."""
    proc = subprocess.Popen([str(BIN / "ttt-index"), "serve-all", str(sharded), "--base-port", "0", "--max-k", "33",
                             "--max-batch", "7", "--workers", "3", "--refine-factor", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        assert lines[-1].startswith("index=grpc://"), lines
        client = open_index(lines[-1].strip().removeprefix("index="), IndexOptions(failure_policy="degrade",
                                                                                    retries=0, timeout_s=2))
        infos = [server.info for server in client.servers]
        assert [(i.max_k, i.max_batch, i.refine_factor) for i in infos] == [(33, 7, 2)] * 4
        np.testing.assert_array_equal(client.search(queries, 4).ids, LocalIndex(sharded).search(queries, 4).ids)
        children = _children(proc.pid)
        assert len(children) == 4
        os.kill(children[1], signal.SIGKILL)  # one shard dies: the others keep serving, it comes back
        assert "restarting on port" in proc.stderr.readline()
        assert proc.stdout.readline().startswith("serving index")
        deadline = time.time() + 20
        while client.search(queries, 4).missing_shards != [[]] * len(queries):
            assert time.time() < deadline
            time.sleep(0.5)
        children = _children(proc.pid)
        proc.kill()  # SIGKILL: no chance to clean up, the kernel tells the children
        proc.wait()
        deadline = time.time() + 10
        while any(map(_alive, children)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, children))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_all_stops_its_children_on_sigterm(sharded):
    proc = subprocess.Popen([str(BIN / "ttt-index"), "serve-all", str(sharded), "--base-port", "0"],
                            stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(5)]
    assert lines[-1].startswith("index=grpc://")
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    assert not any(map(_alive, children))
    assert parse_addresses(lines[-1].strip().removeprefix("index=")) == tuple(
        line.rsplit(" ", 1)[-1].strip() for line in lines[:4])


def test_a_server_configuration_reaches_its_process_whole():
    """serve-all and start_shard_server hand a child its ServerConfig as JSON: every field,
    including one added later, arrives with the value set here (none is the default)."""
    import dataclasses
    import typing

    from index_server.server import ServerConfig

    def changed(annotation, default):
        if dataclasses.is_dataclass(annotation):
            hints = typing.get_type_hints(annotation)
            return annotation(**{f.name: changed(hints[f.name], getattr(default, f.name))
                                 for f in dataclasses.fields(annotation)})
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, __import__("types").UnionType):
            member = next(a for a in typing.get_args(annotation) if a is not type(None))
            return changed(member, default)
        if origin is typing.Literal:
            return next(v for v in typing.get_args(annotation) if v != default)
        if origin is tuple:
            return (3, 1)
        return {bool: lambda: not default, int: lambda: (default or 0) + 1, float: lambda: (default or 0.0) + 1.5,
                str: lambda: f"{default}-x", Path: lambda: Path("/elsewhere")}[annotation]()

    defaults = ServerConfig(index=Path("/index"))
    hints = typing.get_type_hints(ServerConfig)
    config = ServerConfig(**{f.name: changed(hints[f.name], getattr(defaults, f.name))
                             for f in dataclasses.fields(ServerConfig)} | {"host": "127.0.0.2", "insecure": True})
    for f in dataclasses.fields(ServerConfig):
        if f.name not in ("host", "insecure"):
            assert getattr(config, f.name) != getattr(defaults, f.name), f.name
    assert ServerConfig.from_json(config.to_json()) == config


def test_checked_in_stubs_match_the_proto(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iindex_server/_proto=proto",
                    f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "proto/knn.proto"], cwd=repo, check=True)
    for name in ("knn_pb2.py", "knn_pb2_grpc.py", "knn_pb2.pyi"):
        fresh, checked_in = tmp_path / "index_server/_proto" / name, repo / "index_server/_proto" / name
        assert fresh.read_bytes() == checked_in.read_bytes()


def test_tls_and_health_check(sharded, queries, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cert, key = make_cert(tmp_path)
    server, address = start(sharded, tls_cert=cert, tls_key=key)
    try:
        client = GrpcIndex((address,), IndexOptions(tls_ca=cert))
        np.testing.assert_array_equal(client.search(queries, 3).ids, LocalIndex(sharded).search(queries, 3).ids)
        with pytest.raises(ShardUnavailableError, match="UNAVAILABLE"):  # plaintext client refused
            GrpcIndex((address,), IndexOptions(retries=0, timeout_s=3))
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(cert.read_bytes()))
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tttnn.knn.v1.KnnShard"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


def test_token_from_the_environment_and_refusals_are_not_outages(sharded, queries, monkeypatch):
    server, address = start(sharded, token="env-secret")
    try:
        monkeypatch.setenv("TTT_NN_INDEX_TOKEN", "env-secret")
        assert GrpcIndex((address,)).search(queries[:1], 3).ids.shape == (1, 3)
        monkeypatch.setenv("TTT_NN_INDEX_TOKEN", "wrong")
        with pytest.raises(ShardUnavailableError, match="refused the bearer token"):  # even under degrade
            GrpcIndex((address,), IndexOptions(failure_policy="degrade", retries=0))
        monkeypatch.setenv("TTT_NN_INDEX_TOKEN", " ")
        with pytest.raises(ValueError, match="is set but empty"):
            GrpcIndex((address,))
    finally:
        server.stop(0)


def test_an_answer_too_large_is_refused_once_not_retried(sharded):
    server, address = start(sharded, max_message_bytes=128 << 10)
    client = GrpcIndex((address,), IndexOptions(retries=3, backoff_s=0.5, failure_policy="degrade"))
    big = int(np.argmax(np.load(sharded / "docs.npy")["length"]))
    start_time = time.perf_counter()
    try:
        with pytest.raises(ShardUnavailableError, match="RESOURCE_EXHAUSTED"):
            client.texts([big] * 2000)
        assert time.perf_counter() - start_time < 0.5  # no retry backoff; and no "degraded" answer
    finally:
        server.stop(0)


def test_search_settings_travel_with_each_request(small_corpus, tmp_path):
    """nprobe from the client (index_nprobe) reaches the server per request: the gRPC answer
    equals the in-process index with the same setting, and another setting gives another."""
    ivf = build_small(small_corpus, tmp_path / "ivf", shards=2, factory="IVF32,Flat")
    assert Manifest.load(ivf).layout["nprobe"] == 1  # 32 lists / 32
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((20, Manifest.load(ivf).dim)).astype(np.float32)
    server, address = start(ivf)  # the server's own default: the index's nprobe
    try:
        answers = {}
        for nprobe in (1, 32):
            remote = GrpcIndex((address,), IndexOptions(nprobe=nprobe))
            local = LocalIndex(ivf, IndexOptions(nprobe=nprobe))
            answers[nprobe] = remote.search(queries, 10).ids
            np.testing.assert_array_equal(answers[nprobe], local.search(queries, 10).ids)
            assert remote.knobs.nprobe == local.knobs.nprobe == nprobe
        assert not np.array_equal(answers[1], answers[32])
        assert GrpcIndex((address,)).knobs.nprobe == 1  # unset: the server says what it applies
    finally:
        server.stop(0)


def test_client_splits_searches_to_fit_every_servers_limits(sharded, queries):
    """One Search with every query would be refused by a server with a small max_batch or
    message limit: the client splits by the smallest limit any server reports."""
    from index_server.wire import MESSAGE_OVERHEAD

    local = LocalIndex(sharded)
    k = 100  # 1200 answer bytes per query
    for limits in ({"max_batch": 3}, {"max_message_bytes": MESSAGE_OVERHEAD + 5000}):
        servers = [start(sharded, (0, 1), **limits), start(sharded, (2, 3))]
        client = open_index(spec(*(a for _, a in servers)))
        try:
            got, want = client.search(queries, k), local.search(queries, k)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.distances, want.distances)
        finally:
            client.close()
            for server, _ in servers:
                server.stop(0)


def test_a_server_back_after_connect_has_its_limits_respected(sharded, queries):
    """Limits came only from servers up at connect: one that came back later with a small
    max_batch was sent every query at once and refused the search."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = start(sharded, (0, 1))
    client = GrpcIndex((first[1], f"127.0.0.1:{port}"), IndexOptions(failure_policy="degrade", retries=0))
    servers = [first]
    try:
        servers.append(start(sharded, (2, 3), max_batch=3, port=port))
        grpc.channel_ready_future(client.servers[1].channel).result(timeout=10)  # past the reconnect backoff
        got, want = client.search(queries, 10), LocalIndex(sharded).search(queries, 10)
        np.testing.assert_array_equal(got.ids, want.ids)
        assert got.missing_shards == [[]] * len(queries)
    finally:
        client.close()
        for server, _ in servers:
            server.stop(0)


def test_search_answer_over_the_message_limit_is_refused_before_searching(sharded, queries):
    from index_server.wire import MESSAGE_OVERHEAD

    server, address = start(sharded, max_message_bytes=MESSAGE_OVERHEAD + 5000)
    stub = knn_pb2_grpc.KnnShardStub(grpc.insecure_channel(address))
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub.Search(knn_pb2.SearchRequest(k=500, dim=queries.shape[1], vectors=queries[:1].tobytes()), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "ask for fewer queries" in err.value.details()
        info = stub.Info(knn_pb2.InfoRequest(), timeout=10)
        assert info.max_message_bytes == MESSAGE_OVERHEAD + 5000
    finally:
        server.stop(0)


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_k": 0}, {"workers": 0}, {"max_message_bytes": 1000}])
def test_server_limits_below_one_are_refused(sharded, bad):
    with pytest.raises(ValueError, match="must"):
        ServerConfig(index=sharded, **bad)
