import json
import os
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import build_small, cli

from index_server.build import BuildConfig, build_index
from index_server.encoder import encoder_of
from index_server.manifest import Manifest, ManifestMismatchError
from index_server.options import IndexOptions
from index_server.search import LocalIndex, QueryError

# held-out module -> (area prefix, how many of its top 5 must come from that area)
HELD_OUT = {
    "Lib/encodings/cp1026.py": ("Lib/encodings/cp", 5),
    "Lib/lib2to3/fixes/fix_getcwdu.py": ("Lib/lib2to3/fixes/", 5),
    "Lib/ctypes/test/test_anon.py": ("Lib/ctypes/test/", 5),
    "Lib/test/test_json/test_default.py": ("Lib/test/test_json/", 4),
    "Lib/email/encoders.py": ("Lib/email/", 2),
    "Lib/sqlite3/dump.py": ("Lib/test/test_sqlite3/", 3),
}


def test_default_corpus_split_is_by_file_and_deterministic(default_corpus, tmp_path, capsys):
    def paths(name):
        return {json.loads(line)["meta"]["path"] for line in open(default_corpus / name, encoding="utf-8")}

    index, test = paths("stdlib_code.index.jsonl"), paths("stdlib_code.test.jsonl")
    assert not index & test
    assert len(test) > 100 and len(index) > 9 * len(test) * 0.7
    assert set(HELD_OUT) <= test
    cli(capsys, "ttt-index", "default-corpus", "--out", str(tmp_path), "--quiet")
    for name in ("stdlib_code.test.jsonl", "python_docs.index.jsonl"):
        assert (tmp_path / name).read_bytes() == (default_corpus / name).read_bytes()


@pytest.mark.slow
def test_held_out_modules_retrieve_their_area(default_index, default_corpus):
    index = LocalIndex(default_index)
    manifest = index.manifest
    encoder = encoder_of(manifest.encoder)
    tests = {}
    for line in open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8"):
        record = json.loads(line)
        tests[record["meta"]["path"]] = record["text"]
    result = index.search(encoder.encode([tests[m] for m in HELD_OUT]), 5)
    for (module, (area, needed)), ids in zip(HELD_OUT.items(), result.ids):
        found = [index.corpus.document(int(i)).meta["path"] for i in ids]
        assert sum(p.startswith(area) for p in found) >= needed, (module, found)
        assert module not in found


@pytest.fixture(scope="session")
def small_vectors(small_index):
    index = LocalIndex(small_index)
    vectors, source = index.vectors(np.arange(index.manifest.n_vectors))
    assert source == "exact"
    return vectors


@pytest.mark.parametrize("shards", [1, 4])
def test_sharded_search_equals_one_flat_index(small_corpus, small_vectors, tmp_path, shards):
    index = LocalIndex(build_small(small_corpus, tmp_path / "idx", shards=shards, num_parts=3))
    assert [s.shard.count for s in index.shards] == [s.count for s in index.manifest.shards]
    assert len(index.shards) == shards
    flat = faiss.IndexFlatL2(small_vectors.shape[1])
    flat.add(small_vectors)
    queries = small_vectors[::7] + np.float32(0.01)
    for k in (1, 10, 50):
        ref_d, ref_i = flat.search(queries, k)
        got = index.search(queries, k)
        np.testing.assert_array_equal(got.ids, ref_i)
        np.testing.assert_array_equal(got.distances, ref_d)
    texts = index.texts(got.ids[0][:3])
    assert texts == [index.corpus.text(int(i)) for i in got.ids[0][:3]]


def test_approximate_factories_build_and_find_neighbours(small_corpus, small_vectors, tmp_path):
    flat = faiss.IndexFlatL2(small_vectors.shape[1])
    flat.add(small_vectors)
    _, truth = flat.search(small_vectors[:40], 10)
    for factory, options in (("IVF16,PQ16", IndexOptions(nprobe=16)), ("HNSW16", IndexOptions(ef_search=64))):
        path = build_small(small_corpus, tmp_path / factory.replace(",", "_"), shards=2, factory=factory)
        index = LocalIndex(path, options)
        got = index.search(small_vectors[:40], 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids, truth)])
        assert recall > 0.5, (factory, recall)
        assert Manifest.load(path).factory == factory


