"""Retriever and task options: cache reuse, duplicate exclusion, neighbour order, the split
protocol, and the Pile task configs on a local Pile file."""

import json

import pytest
import zstandard
from conftest import fake_lm
from fakes import FakeIndex
from lm_eval.api.instance import Instance

from lm_eval_ttt.documents import ROLLING
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.retriever import Retriever, is_near_duplicate
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.settings import NeighbourSettings


@pytest.fixture(scope="module")
def indexed_doc(corpus_texts):
    """A document that is in the index, as a query that must find itself first."""
    return corpus_texts[100]


@pytest.fixture(scope="module")
def index(corpus_texts):
    return FakeIndex(corpus_texts)


def retriever(index, cache=None, **selection):
    return Retriever(index, NeighbourSettings(**selection), cache, encoder=index.encoder)


def test_cache_serves_smaller_k_without_searching(index, indexed_doc, tmp_path):
    first = retriever(index, tmp_path).neighbours(indexed_doc, 8)
    assert not first.cached
    reopened = retriever(index, tmp_path)
    calls = []
    search = reopened.index.search
    reopened.index.search = lambda *a: calls.append(a) or search(*a)
    again = reopened.neighbours(indexed_doc, 5)
    assert again.cached and calls == []
    assert again.ids == first.ids[:5] and again.texts == first.texts[:5]
    assert list(tmp_path.glob(f"{reopened.manifest.identity}-*.jsonl"))  # keyed by index identity


def test_hnsw_retrievals_are_kept_per_k(corpus_texts, indexed_doc, tmp_path):
    """HNSW searches with efSearch >= k, so a k=5 answer need not be a prefix of a k=8 answer:
    the cache must not serve one for the other (it does for Flat, above)."""
    hnsw = FakeIndex(corpus_texts, factory="HNSW8")
    retriever(hnsw, tmp_path / "cache").neighbours(indexed_doc, 8)
    reopened = retriever(hnsw, tmp_path / "cache")
    calls = []
    search = reopened.index.search
    reopened.index.search = lambda *a: calls.append(a) or search(*a)
    assert not reopened.neighbours(indexed_doc, 5).cached and len(calls) == 1
    reopened.neighbours(indexed_doc, 5)
    assert len(calls) == 1  # the same k is served
    assert retriever(hnsw, tmp_path / "cache").neighbours(indexed_doc, 5).cached


def test_exclude_duplicates_drops_the_query_itself(index, indexed_doc):
    with_self = retriever(index).neighbours(indexed_doc, 5)
    without_self = retriever(index, exclude_duplicates=True).neighbours(indexed_doc, 5)
    assert with_self.texts[0] == indexed_doc and with_self.distances[0] == pytest.approx(0, abs=1e-3)
    assert with_self.ids[0] in without_self.excluded
    assert indexed_doc not in without_self.texts and len(without_self.ids) == 5
    assert without_self.ids[:4] == with_self.ids[1:5]


def test_excluded_ids_and_max_distance(index, indexed_doc):
    plain = retriever(index).neighbours(indexed_doc, 5)
    own = retriever(index).neighbours(indexed_doc, 5, exclude_ids={plain.ids[0]})
    assert own.ids == plain.ids[1:] + own.ids[4:] and plain.ids[0] in own.excluded and len(own.ids) == 5
    cut = plain.distances[2]
    near = retriever(index, max_distance=cut).neighbours(indexed_doc, 5)
    assert near.ids == plain.ids[:3] and near.stop_reason == "max_distance"


def test_near_duplicate_threshold():
    text = " ".join(f"word{i}" for i in range(200))
    assert is_near_duplicate(text, text.replace("word7 ", "WORD7 "))  # one word edited
    assert not is_near_duplicate(text, " ".join(f"word{i}" for i in range(100, 300)))  # half shared


def test_farthest_order_trains_in_reverse(tiny_lm, corpus_texts, tmp_path):
    doc = "import os\n\ndef walk(path):\n    return list(os.walk(path))\n"
    records = {}
    for order in ("nearest", "farthest"):
        lm = fake_lm(TTTNNLM, tmp_path / order, tiny_lm, corpus_texts, k=3, order=order, lr=1e-3,
                     max_neighbor_tokens=128)
        lm.loglikelihood_rolling([Instance(ROLLING, {}, (doc,), 0)], disable_tqdm=True)
        (records[order],) = read_log(lm.log_stem).values()
    # logged in training order, so chunk_losses[i] belongs to neighbour_ids[i]
    assert records["farthest"]["neighbour_ids"] == records["nearest"]["neighbour_ids"][::-1]
    assert records["farthest"]["sigmas"] is None and len(records["nearest"]["sigmas"]) == 3
    first_losses = [r["chunk_losses"][0][0] for r in records.values()]
    assert first_losses[0] != first_losses[1]  # different first training chunk
    assert records["nearest"]["results"] != records["farthest"]["results"]


