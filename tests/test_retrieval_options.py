"""Retriever and task options of the ttt-nn model: cache reuse, duplicate exclusion,
neighbour order, the split protocol, and the Pile task configs on a local Pile file."""

import json

import pytest
import zstandard
from lm_eval.api.instance import Instance

from lm_eval_ttt.retriever import Retriever, RetrieverConfig, is_near_duplicate


@pytest.fixture(scope="module")
def indexed_doc(default_corpus):
    """A document that is in the index, as a query that must find itself first."""
    with open(default_corpus / "stdlib_code.index.jsonl", encoding="utf-8") as f:
        return json.loads(f.readlines()[100])["text"]


def test_cache_serves_smaller_k_without_searching(default_index, indexed_doc, tmp_path):
    retriever = Retriever(RetrieverConfig(index=str(default_index), cache_dir=tmp_path))
    first = retriever.retrieve(indexed_doc, 8)
    assert not first.cached
    calls = []
    search = retriever.backend.search
    retriever.backend.search = lambda *a: calls.append(a) or search(*a)
    again = retriever.retrieve(indexed_doc, 5)
    assert again.cached and calls == []
    assert again.ids == first.ids[:5] and again.texts == first.texts[:5]
    reopened = Retriever(RetrieverConfig(index=str(default_index), cache_dir=tmp_path))
    assert reopened.retrieve(indexed_doc, 8).cached
    assert (tmp_path / f"{retriever.manifest.identity}.jsonl").is_file()  # keyed by index identity


def test_exclude_duplicates_drops_the_query_itself(default_index, indexed_doc, tmp_path):
    plain = Retriever(RetrieverConfig(index=str(default_index)))
    strict = Retriever(RetrieverConfig(index=str(default_index), exclude_duplicates=True))
    with_self, without_self = plain.retrieve(indexed_doc, 5), strict.retrieve(indexed_doc, 5)
    assert with_self.texts[0] == indexed_doc and with_self.distances[0] == pytest.approx(0, abs=1e-3)
    assert with_self.ids[0] in without_self.excluded_duplicates
    assert indexed_doc not in without_self.texts and len(without_self.ids) == 5
    assert without_self.ids[:4] == with_self.ids[1:5]


def test_near_duplicate_threshold():
    text = " ".join(f"word{i}" for i in range(200))
    assert is_near_duplicate(text, text.replace("word7 ", "WORD7 "))  # one word edited
    assert not is_near_duplicate(text, " ".join(f"word{i}" for i in range(100, 300)))  # half shared


def test_farthest_order_trains_in_reverse(default_index, tmp_path):
    from lm_eval_ttt.model import TTTNNLM

    doc = "import os\n\ndef walk(path):\n    return list(os.walk(path))\n"
    records = {}
    for order in ("nearest", "farthest"):
        model = TTTNNLM(k=3, order=order, max_length=64, max_neighbor_tokens=64, log_dir=str(tmp_path / order),
                        device="cpu", batch_size=1)
        records[order] = model.score_document(Instance("loglikelihood_rolling", {}, (doc,), 0))
    assert records["nearest"]["neighbour_ids"] == records["farthest"]["neighbour_ids"]
    first_losses = [r["chunk_losses"][0][0] for r in records.values()]
    assert first_losses[0] != first_losses[1]  # different first training chunk
    assert records["nearest"]["loglikelihood"] != records["farthest"]["loglikelihood"]


def test_prefix_query_retrieves_on_the_prefix_and_scores_the_rest(default_index, tmp_path):
    from lm_eval_ttt.model import TTTNNLM
    from lm_eval_ttt.retriever import text_key

    model = TTTNNLM(k=2, query="prefix", max_length=64, max_neighbor_tokens=64, log_dir=str(tmp_path),
                    device="cpu", batch_size=1)
    prefix, rest = "import json\n\ndef load(path):\n", "    with open(path) as f:\n        return json.load(f)\n"
    record = model.score_document(Instance("loglikelihood_rolling", {"prefix": prefix, "text": rest}, (rest,), 0))
    assert record["neighbour_ids"] == model.retriever.retrieve(prefix, 2).ids
    with pytest.raises(ValueError, match="query=prefix needs a split task"):
        model.score_document(Instance("loglikelihood_rolling", {"text": rest}, (rest,), 0))
    assert model.settings["query"] == "prefix"
    assert text_key(rest) != text_key(prefix + rest)


def test_pile_tasks_read_a_local_pile_file_and_override_the_builtin(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from lm_eval_ttt.cli import task_configs_dir

    rows = [{"text": f"github doc {i}", "meta": {"pile_set_name": "Github"}} for i in range(3)]
    rows += [{"text": "a europarl speech", "meta": {"pile_set_name": "EuroParl"}}]
    path = tmp_path / "test.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    monkeypatch.setenv("PILE_TEST_FILE", str(path))
    manager = TaskManager(include_path=str(task_configs_dir()))
    names = [f"pile_{n}" for n in ("github", "europarl", "arxiv", "books3", "wikipedia", "pile-cc", "dm-mathematics")]
    assert set(names) <= set(manager.all_tasks)
    tasks = manager.load_task_or_group(["pile_github", "pile_europarl"])
    docs = {name: [d["text"] for d in task.test_docs()] for name, task in tasks.items()}
    assert docs == {"pile_github": [f"github doc {i}" for i in range(3)], "pile_europarl": ["a europarl speech"]}
    assert str(task_configs_dir()) in str(manager.task_index["pile_github"].yaml_path)
    assert len(list(task_configs_dir().glob("pile_*.yaml"))) == 22


def test_split_task_has_prefix_and_rest(default_corpus):
    from lm_eval.tasks import TaskManager

    from lm_eval_ttt.cli import task_configs_dir

    task = TaskManager(include_path=str(task_configs_dir())).load_task_or_group(["ttt_stdlib_code_split"])
    docs = list(task["ttt_stdlib_code_split"].test_docs())
    full = [json.loads(line)["text"] for line in open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8")]
    assert [d["prefix"] + d["text"] for d in docs] == full
    for doc, text in zip(docs, full):
        half = int(len(text) * 0.5)
        if "\n" in text[half:-1]:  # cut at the first line break after the middle
            assert doc["prefix"] == text[: text.index("\n", half) + 1]
