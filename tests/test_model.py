import hashlib

import pytest
import torch
from conftest import fake_lm, requests, run, task_bits_per_byte

from lm_eval_ttt.documents import ROLLING, group_documents
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.retriever import RetrievalError
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.ttt import chunk_tokens


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_chunks_drop_one_token_tail_and_respect_cap():
    assert chunk_tokens(list(range(129)), 64) == [list(range(64)), list(range(64, 128))]
    assert chunk_tokens(list(range(130)), 64)[-1] == [128, 129]
    assert chunk_tokens(list(range(500)), 64, cap=100) == [list(range(64)), list(range(64, 100))]
    assert chunk_tokens([7], 64) == []


def test_ttt_lowers_bits_per_byte_and_restores_weights_exactly(tiny_lm, corpus_texts, test_docs, tmp_path):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=3, eval_at_k="0", lr=1e-3, max_neighbor_tokens=128)
    original = state_hash(lm.model)
    lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    assert state_hash(lm.model) == original
    assert len(lm.trainer.optimizer.state) == 0 and not lm.model.training
    records = list(read_log(lm.log_stem).values())
    assert len(records) == 3 and all(r["train_steps"] > 0 and len(r["neighbour_ids"]) == 3 for r in records)
    assert all(all(loss == loss for loss in sum(r["chunk_losses"], [])) for r in records)  # no NaN step
    base = sum(r["results_at_k"]["0"][0] for r in records)
    adapted = sum(r["results_at_k"]["3"][0] for r in records)
    assert adapted > base, (base, adapted)  # higher log-likelihood = lower bits per byte
    from lm_eval.models.huggingface import HFLM  # k=0 scores are the plain HFLM scores of the same weights

    plain = HFLM.loglikelihood_rolling(lm, requests(test_docs), disable_tqdm=True)
    by_text = {r["doc_key"]: r for r in records}
    assert [by_text[d.key]["results_at_k"]["0"][0] for d in group_documents(ROLLING, requests(test_docs))] == plain


def test_resume_reuses_finished_documents_with_identical_numbers(tiny_lm, corpus_texts, test_docs, tmp_path):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=2, max_neighbor_tokens=128)
    first = lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    (log_file,) = lm.log_stem.parent.glob(lm.log_stem.name + ".rank*.jsonl")
    lines = log_file.read_text().splitlines()
    assert len(lines) == 3
    log_file.write_text(lines[0] + "\n")  # as if interrupted after one document
    calls = []
    original = lm.score_documents
    lm.score_documents = lambda docs, n: calls.extend(docs) or original(docs, n)
    again = lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    assert again == first
    assert [c.text for c in calls] == test_docs[1:]
    assert len(log_file.read_text().splitlines()) == 3


def test_reset_optimizer_false_reproduces_the_reference_leak(tiny_lm, corpus_texts, test_docs, tmp_path):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, k=1, reset_optimizer=False, max_neighbor_tokens=128)
    lm.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    assert len(lm.trainer.optimizer.state) > 0  # Adam moments carried into the next document


def test_short_document_and_retriever_failure(tiny_lm, corpus_texts, test_docs, tmp_path):
    from fakes import FakeIndex

    index = FakeIndex(corpus_texts)
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, index=index, k=1, max_neighbor_tokens=128)
    lm.loglikelihood_rolling(requests(["x = 1"]), disable_tqdm=True)  # shorter than one chunk
    (record,) = read_log(lm.log_stem).values()
    assert len(record["neighbour_ids"]) == 1 and record["results"][0] < 0

    def unreachable(queries, k):
        raise ConnectionError("index unreachable")

    index.search = unreachable
    with pytest.raises(RetrievalError, match="retrieval failed.*index unreachable"):
        lm.loglikelihood_rolling(requests([test_docs[0]]), disable_tqdm=True)
    assert len(read_log(lm.log_stem)) == 1  # the failed document was not logged


def test_precision_bf16_runs_and_stays_close_to_fp32(tiny_lm, corpus_texts, test_docs, tmp_path):
    """bf16 autocast (fp32 master weights) on CPU: scores within 2% of fp32 bits per byte.
    bf16 keeps 8 bits of mantissa, so logits differ by ~0.4% per token; summed over a
    document the relative difference stays around a percent."""
    results = {}
    for precision in ("fp32", "bf16"):
        lm = fake_lm(TTTNNLM, tmp_path / precision, tiny_lm, corpus_texts, k=2, precision=precision, lr=1e-3,
                     max_neighbor_tokens=128)
        results[precision] = sum(lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True))
        assert lm.model.dtype == torch.float32  # master weights stay fp32
    assert results["bf16"] != results["fp32"]
    assert abs(results["bf16"] - results["fp32"]) <= 0.02 * abs(results["fp32"])


@pytest.mark.slow
def test_compile_runs_or_falls_back_with_a_warning(tiny_lm, corpus_texts, test_docs, tmp_path):
    eager = fake_lm(TTTNNLM, tmp_path / "eager", tiny_lm, corpus_texts, k=1)
    compiled = fake_lm(TTTNNLM, tmp_path / "compiled", tiny_lm, corpus_texts, k=1, compile=True)
    a = eager.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    b = compiled.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    assert a == pytest.approx(b, rel=1e-4)


@pytest.mark.slow
def test_stock_lm_eval_cli_k0_equals_hf_on_the_bundled_model(tmp_path):
    """The real bundled SmolLM2 through the real lm_eval executable, both ways (the default
    suite checks the same on every request type with the tiny model: test_harness_contract)."""
    from lm_eval_ttt.assets import bundled_lm_path, task_configs_dir

    common = ["--tasks", "ttt_stdlib_code", "--include_path", str(task_configs_dir() / "ttt"), "--limit", "2",
              "--device", "cpu", "--batch_size", "1"]
    lm = f"pretrained={bundled_lm_path()},max_length=64"
    run("lm_eval", "--model", "hf", "--model_args", lm, *common, "--output_path", str(tmp_path / "hf"))
    run("lm_eval", "--model", "ttt-nn", "--model_args", f"{lm},k=0", *common, "--output_path", str(tmp_path / "ttt"))
    hf, ttt = (task_bits_per_byte(tmp_path / n, "ttt_stdlib_code") for n in ("hf", "ttt"))
    assert abs(ttt - hf) <= 1e-6 * hf, (ttt, hf)