def test_bad_build_options_are_refused_before_writing(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="invalid index factory string 'IVFx'"):
        build_index(BuildConfig(output=tmp_path / "a", corpus=(small_corpus,), factory="IVFx", progress=False))
    with pytest.raises(ValueError, match="needs at least 100000 training vectors"):
        build_index(BuildConfig(output=tmp_path / "b", corpus=(small_corpus,), factory="IVF100000,Flat",
                                progress=False))
    with pytest.raises(ValueError, match="--on-disk needs an IVF index"):
        build_index(BuildConfig(output=tmp_path / "c", corpus=(small_corpus,), on_disk=True, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_changed_corpus_is_detected_before_search(small_corpus, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(small_corpus.read_bytes())
    path = build_small(corpus, tmp_path / "idx")
    corpus.write_bytes(corpus.read_bytes().replace(b"import", b"IMPORT", 1))
    with pytest.raises(ManifestMismatchError, match="contents changed since the index was built"):
        LocalIndex(path)


def test_in_process_queries_are_validated_like_the_servers(small_index):
    index = LocalIndex(small_index, IndexOptions(max_k=50))
    good = np.zeros((1, index.manifest.dim), dtype=np.float32)
    for vectors, k, message in ((good * np.nan, 3, "NaN or infinity"), (good + np.inf, 3, "NaN or infinity"),
                                (good, 51, r"k must be in \[1, 50\]"), (good, 0, r"k must be in \[1, 50\]"),
                                (good[:, :5], 3, "query dimension 5")):
        with pytest.raises(QueryError, match=message):
            index.search(vectors, k)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_integrity_catches_rotated_doc_table_and_swapped_shards(small_corpus, tmp_path, capsys):
    """Before, docs.npy was in no checksum and shards were checked by count only."""
    a = build_small(small_corpus, tmp_path / "a", shards=2)
    b = build_small(small_corpus, tmp_path / "b", shards=2, max_tokens=16)  # same sizes, other vectors
    rotated = _copy(a, tmp_path / "rotated")
    table = np.load(rotated / "docs.npy")
    np.save(rotated / "docs.npy", np.roll(table, 1))
    swapped = _copy(a, tmp_path / "swapped")
    shard = Manifest.load(a).shards[1].file.file
    shutil.copy(b / shard, swapped / shard)
    truncated = _copy(a, tmp_path / "truncated")
    with open(truncated / shard, "r+b") as f:
        f.truncate(f.seek(0, 2) - 8)
    for broken, message in ((rotated, "document table contents differ"), (swapped, "shard 1 contents differ"),
                            (truncated, "shard 1 is .* bytes, the manifest says")):
        with pytest.raises(ManifestMismatchError, match=message):
            LocalIndex(broken)
        proc = cli(capsys, "ttt-index", "info", str(broken), "--verify", check=False)
        assert proc.returncode == 2 and "ttt-index: error:" in proc.stderr
    cli(capsys, "ttt-index", "info", str(a), "--full")


def test_overwrite_only_replaces_an_index(small_corpus, tmp_path, capsys):
    """Before, --overwrite deleted whatever --out held, the corpus being indexed included."""
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "notes.txt").write_text("not an index")
    corpus = precious / "corpus.jsonl"
    corpus.write_bytes(small_corpus.read_bytes())
    for out, message in ((precious, "is not an output of this tool"), (tmp_path / "data" / "notes.txt",
                                                                       "is not a directory")):
        proc = cli(capsys, "ttt-index", "build", str(corpus), "--out", str(out), "--overwrite", "--max-tokens", "16",
                   check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert (precious / "notes.txt").read_text() == "not an index" and corpus.is_file()
    inside = build_small(corpus, precious / "index")
    nested = precious / "index" / "corpus.jsonl"
    shutil.copy(corpus, nested)
    proc = cli(capsys, "ttt-index", "build", str(nested), "--out", str(inside), "--overwrite", "--max-tokens", "16",
               check=False)
    assert proc.returncode == 2 and "holds the input" in proc.stderr
    build_small(corpus, inside, overwrite=True)  # an index is replaced
    assert Manifest.load(inside).n_vectors > 0


def test_build_errors_are_one_line_before_any_embedding(small_corpus, tmp_path, capsys):
    unwritable = Path("/sys/ttt-nn-test-index")  # not writable, even for root
    for out, message in ((unwritable, "Permission denied|Operation not permitted"),
                         (small_corpus / "idx", "is not a directory")):
        proc = cli(capsys, "ttt-index", "build", str(small_corpus), "--out", str(out), check=False)
        assert proc.returncode == 2 and re.search(message, proc.stderr) and "Traceback" not in proc.stderr, proc.stderr
        assert "embed documents" not in proc.stderr


def test_scratch_is_removed_on_sigterm_and_stale_scratch_by_the_next_build(small_corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-m", "index_server.cli", "build", str(small_corpus), "--out", str(out),
                             "--max-tokens", "128", "--batch-size", "1"],  # seconds of embedding: signalled mid-build
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".idx.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not list(tmp_path.glob(".idx.tmp-*")) and not out.exists()
    build_small(small_corpus, out)
    assert (out / "manifest.json").is_file()


def test_full_verification_catches_what_the_quick_check_cannot(default_corpus, tmp_path, capsys):
    """The quick check hashes the head, middle and tail MiB; a byte changed elsewhere in a
    large file (same size) needs --full."""
    corpus = tmp_path / "big.jsonl"
    shutil.copy(default_corpus / "stdlib_code.index.jsonl", corpus)  # ~30 MB
    index = build_small(corpus, tmp_path / "idx", max_tokens=8)
    data = bytearray(corpus.read_bytes())
    offset = 5 << 20  # outside the sampled regions
    while data[offset] not in b"abcdefghijklmnopqrstuvwxyz":
        offset += 1
    data[offset] = ord("A") if data[offset] != ord("A") else ord("B")
    stat = corpus.stat()
    corpus.write_bytes(bytes(data))
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cli(capsys, "ttt-index", "info", str(index), "--verify")
    proc = cli(capsys, "ttt-index", "info", str(index), "--full", check=False)
    assert proc.returncode == 2 and "sha256 differs from the one recorded at build time" in proc.stderr


def test_a_build_killed_with_sigkill_leaves_scratch_that_the_next_build_removes(small_corpus, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-m", "index_server.cli", "build", str(small_corpus), "--out", str(out),
                             "--max-tokens", "128", "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".idx.tmp-*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (left,) = tmp_path.glob(".idx.tmp-*")
    build_small(small_corpus, out)
    assert not left.exists() and (out / "manifest.json").is_file()


def test_a_corpus_rewritten_in_place_with_the_same_size_is_refused_by_the_server(small_corpus, tmp_path):
    import grpc

    from index_server._proto import knn_pb2, knn_pb2_grpc
    from index_server.server import ServerConfig, start_server

    corpus = tmp_path / "c.jsonl"
    shutil.copy(small_corpus, corpus)
    index = build_small(corpus, tmp_path / "idx")
    server, port, _ = start_server(ServerConfig(index=index))
    try:
        corpus.write_bytes(corpus.read_bytes().replace(b"def ", b"DEF ", 1))  # same size, new content
        stub = knn_pb2_grpc.KnnShardStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        with pytest.raises(grpc.RpcError) as err:
            stub.FetchTexts(knn_pb2.FetchTextsRequest(ids=[3]), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"{corpus}: corpus file changed while the index was being served" in err.value.details()
    finally:
        server.stop(0)


@pytest.mark.parametrize("edit", [
    lambda m: m["shards"][0]["file"].update(file="../other-index/shard-0.faiss"),
    lambda m: m["doc_table"].update(file="/etc/passwd"),
    lambda m: m["corpus"][0].update(path="../../etc/passwd"),
    lambda m: m["corpus"][0].update(path="/etc/passwd"),
])
def test_a_manifest_naming_files_outside_its_directories_is_refused(small_index, tmp_path, edit):
    raw = json.loads((small_index / "manifest.json").read_text())
    edit(raw)
    with pytest.raises(ManifestMismatchError, match="not a plain file name|not relative to the corpus root"):
        Manifest.from_json(json.dumps(raw))
    with pytest.raises(ManifestMismatchError, match="expected a JSON object"):
        Manifest.from_json("[1, 2]")


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_swap_that_died_halfway_is_undone_and_other_hosts_scratch_is_kept(small_index, tmp_path):
    """Killed between the swap's two renames, the old output sits renamed away: the next run on
    this host renames it back. Scratch of another host (shared filesystem) is never touched."""
    import socket

    from index_server.atomic import atomic_output, remove_stale_scratch

    out = tmp_path / "idx"
    old = tmp_path / f".idx.tmp-old-{socket.gethostname()}-{_dead_pid()}"
    shutil.copytree(small_index, old)
    (old / ".owner").write_text(old.name.split("old-", 1)[1])
    foreign = tmp_path / ".idx.tmp-abc123"
    foreign.mkdir()
    (foreign / ".owner").write_text(f"some-other-host-{os.getpid()}")
    dead = tmp_path / ".idx.tmp-def456"
    dead.mkdir()
    (dead / ".owner").write_text(f"{socket.gethostname()}-{_dead_pid()}")
    with pytest.raises(FileExistsError, match="pass --overwrite"):  # restored first, so not replaced
        with atomic_output(out):
            pass
    assert Manifest.load(out).identity == Manifest.load(small_index).identity and not old.exists()
    assert not (out / ".owner").exists() and foreign.is_dir() and not dead.exists()
    assert remove_stale_scratch(out) == []
    with atomic_output(tmp_path / "fresh") as scratch:
        (scratch / "a").write_text("x")
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["a"]  # no owner file left behind


@pytest.mark.parametrize("bad", [{"refine_factor": 0}, {"nprobe": 0}, {"ef_search": -1}, {"max_k": 0},
                                 {"timeout_s": 0}, {"retries": -1}])
def test_search_settings_below_their_range_are_refused(bad):
    with pytest.raises(ValueError):
        IndexOptions(**bad)


def test_build_names_what_is_missing_or_doubled(small_corpus, tmp_path, capsys):
    proc = cli(capsys, "ttt-index", "build", "--out", str(tmp_path / "a"), check=False)
    assert proc.returncode == 2 and "nothing to index" in proc.stderr, proc.stderr
    proc = cli(capsys, "ttt-index", "build", str(small_corpus), "--max-memory", "1G", "--refine", "--out",
               str(tmp_path / "b"), check=False)
    assert proc.returncode == 2 and "--max-memory chooses" in proc.stderr, proc.stderr
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "embeddings.json").write_text("{not json")
    proc = cli(capsys, "ttt-index", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "c"),
               check=False)
    assert proc.returncode == 2 and "not a valid embeddings layout" in proc.stderr and "Traceback" not in proc.stderr


def test_a_bfloat16_index_records_its_arithmetic_and_its_queries_use_it(small_corpus, corpus_texts, tmp_path):
    """The fast CPU path: an index embedded in bfloat16 says so in its manifest (so it has its
    own identity), the retriever embeds queries in bfloat16 too, and its neighbours agree
    with float32's (bench_encoder measures the agreement at 256 tokens on the whole corpus)."""
    import torch

    from index_server.embed import EmbedConfig, run_embed
    from index_server.encoder import EncoderConfig
    from lm_eval_ttt.retriever import Retriever
    from lm_eval_ttt.settings import NeighbourSettings

    corpus = tmp_path / "corpus.jsonl"  # the first 120 documents: two embeddings of it stay quick
    corpus.write_text("".join(small_corpus.read_text(encoding="utf-8").splitlines(keepends=True)[:120]))
    indexes = {}
    for dtype in ("float32", "bfloat16"):
        run_embed(EmbedConfig(corpus=(corpus,), output=tmp_path / dtype / "emb", dtype=dtype, progress=False,
                              encoder=EncoderConfig(max_tokens=32, batch_size=64)))
        build_index(BuildConfig(output=tmp_path / dtype / "index", embeddings=tmp_path / dtype / "emb",
                                progress=False))
        indexes[dtype] = LocalIndex(tmp_path / dtype / "index")
    f32, bf16 = indexes["float32"], indexes["bfloat16"]
    assert "dtype" not in f32.manifest.encoder and bf16.manifest.encoder["dtype"] == "bfloat16"
    assert f32.manifest.identity != bf16.manifest.identity
    retriever = Retriever(bf16, NeighbourSettings(k=10))
    assert next(retriever.encoder.model.parameters()).dtype == torch.bfloat16
    queries = corpus_texts[:120:6]
    found = {d: encoder_of(i.manifest.encoder).encode(queries) for d, i in indexes.items()}
    ids = {d: indexes[d].search(found[d], 10).ids for d in found}
    agreement = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids["float32"], ids["bfloat16"])])
    assert agreement >= 0.8, agreement
    retriever.close()
    for index in indexes.values():
        index.close()
    with pytest.raises(ValueError, match="encoder dtype must be one of"):
        run_embed(EmbedConfig(corpus=(corpus,), output=tmp_path / "bad", dtype="int8", progress=False))


def test_a_sigterm_swallowed_by_a_finaliser_still_stops_the_swap(tmp_path):
    """Python drops an exception raised inside ``__del__``; a SIGTERM that lands there (the
    garbage collector runs finalisers at any bytecode) must still keep the target untouched."""
    import signal

    from index_server.atomic import atomic_output

    class SignalledInFinaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__

    out = tmp_path / "idx"
    with pytest.raises(SystemExit):
        with atomic_output(out) as scratch:
            (scratch / "a").write_text("x")
            SignalledInFinaliser()  # finalised at once: its SystemExit is printed and dropped
    assert not out.exists() and not list(tmp_path.glob(".idx.tmp-*"))
