"""Small defects a new user met, each pinned by the test that failed before its fix."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
from conftest import fake_lm, make_lm, requests

from lm_eval_ttt.jsonl import SkippedLineWarning, append_record, read_records
from lm_eval_ttt.settings import ModelArgumentError


def test_the_embedding_progress_moves_with_every_encoder_batch(small_corpus, tmp_path, monkeypatch):
    """It moved once per 4,096 documents: a bundled-size index sat at 0% for its whole build."""
    import tqdm.auto

    from index_server.embed import EmbedConfig, run_embed
    from index_server.encoder import EncoderConfig

    updates: dict[str, list[int]] = {}
    real = tqdm.auto.tqdm

    class Recording(real):
        def update(self, n=1):
            updates.setdefault(self.desc, []).append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    encoder = EncoderConfig(max_tokens=16, batch_size=32)
    run_embed(EmbedConfig(corpus=(small_corpus,), output=tmp_path / "emb", encoder=encoder, num_parts=1))
    n_docs = sum(1 for line in small_corpus.open() if line.strip())
    steps = updates["embed documents"]
    assert sum(steps) == n_docs and len(steps) >= n_docs // 32 and max(steps) <= 32


def test_a_method_that_retrieves_nothing_says_so_in_its_log(tiny_lm, corpus_texts, test_docs, tmp_path):
    """ttt-nn-dyneval logged stop_reason "no candidates", as if a search had come back empty."""
    from lm_eval_ttt.baselines import DynamicEvalLM
    from lm_eval_ttt.model import TTTNNLM
    from lm_eval_ttt.runlog import read_log

    dyneval = make_lm(DynamicEvalLM, tmp_path / "d", tiny_lm, None, iterations=1, lr=1e-3)
    dyneval.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    (record,) = read_log(dyneval.log_stem).values()
    assert record["stop_reason"] == "no retrieval: ttt-nn-dyneval uses no neighbours"
    k0 = fake_lm(TTTNNLM, tmp_path / "k0", tiny_lm, corpus_texts, k=0)
    k0.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    (record,) = read_log(k0.log_stem).values()
    assert record["stop_reason"] == "k=0: nothing retrieved"


@pytest.mark.parametrize("index, message", [("/nonexistent", "index=/nonexistent: no such index directory"),
                                            ("grpc://localhost", "index=bad server address 'localhost'")])
def test_a_bad_index_is_an_error_before_the_weights_load(tiny_lm, tmp_path, monkeypatch, index, message):
    """index=/nonexistent surfaced only after from_pretrained (minutes for a large model)."""
    from lm_eval.models.huggingface import HFLM

    from lm_eval_ttt.model import TTTNNLM

    @functools.wraps(HFLM.__init__)  # the signature stays: the arguments are checked against it
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the index was checked")

    monkeypatch.setattr(HFLM, "__init__", never)
    with pytest.raises(ModelArgumentError, match=message):
        TTTNNLM(pretrained=str(tiny_lm), index=index, k=2, device="cpu")


def test_a_truncated_line_is_reported_in_a_whole_sentence(tmp_path, capsys):
    from conftest import cli

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a whole document"}\n{"text": "cut off in the mid\n')
    proc = cli(capsys, "ttt-index", "build", str(corpus), "--out", str(tmp_path / "idx"), check=False)
    assert proc.returncode == 2
    assert f"{corpus}:2: invalid JSON: unterminated string starting at column 10 (a truncated line?)" in proc.stderr


def test_a_client_without_a_token_is_told_none_was_sent(small_index):
    from index_server.client import GrpcIndex, ShardUnavailableError
    from index_server.options import IndexOptions
    from index_server.server import ServerConfig, start_server

    server, port, _ = start_server(ServerConfig(index=small_index, port=0, token="s3cret"))
    try:
        with pytest.raises(ShardUnavailableError) as error:
            GrpcIndex((f"127.0.0.1:{port}",), IndexOptions(retries=0))
        message = str(error.value)
        assert "the server requires a bearer token and none was sent" in message
        assert "index_token_file=" in message and "$TTT_NN_INDEX_TOKEN" in message
    finally:
        server.stop(0)


def test_a_torn_last_line_is_warned_about_once_and_removed_by_the_next_append(tmp_path):
    """It was skipped on resume but warned about again on every later read of the log. A whole
    last record that only lacks its newline is a record: it is kept."""
    path = tmp_path / "log.jsonl"
    path.write_text(json.dumps({"doc_key": "a"}) + "\n" + '{"doc_key": "b", "resu')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert read_records(path) == [{"doc_key": "a"}]
    torn = [w for w in caught if issubclass(w.category, SkippedLineWarning)]
    assert len(torn) == 1 and str(torn[0].message).startswith(f"{path}:2: truncated last record")
    append_record(path, {"doc_key": "c"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"doc_key": "a"}, {"doc_key": "c"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["doc_key"] for r in read_records(Path(path))] == ["a", "c"]
    path.write_text(json.dumps({"doc_key": "a"}))  # whole, no newline
    append_record(path, {"doc_key": "b"})
    assert [r["doc_key"] for r in read_records(path)] == ["a", "b"]
