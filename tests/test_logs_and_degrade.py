"""Crash safety and honesty of the harness side (issue 9): degraded answers are never reused
silently, broken log and cache lines do not break later runs, concurrent runs on one log
directory score each document once, and protected servers are reachable from --model_args."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings

import pytest

from conftest import TEST_TASKS, build_small, make_lm, requests, run
from index_server.server import ServerConfig, start_server
from lm_eval_ttt.jsonl import SkippedLineWarning
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.runlog import rank_files, read_log


@pytest.fixture(scope="module")
def two_shards(small_corpus, tmp_path_factory):
    return build_small(small_corpus, tmp_path_factory.mktemp("two") / "idx", shards=2)


def test_degraded_answer_is_logged_counted_warned_never_cached_and_rescored(tiny_lm, two_shards, test_docs,
                                                                             tmp_path, caplog):
    from test_grpc import _serve

    servers = [_serve(two_shards, i) for i in range(2)]  # real processes, really killed
    spec = "grpc://" + "+".join(address for _, address in servers)
    degrade = make_lm(TTTNNLM, tmp_path, tiny_lm, spec, k=3, failure_policy="degrade", retrieval_timeout=2)
    servers[1][0].kill()  # shard 1 dies during the run
    servers[1][0].wait()
    with caplog.at_level(logging.WARNING, logger="lm_eval_ttt"):
        degrade.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
    assert "2 of 2 documents were scored from degraded retrievals (shards [1] down)" in caplog.text
    records = list(read_log(degrade.log_stem).values())
    assert [r["missing_shards"] for r in records] == [[1], [1]]
    info = degrade.get_model_info()["ttt_nn"]
    assert (info["degraded_documents"], info["missing_shards"]) == (2, [1])
    assert not list((tmp_path / "cache").glob("*.jsonl"))  # nothing degraded is cached

    servers[1] = _serve(two_shards, 1, port=int(servers[1][1].rsplit(":", 1)[1]))
    try:
        fail = make_lm(TTTNNLM, tmp_path, tiny_lm, spec, k=3, failure_policy="fail")
        assert fail.log_stem == degrade.log_stem  # the policy does not change a score...
        scored = []
        original = fail.score_documents
        fail.score_documents = lambda docs, n: scored.extend(docs) or original(docs, n)
        lls = fail.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
        assert len(scored) == 2  # ... but degraded documents are scored again
        local = make_lm(TTTNNLM, tmp_path / "local", tiny_lm, two_shards, k=3)
        assert lls == local.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
        assert all(not r["missing_shards"] for r in read_log(fail.log_stem).values())
    finally:
        for proc, _ in servers:
            proc.kill()


def _cut_last_line(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - len(data.splitlines()[-1]) // 2 - 1])  # half a record, no newline


def test_truncated_log_and_cache_lines_are_skipped_and_appends_start_on_a_fresh_line(tiny_lm, small_index, test_docs,
                                                                                      tmp_path):
    lm = make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, k=2)
    first = lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    (log_file,) = rank_files(lm.log_stem)
    (cache_file,) = (tmp_path / "cache").glob("*.jsonl")
    _cut_last_line(log_file)
    _cut_last_line(cache_file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = make_lm(TTTNNLM, tmp_path, tiny_lm, small_index, k=2)
        assert again.loglikelihood_rolling(requests(test_docs), disable_tqdm=True) == first
    messages = [str(w.message) for w in caught if issubclass(w.category, SkippedLineWarning)]
    assert any(m.startswith(f"{log_file}:3: truncated last record") for m in messages), messages
    assert any(m.startswith(f"{cache_file}:3: truncated last record") for m in messages), messages
    lines = log_file.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["results"] == [first[2]]  # not glued onto the broken line
    assert all(json.loads(line) for line in cache_file.read_text().splitlines()[3:])


def test_concurrent_runs_on_one_log_dir_score_each_document_once(tiny_lm, small_index, test_docs, tmp_path):
    script = f"""
import sys
sys.path.insert(0, {str(TEST_TASKS.parent)!r})
from conftest import make_lm, requests
from lm_eval_ttt.model import TTTNNLM
import json, pathlib
docs = json.loads(pathlib.Path({str(tmp_path / 'docs.json')!r}).read_text())
lm = make_lm(TTTNNLM, pathlib.Path({str(tmp_path)!r}), pathlib.Path({str(tiny_lm)!r}), {str(small_index)!r}, k=2)
print(json.dumps(lm.loglikelihood_rolling(requests(docs), disable_tqdm=True)))
"""
    (tmp_path / "docs.json").write_text(json.dumps(test_docs))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outputs]
    assert json.loads(outputs[0][0].splitlines()[-1]) == json.loads(outputs[1][0].splitlines()[-1])
    (log_file,) = (tmp_path / "logs").glob("*.rank0.jsonl")
    assert len(log_file.read_text().splitlines()) == len(test_docs)  # each document scored once


@pytest.fixture(scope="module")
def protected(small_index, tmp_path_factory):
    """A token-protected server, and a token-protected TLS server with a self-signed CA."""
    from test_grpc import make_cert

    tmp = tmp_path_factory.mktemp("protected")
    cert, key = make_cert(tmp)
    (tmp / "token").write_text("right-token\n")
    (tmp / "wrong").write_text("wrong-token\n")
    plain = start_server(ServerConfig(index=small_index, token="right-token"))
    tls = start_server(ServerConfig(index=small_index, token="right-token", tls_cert=cert, tls_key=key))
    yield tmp, cert, plain[1], tls[1]
    plain[0].stop(0)
    tls[0].stop(0)


@pytest.mark.parametrize("case", ["token", "wrong token", "token over TLS"])
def test_lm_eval_reaches_token_and_tls_protected_servers(tiny_lm, protected, tmp_path, case):
    tmp, cert, plain_port, tls_port = protected
    port = tls_port if "TLS" in case else plain_port
    token = tmp / ("wrong" if case == "wrong token" else "token")
    args = (f"pretrained={tiny_lm},max_length=64,k=2,index=grpc://127.0.0.1:{port},index_token_file={token},"
            f"retrieval_timeout=5,neighbour_cache={tmp_path / 'cache'}" + (f",index_tls_ca={cert}" if "TLS" in case else ""))
    proc = run("lm_eval", "--model", "ttt-nn", "--model_args", args, "--tasks", "ttt_test_mc", "--include_path",
               str(TEST_TASKS), "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path), check=False)
    if case == "wrong token":
        assert proc.returncode != 0 and "the server refused the bearer token" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "right-token" not in next(tmp_path.rglob("results_*.json")).read_text()  # the secret is never logged
