"""Crash safety and honesty of the harness side: degraded answers are never reused silently,
broken log and cache lines do not break later runs, and concurrent runs on one log
directory score each document once. (Protected servers through lm_eval: test_harness_contract.)"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest
from conftest import TEST_TASKS, build_small, fake_lm, make_lm, requests

from index_server.launcher import start_shard_server
from index_server.server import ServerConfig
from lm_eval_ttt.jsonl import SkippedLineWarning
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.runlog import rank_files, read_log


@pytest.fixture(scope="module")
def two_shards(small_corpus, tmp_path_factory):
    return build_small(small_corpus, tmp_path_factory.mktemp("two") / "idx", shards=2)


def test_degraded_answer_is_logged_counted_warned_never_cached_and_rescored(tiny_lm, two_shards, test_docs,
                                                                             tmp_path, caplog):
    servers = [start_shard_server(ServerConfig(two_shards, shards=(i,))) for i in range(2)]  # real processes
    try:
        spec = "grpc://" + "+".join(s.address for s in servers)
        degrade = make_lm(TTTNNLM, tmp_path, tiny_lm, spec, k=3, failure_policy="degrade", retrieval_timeout=2,
                          max_neighbor_tokens=128)
        servers[1].process.kill()  # shard 1 dies during the run
        servers[1].process.wait()
        with caplog.at_level(logging.WARNING, logger="lm_eval_ttt"):
            degrade.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
        assert "2 of 2 documents were scored from degraded retrievals (shards [1] down)" in caplog.text
        records = list(read_log(degrade.log_stem).values())
        assert [r["missing_shards"] for r in records] == [[1], [1]]
        info = degrade.get_model_info()["ttt_nn"]
        assert (info["degraded_documents"], info["missing_shards"]) == (2, [1])
        assert not list((tmp_path / "cache").glob("*.jsonl"))  # nothing degraded is cached

        servers[1] = start_shard_server(ServerConfig(two_shards, shards=(1,), port=servers[1].port))
        fail = make_lm(TTTNNLM, tmp_path, tiny_lm, spec, k=3, failure_policy="fail", max_neighbor_tokens=128)
        assert fail.log_stem == degrade.log_stem  # the policy does not change a score...
        scored = []
        original = fail.score_documents
        fail.score_documents = lambda docs, n: scored.extend(docs) or original(docs, n)
        lls = fail.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
        assert len(scored) == 2  # ... but degraded documents are scored again
        local = make_lm(TTTNNLM, tmp_path / "local", tiny_lm, two_shards, k=3, max_neighbor_tokens=128)
        assert lls == local.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
        assert all(not r["missing_shards"] for r in read_log(fail.log_stem).values())
    finally:
        for server in servers:
            server.process.kill()


def _cut_last_line(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])  # half a record, no newline


def test_truncated_log_and_cache_lines_are_skipped_and_the_next_append_replaces_them(tiny_lm, corpus_texts, test_docs,
                                                                                      tmp_path):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=2, max_neighbor_tokens=128)
    first = lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    (log_file,) = rank_files(lm.log_stem)
    (cache_file,) = (tmp_path / "cache").glob("*.jsonl")
    _cut_last_line(log_file)
    _cut_last_line(cache_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=2, max_neighbor_tokens=128)
        assert again.loglikelihood_rolling(requests(test_docs), disable_tqdm=True) == first
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedLineWarning)]
    assert any(m.startswith(f"{log_file}:3: truncated last record") for m in messages), messages
    assert any(m.startswith(f"{cache_file}:3: truncated last record") for m in messages), messages
    lines = log_file.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["results"] == [first[2]]  # the torn line gave way to it
    assert all(json.loads(line) for line in cache_file.read_text().splitlines()[3:])


def test_concurrent_runs_on_one_log_dir_score_each_document_once(tiny_lm, corpus_texts, test_docs, tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(TEST_TASKS.parent)!r})
from conftest import fake_lm, requests
from lm_eval_ttt.model import TTTNNLM
import json, pathlib
docs, texts = json.loads(pathlib.Path({str(tmp_path / 'docs.json')!r}).read_text())
lm = fake_lm(TTTNNLM, pathlib.Path({str(tmp_path)!r}), pathlib.Path({str(tiny_lm)!r}), texts, k=2,
             max_neighbor_tokens=128)
print(json.dumps(lm.loglikelihood_rolling(requests(docs), disable_tqdm=True)))
"""
    (tmp_path / "docs.json").write_text(json.dumps([test_docs, corpus_texts]))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    assert json.loads(outputs[0][0].splitlines()[-1]) == json.loads(outputs[1][0].splitlines()[-1])
    (log_file,) = (tmp_path / "logs").glob("*.rank0.jsonl")
    assert len(log_file.read_text().splitlines()) == len(test_docs)  # each document scored once