def test_prefix_query_retrieves_on_the_prefix_and_scores_the_rest(tiny_lm, corpus_texts, tmp_path):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=2, query="prefix", max_neighbor_tokens=128)
    prefix, rest = "import json\n\ndef load(path):\n", "    with open(path) as f:\n        return json.load(f)\n"
    lm.loglikelihood_rolling([Instance(ROLLING, {"prefix": prefix, "text": rest}, (rest,), 0)],
                             disable_tqdm=True)
    (record,) = read_log(lm.log_stem).values()
    assert record["neighbour_ids"] == lm.retriever.neighbours(prefix, 2).ids
    assert record["bytes"] == len(rest.encode())
    with pytest.raises(ValueError, match="query=prefix needs a split task"):
        lm.loglikelihood_rolling([Instance(ROLLING, {"text": "x = 2\n"}, ("x = 2\n",), 0)],
                                 disable_tqdm=True)


def test_pile_tasks_read_a_local_pile_file_and_override_the_builtin(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from lm_eval_ttt.assets import task_configs_dir

    rows = [{"text": f"github doc {i}", "meta": {"pile_set_name": "Github"}} for i in range(3)]
    rows += [{"text": "a europarl speech", "meta": {"pile_set_name": "EuroParl"}}]
    path = tmp_path / "test.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    monkeypatch.setenv("PILE_TEST_FILE", str(path))
    pile = task_configs_dir() / "pile"
    manager = TaskManager(include_path=str(pile))
    names = [f"pile_{n}" for n in ("github", "europarl", "arxiv", "books3", "wikipedia", "pile-cc", "dm-mathematics")]
    assert set(names) <= set(manager.all_tasks)
    tasks = manager.load_task_or_group(["pile_github", "pile_europarl"])
    docs = {name: [d["text"] for d in task.test_docs()] for name, task in tasks.items()}
    assert docs == {"pile_github": [f"github doc {i}" for i in range(3)], "pile_europarl": ["a europarl speech"]}
    assert str(pile) in str(manager.task_index["pile_github"].yaml_path)
    assert len(list(pile.glob("pile_*.yaml"))) == 22


def test_split_task_has_prefix_and_rest(default_corpus):
    from lm_eval.tasks import TaskManager

    from lm_eval_ttt.assets import task_configs_dir

    task = TaskManager(include_path=str(task_configs_dir() / "ttt")).load_task_or_group(["ttt_stdlib_code_split"])
    docs = list(task["ttt_stdlib_code_split"].test_docs())
    full = [json.loads(line)["text"] for line in open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8")]
    assert [d["prefix"] + d["text"] for d in docs] == full
    for doc, text in zip(docs, full):
        half = int(len(text) * 0.5)
        if "\n" in text[half:-1]:  # cut at the first line break after the middle
            assert doc["prefix"] == text[: text.index("\n", half) + 1]


def test_retrieving_up_front_in_batches_gives_the_per_document_neighbours(corpus_texts, default_corpus):
    """Same ids in the same order (with Faiss and a padded encoder batch the distances agree
    to ~1e-3, not to the bit: test_grpc compares batches through the real index)."""
    import numpy as np

    texts = [json.loads(line)["text"] for line in open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8")]
    texts = texts[:70]
    batched, single = retriever(FakeIndex(corpus_texts)), retriever(FakeIndex(corpus_texts))
    stats = batched.prefetch(texts, 8, batch=64, progress=False)
    assert stats["searched"] == len(set(texts))
    calls = []
    search = batched.index.search
    batched.index.search = lambda *a: calls.append(a) or search(*a)
    for text in texts:
        a, b = batched.neighbours(text, 8), single.neighbours(text, 8)
        assert a.ids == b.ids
        np.testing.assert_allclose(a.distances, b.distances, atol=1e-3)
    assert calls == []  # everything came from the up-front retrieval
