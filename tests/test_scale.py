"""Pile-scale index pipeline, at small sizes: embedding in parts (parallel,
resumable), building from embeddings out of core, on-disk lists and exact re-ranking through
both backends, layout planning, moved corpora, and bad inputs refused before any writing."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, cli, run

from index_server.build import BuildConfig, build_index
from index_server.embed import EmbedConfig, part_name, run_embed
from index_server.encoder import EncoderConfig
from index_server.index import open_index
from index_server.manifest import Manifest
from index_server.options import IndexOptions
from index_server.plan import choose, measured_recall, parse_bytes, parse_count
from index_server.search import LocalIndex
from index_server.server import ServerConfig, start_server

ENCODER = EncoderConfig(max_tokens=16, batch_size=64)


def parts_vectors(directory: Path) -> np.ndarray:
    n = json.loads((directory / "embeddings.json").read_text())["bounds"]
    return np.concatenate([np.load(directory / f"{part_name(p)}.npy") for p in range(len(n) - 1)])


@pytest.fixture(scope="module")
def one_part(small_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "one"
    run_embed(EmbedConfig(corpus=(small_corpus,), output=out, encoder=ENCODER, num_parts=1, progress=False))
    return out


def test_three_parts_equal_one_part_and_give_the_same_neighbours(small_corpus, one_part, tmp_path, capsys):
    three = tmp_path / "three"
    for part in (2, 0, 1):  # three independent jobs, in any order
        cli(capsys, "ttt-index", "embed", str(small_corpus), "--out", str(three), "--num-parts", "3", "--part",
            str(part),
            "--max-tokens", "16", "--quiet")
    np.testing.assert_allclose(parts_vectors(three), parts_vectors(one_part), atol=1e-5)
    a, b = (build_index(BuildConfig(output=tmp_path / name, embeddings=emb, progress=False))
            for name, emb in (("a", one_part), ("b", three)))
    queries = parts_vectors(one_part)[::9] + 0.01
    found_a, found_b = (LocalIndex(tmp_path / name).search(queries, 10) for name in ("a", "b"))
    # the same neighbours at the same distances; near-ties may swap places (on CPUs whose
    # kernels depend on the batch, e.g. AMX, the vectors agree to 1e-5, not bit for bit)
    np.testing.assert_allclose(found_a.distances, found_b.distances, atol=1e-4)
    gaps = np.diff(found_a.distances, axis=1) > 1e-3  # an id is pinned where its rank is not a near-tie
    pinned = np.hstack([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], gaps[:, -1:]])
    np.testing.assert_array_equal(found_a.ids[pinned], found_b.ids[pinned])
    assert a.corpus[0].sha256 != b.corpus[0].sha256 or a.corpus[0].chunks != b.corpus[0].chunks
    cli(capsys, "ttt-index", "info", str(tmp_path / "b"), "--full")  # chunked corpus hashes verify


def test_ranks_take_their_share_of_parts(small_corpus, tmp_path, capsys, monkeypatch):
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        proc = cli(capsys, "ttt-index", "embed", str(small_corpus), "--out", str(tmp_path), "--num-parts", "4",
                   "--max-tokens", "16", "--quiet")
        assert f"{2 + 2 * rank} of 4 parts embedded" in proc.stdout  # rank r embeds parts r and r + 2
    assert sorted(p.name for p in tmp_path.glob("part-*.json")) == [f"{part_name(i)}.json" for i in range(4)]


def test_a_killed_embed_resumes_without_redoing_finished_parts(small_corpus, tmp_path):
    out = tmp_path / "emb"
    cmd = [str(BIN / "ttt-index"), "embed", str(small_corpus), "--out", str(out), "--num-parts", "6",
           "--max-tokens", "16", "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not (out / f"{part_name(0)}.json").is_file():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p for p in range(6) if (out / f"{part_name(p)}.json").is_file()]
    assert done and len(done) < 6
    stamps = {p: (out / f"{part_name(p)}.npy").stat().st_mtime_ns for p in done}
    proc = run(*[c.rsplit("/", 1)[-1] if i == 0 else c for i, c in enumerate(cmd)])
    assert "6 of 6 parts embedded" in proc.stdout
    assert {p: (out / f"{part_name(p)}.npy").stat().st_mtime_ns for p in done} == stamps  # not redone
    assert not list(out.glob(".part-*"))  # no half-written part left behind


def test_build_from_embeddings_equals_build_from_the_corpus(small_corpus, one_part, tmp_path):
    direct = build_index(BuildConfig(output=tmp_path / "direct", corpus=(small_corpus,), encoder=ENCODER,
                                     progress=False))
    staged = build_index(BuildConfig(output=tmp_path / "staged", embeddings=one_part, progress=False))
    assert direct.identity == staged.identity
    queries = parts_vectors(one_part)[::5]
    a, b = LocalIndex(tmp_path / "direct").search(queries, 7), LocalIndex(tmp_path / "staged").search(queries, 7)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)


@pytest.fixture(scope="module")
def synthetic_20k(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """20k clustered vectors as embedding parts, plus 50 queries and their exact top-20."""
    tmp = tmp_path_factory.mktemp("20k")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 32)).astype(np.float32)
    vectors = centres[rng.integers(200, size=20_000)] + 0.3 * rng.standard_normal((20_000, 32), dtype=np.float32)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20_000)))
    emb = tmp / "emb"
    run_embed(EmbedConfig(corpus=(corpus,), output=emb, vectors=vectors, num_parts=3, progress=False))
    queries = vectors[:50] + 0.05 * rng.standard_normal((50, 32), dtype=np.float32)
    distances = ((queries[:, None, :] - vectors[None]) ** 2).sum(-1)
    return emb, queries, np.argsort(distances, axis=1, kind="stable")[:, :20]


@pytest.mark.parametrize("flags", [{"on_disk": True}, {"store_vectors": True}, {"on_disk": True,
                                                                                "store_vectors": True}])
def test_on_disk_lists_and_refine_answer_correctly_through_both_backends(synthetic_20k, tmp_path, flags):
    """On-disk lists answer exactly as the same index with lists in RAM; re-ranking from the
    stored float16 vectors brings recall@20 near exact search, with exact distances."""
    emb, queries, truth = synthetic_20k
    options = IndexOptions(nprobe=16, refine_factor=8)

    def built(name: str, **extra) -> Path:
        build_index(BuildConfig(output=tmp_path / name, embeddings=emb, factory="IVF64,PQ8", shards=2, add_block=4096,
                                progress=False, **extra))
        return tmp_path / name

    out = built("idx", **flags)
    manifest = Manifest.load(out)
    in_ram = LocalIndex(built("in-ram", store_vectors=flags.get("store_vectors", False)), options).search(queries, 20)
    if flags.get("on_disk"):
        assert all(s.ivfdata is not None and (out / s.ivfdata.file).is_file() for s in manifest.shards)
        moved = tmp_path / "moved"  # on-disk lists are found next to the shard wherever the index goes
        shutil.move(out, moved)
        out = moved
    local = LocalIndex(out, options)
    found = local.search(queries, 20)
    np.testing.assert_array_equal(found.ids, in_ram.ids)
    np.testing.assert_array_equal(found.distances, in_ram.distances)
    if flags.get("store_vectors"):
        recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(found.ids, truth)])
        assert recall > 0.9, recall
        exact = ((queries - parts_vectors(emb)[found.ids[:, 0]]) ** 2).sum(1)
        np.testing.assert_allclose(found.distances[:, 0], exact, rtol=1e-2)  # from float16 copies
    server, port, _ = start_server(ServerConfig(index=out, search=options))
    try:
        remote = open_index(f"grpc://127.0.0.1:{port}", options)
        got = remote.search(queries, 20)
        np.testing.assert_array_equal(got.ids, found.ids)
        np.testing.assert_array_equal(got.distances, found.distances)
        assert remote.texts(found.ids[0][:2]) == local.texts(found.ids[0][:2])
    finally:
        server.stop(0)


def test_bad_embedding_parts_are_clear_errors_and_nothing_is_written(small_corpus, one_part, tmp_path, capsys):
    def broken(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(one_part, target)
        return target

    missing = broken("missing")
    (missing / f"{part_name(0)}.json").unlink()
    corrupt = broken("corrupt")
    (corrupt / f"{part_name(0)}.npy").write_bytes(b"not numpy")
    wrong_dim = broken("dims")
    np.save(wrong_dim / f"{part_name(0)}.npy", np.zeros((5, 3), dtype=np.float32))
    flipped = broken("flipped")  # valid header and size, one value changed
    data = bytearray((flipped / f"{part_name(0)}.npy").read_bytes())
    data[-5] ^= 0xFF
    (flipped / f"{part_name(0)}.npy").write_bytes(bytes(data))
    for emb, message in ((missing, r"1 of 1 embedding parts are missing \(0\); run `ttt-index embed"),
                         (corrupt, r"corrupt embedding part"),
                         (wrong_dim, r"holds \(5, 3\) float32, expected \(\d+, 384\) float32"),
                         (flipped, r"contents differ from what the embedding run wrote")):
        proc = cli(capsys, "ttt-index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "out"), check=False)
        assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "another corpus"}\n')
    proc = cli(capsys, "ttt-index", "embed", str(other), "--out", str(one_part), "--max-tokens", "16", check=False)
    assert proc.returncode == 2 and "belongs to another embedding run" in proc.stderr


def test_build_with_a_memory_budget_lets_plan_choose(synthetic_20k, tmp_path, capsys):
    emb = synthetic_20k[0]
    proc = cli(capsys, "ttt-index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "idx"), "--max-memory",
               "8G", "--quiet")
    chosen = re.search(r"--max-memory 8G: chose --factory (\S+)", proc.stdout).group(1)
    assert Manifest.load(tmp_path / "idx").factory == chosen
    proc = cli(capsys, "ttt-index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "other"),
               "--max-memory", "8G", "--factory", "Flat", check=False)
    assert proc.returncode == 2 and "--max-memory chooses the factory" in proc.stderr


def test_a_moved_corpus_is_found_with_corpus_root(small_corpus, tmp_path, capsys):
    from conftest import build_small

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_corpus, data / "corpus.jsonl")
    index = build_small(data / "corpus.jsonl", tmp_path / "idx")
    assert not Path(Manifest.load(index).corpus[0].path).is_absolute()
    shutil.move(data, tmp_path / "mounted-elsewhere")
    proc = cli(capsys, "ttt-index", "info", str(index), "--verify", check=False)
    assert proc.returncode == 2 and "corpus file is missing (moved? pass --corpus-root" in proc.stderr
    cli(capsys, "ttt-index", "info", str(index), "--verify", "--corpus-root", str(tmp_path / "mounted-elsewhere"))
    moved = LocalIndex(index, IndexOptions(corpus_root=tmp_path / "mounted-elsewhere"))
    first = json.loads((tmp_path / "mounted-elsewhere" / "corpus.jsonl").open().readline())
    assert moved.texts([0])[0] == first["text"]


def test_plan_picks_the_most_accurate_layout_that_fits(capsys):
    """With the measured table (index_server/measured_recall.json): PQ codes re-ranked from
    stored vectors recall as well as the lists probed allow (what IVF,Flat recalls), with the
    fewest bytes; their lists stay in RAM when the budget allows, else go to disk."""
    assert (parse_count("210M"), parse_bytes("64G")) == (210_000_000, 64 * 2**30)
    chosen = choose(210_000_000, 1024, parse_bytes("64G"))
    measured = measured_recall()
    assert chosen.ram_bytes <= 0.8 * 64 * 2**30
    assert chosen.recall == measured["IVF,PQ(d/8) + refine"] >= measured["IVF,Flat"] - 0.01
    assert (chosen.factory, chosen.refine, chosen.on_disk) == ("IVF65536,PQ128", True, False)
    small = choose(210_000_000, 1024, parse_bytes("16G"))
    assert (small.factory, small.refine, small.on_disk) == ("IVF65536,PQ128", True, True)
    no_disk = choose(210_000_000, 1024, parse_bytes("64G"), max_disk=parse_bytes("100G"))
    assert not no_disk.refine and no_disk.disk_bytes <= parse_bytes("100G")
    proc = cli(capsys, "ttt-index", "plan", "--vectors", "210M", "--dim", "1024", "--max-memory", "64G")
    assert "<- chosen" in proc.stdout and f"chosen: {chosen.describe()}" in proc.stdout
    with pytest.raises(ValueError, match="no layout of 210000000 x 1024 vectors fits"):
        choose(210_000_000, 1024, parse_bytes("100M"))


def test_plan_expects_the_worse_of_the_measured_sources(tmp_path, monkeypatch):
    from index_server import plan

    monkeypatch.setattr(plan, "MEASURED", tmp_path / "measured.json")
    plan.record_measured_recall("synthetic", "2M mixture", {"IVF,PQ(d/8)": 0.31, "IVF,PQ(d/8) + refine": 0.9995})
    assert plan.measured_recall() == {"IVF,PQ(d/8)": 0.31, "IVF,PQ(d/8) + refine": 0.9995}
    plan.record_measured_recall("real", "100k code", {"IVF,PQ(d/8)": 0.52, "IVF,PQ(d/8) + refine": 0.97})
    plan.record_measured_recall("real", "a rerun", {"IVF,PQ(d/8)": 0.55, "IVF,PQ(d/8) + refine": 0.96})  # replaces it
    assert plan.measured_recall() == {"IVF,PQ(d/8)": 0.31, "IVF,PQ(d/8) + refine": 0.96}
    with pytest.raises(ValueError, match="kind of data must be one of"):
        plan.record_measured_recall("quick", "a small test", {})
