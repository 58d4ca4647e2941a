import json

import faiss
import numpy as np
import pytest

from conftest import build_small, run
from index_server.build import BuildConfig, build_index
from index_server.corpus import CorpusStore, scan_corpus
from index_server.encoder import EncoderConfig, TextEncoder
from index_server.manifest import Manifest
from index_server.search import LocalIndex, SearchParams

# held-out module -> (area prefix, how many of its top 5 must come from that area)
HELD_OUT = {
    "Lib/encodings/cp1026.py": ("Lib/encodings/cp", 5),
    "Lib/lib2to3/fixes/fix_getcwdu.py": ("Lib/lib2to3/fixes/", 5),
    "Lib/ctypes/test/test_anon.py": ("Lib/ctypes/test/", 5),
    "Lib/test/test_json/test_default.py": ("Lib/test/test_json/", 4),
    "Lib/email/encoders.py": ("Lib/email/", 2),
    "Lib/sqlite3/dump.py": ("Lib/test/test_sqlite3/", 3),
}


def test_default_corpus_split_is_by_file_and_deterministic(default_corpus, tmp_path):
    def paths(name):
        return {json.loads(line)["meta"]["path"] for line in open(default_corpus / name, encoding="utf-8")}

    index, test = paths("stdlib_code.index.jsonl"), paths("stdlib_code.test.jsonl")
    assert not index & test
    assert len(test) > 100 and len(index) > 9 * len(test) * 0.7
    assert set(HELD_OUT) <= test
    run("ttt-index", "default-corpus", "--out", str(tmp_path), "--quiet")
    for name in ("stdlib_code.test.jsonl", "python_docs.index.jsonl"):
        assert (tmp_path / name).read_bytes() == (default_corpus / name).read_bytes()


def test_held_out_modules_retrieve_their_area(default_index, default_corpus):
    index = LocalIndex(default_index)
    manifest = index.manifest
    encoder = TextEncoder(EncoderConfig(manifest.encoder["name_or_path"], manifest.encoder["max_tokens"]))
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
def small_vectors(small_corpus):
    store = CorpusStore.from_scan(scan_corpus([small_corpus], progress=False))
    encoder = TextEncoder(EncoderConfig(max_tokens=32, batch_size=64))
    return encoder.encode(list(store.iter_texts()))


@pytest.mark.parametrize("shards", [1, 4])
def test_sharded_search_equals_one_flat_index(small_corpus, small_vectors, tmp_path, shards):
    index = LocalIndex(build_small(small_corpus, tmp_path / "idx", shards=shards))
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
    for factory, params in (("IVF16,PQ16", SearchParams(nprobe=16)), ("HNSW16", SearchParams(ef_search=64))):
        path = build_small(small_corpus, tmp_path / factory.replace(",", "_"), shards=2, factory=factory)
        index = LocalIndex(path, params)
        got = index.search(small_vectors[:40], 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids, truth)])
        assert recall > 0.5, (factory, recall)
        assert Manifest.load(path).factory == factory


def test_bad_build_options_are_refused_before_writing(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="invalid index factory string 'IVFx'"):
        build_index(BuildConfig(corpus=(small_corpus,), output=tmp_path / "a", factory="IVFx", progress=False))
    with pytest.raises(ValueError, match="needs at least 100000 training vectors"):
        build_index(BuildConfig(corpus=(small_corpus,), output=tmp_path / "b", factory="IVF100000,Flat", progress=False))
    assert list(tmp_path.iterdir()) == []


def test_changed_corpus_is_detected_before_search(small_corpus, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(small_corpus.read_bytes())
    path = build_small(corpus, tmp_path / "idx")
    corpus.write_bytes(corpus.read_bytes().replace(b"import", b"IMPORT", 1))
    with pytest.raises(RuntimeError, match="contents changed since the index was built"):
        LocalIndex(path)
