import hashlib
import json

import pytest
import torch

from conftest import requests, run
from index_server.server import ServerConfig, start_server
from lm_eval_ttt.retriever import RetrievalError
from lm_eval_ttt.ttt import chunk_tokens

N_DOCS = 3


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def test_docs(default_corpus):
    with open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return [d for d in docs if 300 < len(d) < 3000][:N_DOCS]


def make_model(tmp_path, index=None, **kw):
    from lm_eval_ttt.model import TTTNNLM

    args = dict(k=5, max_length=64, max_neighbor_tokens=128, log_dir=str(tmp_path / "logs"),
                neighbour_cache=str(tmp_path / "cache"), device="cpu", batch_size=1)
    args.update(kw)
    return TTTNNLM(index=None if index is None else str(index), **args)


@pytest.fixture(scope="module")
def ttt_model(default_index, tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ttt"), eval_at_k="0:5")


def test_chunks_drop_one_token_tail_and_respect_cap():
    assert chunk_tokens(list(range(129)), 64) == [list(range(64)), list(range(64, 128))]
    assert chunk_tokens(list(range(130)), 64)[-1] == [128, 129]
    assert chunk_tokens(list(range(500)), 64, cap=100) == [list(range(64)), list(range(64, 100))]
    assert chunk_tokens([7], 64) == []


def test_ttt_lowers_bits_per_byte_and_restores_weights_exactly(ttt_model, test_docs):
    original = state_hash(ttt_model.model)
    records = []
    for request in requests(test_docs):
        records.append(ttt_model.score_document(request))
        assert state_hash(ttt_model.model) == original
        assert len(ttt_model.trainer.optimizer.state) == 0
        assert not ttt_model.model.training
    assert all(r["train_steps"] > 0 and r["neighbours_found"] == 5 for r in records)
    assert all(all(l == l for l in sum(r["chunk_losses"], [])) for r in records)  # no NaN step
    base = sum(r["loglikelihood_at_k"]["0"] for r in records)
    adapted = sum(r["loglikelihood_at_k"]["5"] for r in records)
    assert adapted > base, (base, adapted)  # higher log-likelihood = lower bits per byte
    # k=0 scores are the plain HFLM scores of the same weights
    from lm_eval.models.huggingface import HFLM

    plain = HFLM.loglikelihood_rolling(ttt_model, requests(test_docs), disable_tqdm=True)
    assert [r["loglikelihood_at_k"]["0"] for r in records] == plain


def test_resume_reuses_finished_documents_with_identical_numbers(default_index, test_docs, tmp_path):
    model = make_model(tmp_path, k=2)
    first = model.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    lines = model.log_path.read_text().splitlines()
    assert len(lines) == N_DOCS
    model.log_path.write_text(lines[0] + "\n")  # as if interrupted after one document
    calls = []
    original = model.score_document
    model.score_document = lambda req: calls.append(req) or original(req)
    again = model.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    assert again == first
    assert [c.args[0] for c in calls] == test_docs[1:]
    assert len(model.log_path.read_text().splitlines()) == N_DOCS


def test_reset_optimizer_false_reproduces_the_reference_leak(default_index, test_docs, tmp_path):
    model = make_model(tmp_path, k=1, reset_optimizer=False)
    model.score_document(requests(test_docs[:1])[0])
    assert len(model.trainer.optimizer.state) > 0  # Adam moments carried into the next document


def test_short_document_and_retriever_failure(default_index, test_docs, tmp_path):
    server, port, _ = start_server(ServerConfig(index=default_index))
    model = make_model(tmp_path, k=1, index=f"grpc://127.0.0.1:{port}", retrieval_timeout=2)
    record = model.score_document(requests(["x = 1"])[0])  # shorter than one chunk
    assert record["neighbours_found"] == 1 and record["loglikelihood"] < 0
    server.stop(0)
    with pytest.raises(RetrievalError, match="retrieval failed for document"):
        model.loglikelihood_rolling(requests([test_docs[0]]), disable_tqdm=True)
    assert test_docs[0] not in model.log_path.read_text()


def _bits_per_byte(output_dir):
    results = sorted(output_dir.rglob("results_*.json"))[-1]
    return json.loads(results.read_text())["results"]["ttt_stdlib_code"]["bits_per_byte,none"]


def test_stock_lm_eval_cli_runs_ttt_nn_and_k0_equals_hf(default_index, tmp_path):
    from lm_eval_ttt.assets import bundled_lm_path
    from lm_eval_ttt.cli import task_configs_dir

    common = ["--tasks", "ttt_stdlib_code", "--include_path", str(task_configs_dir()), "--limit", "2",
              "--device", "cpu", "--batch_size", "1"]
    lm = f"pretrained={bundled_lm_path()},max_length=64"
    run("lm_eval", "--model", "hf", "--model_args", lm, *common, "--output_path", str(tmp_path / "hf"))
    run("lm_eval", "--model", "ttt-nn", "--model_args", f"{lm},k=0,log_dir={tmp_path / 'logs'}", *common,
        "--output_path", str(tmp_path / "ttt"))
    hf, ttt = _bits_per_byte(tmp_path / "hf"), _bits_per_byte(tmp_path / "ttt")
    assert abs(ttt - hf) <= 1e-6 * hf, (ttt, hf)
