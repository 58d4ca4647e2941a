import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import BIN, build_small
from index_server._proto import knn_pb2, knn_pb2_grpc
from index_server.client import ClientConfig, GrpcIndex, ShardUnavailableError
from index_server.manifest import ManifestMismatchError
from index_server.search import LocalIndex
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


@pytest.mark.parametrize("layout", ["one server, all shards", "one server per shard"])
def test_grpc_equals_in_process_exactly(sharded, queries, layout):
    local = LocalIndex(sharded)
    servers = [start(sharded)] if layout.startswith("one server,") else [start(sharded, (i,)) for i in range(4)]
    client = GrpcIndex(ClientConfig(tuple(a for _, a in servers)))
    try:
        for k in (1, 7, 40):
            want, got = local.search(queries, k), client.search(queries, k)
            np.testing.assert_array_equal(got.ids, want.ids)
            np.testing.assert_array_equal(got.distances, want.distances)
            assert got.missing_shards == [[]] * len(queries)
        ids = want.ids[:3].ravel()
        assert client.texts(ids) == local.texts(ids)
    finally:
        client.close()
        for server, _ in servers:
            server.stop(0)


def test_bad_requests_get_readable_status_and_server_keeps_serving(sharded, queries):
    server, address = start(sharded, max_k=50, max_batch=8, max_message_bytes=64 << 10)
    stub = knn_pb2_grpc.KnnShardStub(grpc.insecure_channel(address))
    dim = queries.shape[1]

    def search(vectors, k, d=dim):
        return stub.Search(knn_pb2.SearchRequest(k=k, dim=d, vectors=np.asarray(vectors, "<f4").tobytes()), timeout=10)

    cases = [
        (lambda: search(queries[:1], 0), grpc.StatusCode.INVALID_ARGUMENT, r"k must be in \[1, 50\], got 0"),
        (lambda: search(queries[:1], 51), grpc.StatusCode.INVALID_ARGUMENT, r"k must be in \[1, 50\], got 51"),
        (lambda: search(queries[:1, :10], 5, d=10), grpc.StatusCode.INVALID_ARGUMENT, r"query dimension 10 != index dimension"),
        (lambda: search(queries[:0], 5), grpc.StatusCode.INVALID_ARGUMENT, r"batch must hold 1 to 8 query vectors, got 0"),
        (lambda: search(queries[:9], 5), grpc.StatusCode.INVALID_ARGUMENT, r"got 9"),
        (lambda: search(np.zeros((80, dim)), 5), grpc.StatusCode.RESOURCE_EXHAUSTED, r"larger than max"),
        (lambda: stub.FetchTexts(knn_pb2.FetchTextsRequest(ids=[10**9])), grpc.StatusCode.NOT_FOUND, r"not held by this server"),
        (lambda: stub.Search(knn_pb2.SearchRequest(k=1, dim=dim, vectors=b"abc")), grpc.StatusCode.INVALID_ARGUMENT, r"not a whole number"),
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


def test_token_is_required_when_configured(sharded, queries, tmp_path):
    server, address = start(sharded, token="s3cret")
    try:
        with pytest.raises(ShardUnavailableError, match="UNAUTHENTICATED"):
            GrpcIndex(ClientConfig((address,), retries=0))
        client = GrpcIndex(ClientConfig((address,), token="s3cret"))
        assert client.search(queries[:1], 3).ids.shape == (1, 3)
    finally:
        server.stop(0)


def test_shard_from_another_index_is_refused(sharded, small_corpus, tmp_path):
    other = build_small(small_corpus, tmp_path / "other", shards=4, max_tokens=16)  # other encoder setting
    (s0, a0), (s1, a1) = start(sharded, (0, 1, 2)), start(other, (3,))
    try:
        with pytest.raises(ManifestMismatchError, match=rf"shard server {re.escape(a1)} \(shards 3\) belongs to index"):
            GrpcIndex(ClientConfig((a0, a1)))
        with pytest.raises(ManifestMismatchError, match=r"missing shards \[3\]"):
            GrpcIndex(ClientConfig((a0,)))
    finally:
        s0.stop(0)
        s1.stop(0)


def _serve(index: Path, shard: int, port: int = 0) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([str(BIN / "ttt-index"), "serve", str(index), "--shards", str(shard), "--port", str(port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving"), line
    return proc, line.rsplit(" ", 1)[-1].strip()


def test_killed_shard_fail_and_degrade_then_recovery(sharded, queries):
    procs = [_serve(sharded, i) for i in range(4)]
    addresses = tuple(a for _, a in procs)
    local = LocalIndex(sharded)
    try:
        fail = GrpcIndex(ClientConfig(addresses, retries=1, backoff_s=0.05, timeout_s=5))
        degrade = GrpcIndex(ClientConfig(addresses, retries=1, backoff_s=0.05, timeout_s=5, failure_policy="degrade"))
        procs[2][0].kill()
        procs[2][0].wait()
        with pytest.raises(ShardUnavailableError, match=rf"shard server {re.escape(addresses[2])} \(shards 2\) failed Search: UNAVAILABLE"):
            fail.search(queries, 5)
        partial = degrade.search(queries, 5)
        assert partial.missing_shards == [[2]] * len(queries)
        shard2 = local.manifest.shards[2]
        assert not ((partial.ids >= shard2.start) & (partial.ids < shard2.end)).any()
        procs[2] = _serve(sharded, 2, port=int(addresses[2].rsplit(":", 1)[1]))  # restart on the same port
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
        assert degrade.search(queries, 5).missing_shards == [[]] * len(queries)
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            assert proc.wait(timeout=15) == 0  # clean shutdown on SIGTERM


def test_serve_all_prints_a_working_address_list(sharded, queries):
    proc = subprocess.Popen([str(BIN / "ttt-index"), "serve-all", str(sharded), "--base-port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        spec = lines[-1].strip()
        assert spec.startswith("index=grpc://"), lines
        from index_server.client import parse_addresses

        client = GrpcIndex(ClientConfig(parse_addresses(spec.removeprefix("index="))))
        np.testing.assert_array_equal(client.search(queries, 4).ids, LocalIndex(sharded).search(queries, 4).ids)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_checked_in_stubs_match_the_proto(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iindex_server/_proto=proto", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}", "proto/knn.proto"], cwd=repo, check=True)
    for name in ("knn_pb2.py", "knn_pb2_grpc.py", "knn_pb2.pyi"):
        assert (tmp_path / "index_server/_proto" / name).read_bytes() == (repo / "index_server/_proto" / name).read_bytes()


def test_tls_and_health_check(sharded, queries, tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    server, address = start(sharded, tls_cert=cert, tls_key=key)
    try:
        client = GrpcIndex(ClientConfig((address,), tls_ca=cert))
        np.testing.assert_array_equal(client.search(queries, 3).ids, LocalIndex(sharded).search(queries, 3).ids)
        with pytest.raises(ShardUnavailableError, match="UNAVAILABLE"):  # plaintext client refused
            GrpcIndex(ClientConfig((address,), retries=0, timeout_s=3))
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(cert.read_bytes()))
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tttnn.knn.v1.KnnShard"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
