"""Parameter-efficient TTT: adapters through peft, many documents per batch."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import fake_lm, make_lm, requests
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_ttt.documents import GENERATE, LOGLIKELIHOOD, ROLLING, group_documents
from lm_eval_ttt.lora import BatchedLoRATrainer
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.settings import ModelArgumentError

# doc_batch=B equals doc_batch=1 to float rounding, not bit for bit: batched matmuls and a
# hand-written AdamW round in another order than peft's layers and torch's AdamW. Measured:
# at most 7e-8 relative per document (8 documents, k=5, lr=1e-2); 1e-5 leaves room for
# other BLAS builds.
BATCH_TOLERANCE = 1e-5


def base_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            digest.update(name.removeprefix("base_model.model.").replace(".base_layer", "").encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def lora(tmp_path, tiny_lm, texts, **kw):
    args = dict(k=3, adapter="lora", lora_r=4, lr=1e-2, eval_at_k="0", max_neighbor_tokens=96)
    args.update(kw)
    return fake_lm(TTTNNLM, tmp_path, tiny_lm, texts, **args)


def test_adapters_start_as_the_base_model_and_never_write_it(tiny_lm, corpus_texts, test_docs, tmp_path):
    plain = make_lm(TTTNNLM, tmp_path / "plain", tiny_lm, None, k=0)
    before = base_hash(plain.model)
    lm = lora(tmp_path, tiny_lm, corpus_texts)
    assert sum(p.numel() for p in lm.model.parameters() if p.requires_grad) < 0.1 * sum(
        p.numel() for p in lm.model.parameters())
    assert not any(p.requires_grad for n, p in lm.model.named_parameters() if "lora_" not in n)
    initial = {n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}
    lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    records = list(read_log(lm.log_stem).values())
    hf = HFLM.loglikelihood_rolling(plain, requests(test_docs), disable_tqdm=True)
    by_key = {r["doc_key"]: r for r in records}
    docs = group_documents(ROLLING, requests(test_docs))
    k0 = [by_key[d.key]["results_at_k"]["0"][0] for d in docs]
    assert k0 == pytest.approx(hf, rel=1e-6)  # zero-initialised B: adapters change nothing until trained
    assert all(by_key[d.key]["results"] != by_key[d.key]["results_at_k"]["0"] for d in docs)  # training does
    assert base_hash(lm.model) == before  # the base weights are never written
    after = {n: p.detach() for n, p in lm.model.named_parameters() if p.requires_grad}
    assert all(torch.equal(after[n], initial[n]) for n in initial)  # reset = the initial adapters
    assert len(lm.trainer.optimizer.state) == 0
    fresh = lora(tmp_path / "fresh", tiny_lm, corpus_texts)  # the same seed gives the same fresh adapters
    assert all(torch.equal(p, initial[n]) for n, p in fresh.model.named_parameters() if p.requires_grad)


def test_doc_batch_equals_doc_batch_one(tiny_lm, small_index, test_docs, default_corpus, tmp_path):
    """The real LoRA run: MiniLM retrieval from a Faiss index, adapters through peft."""
    import json

    texts = [json.loads(line)["text"] for line in open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8")]
    docs = [t for t in texts if 300 < len(t) < 4000][:5]  # 5 documents: a batch of 4 and one of 1
    args = dict(k=3, adapter="lora", lora_r=4, lr=1e-2, eval_at_k="0:2", max_neighbor_tokens=96)
    one = make_lm(TTTNNLM, tmp_path / "one", tiny_lm, small_index, **args)
    four = make_lm(TTTNNLM, tmp_path / "four", tiny_lm, small_index, **args, doc_batch=4)
    assert isinstance(four.trainer, BatchedLoRATrainer)
    assert one.log_stem.name == four.log_stem.name  # doc_batch does not change a score (beyond rounding)
    a = one.loglikelihood_rolling(requests(docs), disable_tqdm=True)
    b = four.loglikelihood_rolling(requests(docs), disable_tqdm=True)
    assert a == pytest.approx(b, rel=BATCH_TOLERANCE)
    assert a != pytest.approx(HFLM.loglikelihood_rolling(one, requests(docs), disable_tqdm=True), rel=1e-6)
    records_one, records_four = read_log(one.log_stem), read_log(four.log_stem)
    for key, r in records_one.items():
        assert r["results_at_k"]["0"][0] == pytest.approx(records_four[key]["results_at_k"]["0"][0], rel=1e-6)
        losses_one = [x for n in r["chunk_losses"] for x in n]
        losses_four = [x for n in records_four[key]["chunk_losses"] for x in n]
        assert losses_one == pytest.approx(losses_four, rel=BATCH_TOLERANCE)
    assert sorted(r["doc_batch"] for r in records_four.values()) == [1, 4, 4, 4, 4]
    calls = []
    four.score_documents = lambda docs, n: calls.append(docs)  # a rerun resumes from the log
    assert four.loglikelihood_rolling(requests(docs), disable_tqdm=True) == b and calls == []
    adapters = four.trainer.adapters  # after the batches: adapters and Adam as freshly initialised
    assert all(torch.equal(p, saved) for p, saved in zip(adapters.parameters(), adapters.initial))
    assert all(not m.any() and not v.any() for m, v in four.trainer.optimizer.state)
    assert not four.trainer.optimizer.steps.any()


@pytest.mark.parametrize("args", [{}, {"doc_batch": 2}, {"adapter": "none", "lr": 1e-4}],
                         ids=["lora", "lora doc_batch=2", "full TTT"])
def test_gradient_checkpointing_recomputes_the_same_scores(tiny_lm, corpus_texts, test_docs, tmp_path, args):
    """Checkpointing trades memory for recomputation only (bench_lora measures the memory):
    the recomputed forward must see the same adapters (for doc_batch, the same slot per row)."""
    docs = test_docs[:2]
    plain = lora(tmp_path / "plain", tiny_lm, corpus_texts, **args)
    checkpointed = lora(tmp_path / "ckpt", tiny_lm, corpus_texts, gradient_checkpointing=True, **args)
    def checkpointing(lm):
        return any(getattr(m, "gradient_checkpointing", False) for m in lm.model.modules())

    assert checkpointing(checkpointed) and not checkpointing(plain)
    a = plain.loglikelihood_rolling(requests(docs), disable_tqdm=True)
    b = checkpointed.loglikelihood_rolling(requests(docs), disable_tqdm=True)
    assert b == pytest.approx(a, rel=BATCH_TOLERANCE)
    assert a != pytest.approx(HFLM.loglikelihood_rolling(plain, requests(docs), disable_tqdm=True), rel=1e-6)


def test_doc_batch_answers_every_request_type(tiny_lm, corpus_texts, tmp_path):
    mc = [Instance(LOGLIKELIHOOD, {}, ("Question: which module parses JSON?\nAnswer:", c), 0, metadata=("mc", d, 1))
          for d in range(3) for c in (" json", " os")]
    gen = [Instance(GENERATE, {}, (f"def f{d}(a, b):\n    return", {"until": ["\n"], "max_gen_toks": 5}), 0,
                    metadata=("gen", d, 1)) for d in range(3)]
    one = lora(tmp_path / "one", tiny_lm, corpus_texts)
    four = lora(tmp_path / "four", tiny_lm, corpus_texts, doc_batch=4)
    lls_one, lls_four = one.loglikelihood(mc), four.loglikelihood(mc)
    assert [x[0] for x in lls_four] == pytest.approx([x[0] for x in lls_one], rel=BATCH_TOLERANCE)
    assert four.generate_until(gen) == one.generate_until(gen)


def test_bad_adapter_settings_are_clear_errors(tiny_lm, corpus_texts, tmp_path):
    with pytest.raises(ModelArgumentError, match="doc_batch > 1 needs adapter=lora"):
        fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, doc_batch=4)
    with pytest.raises(ModelArgumentError, match="adapter=lora: peft cannot adapt LlamaForCausalLM"):
        lora(tmp_path, tiny_lm, corpus_texts, lora_targets="no_such_layer")
    with pytest.raises(ModelArgumentError, match="cannot be combined with peft="):
        lora(tmp_path, tiny_lm, corpus_texts, peft="some-adapter")


def test_doc_batch_refuses_dropout(tiny_lm, corpus_texts, tmp_path):
    """A batch draws dropout masks for all its documents at once: a score would depend on
    which documents share the batch, so resumes and rank counts would change the numbers."""
    import json
    import shutil

    with pytest.raises(ModelArgumentError, match=r"doc_batch > 1 needs dropout off \(lora_dropout=0.1\)"):
        lora(tmp_path, tiny_lm, corpus_texts, doc_batch=4, lora_dropout=0.1)
    dropping = tmp_path / "dropping"
    shutil.copytree(tiny_lm, dropping)
    config = json.loads((dropping / "config.json").read_text())
    (dropping / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    with pytest.raises(ModelArgumentError, match="the model's dropout is 0.1"):
        lora(tmp_path, dropping, corpus_texts, doc_batch=4)
    lora(tmp_path, dropping, corpus_texts, doc_batch=1)  # one document at a time is fine
    (dropping / "config.json").write_text(json.dumps({**config, "classifier_dropout": 0.1}))
    lora(tmp_path, dropping, corpus_texts, doc_batch=4)  # a classification head's rate is not the LM's


def test_adapter_settings_change_the_identity(tiny_lm, corpus_texts, tmp_path):
    base = lora(tmp_path, tiny_lm, corpus_texts)
    assert lora(tmp_path, tiny_lm, corpus_texts).log_stem == base.log_stem
    for change in ({"lora_r": 8}, {"lora_alpha": 8.0}, {"lora_targets": "q_proj:v_proj"}, {"adapter": "none"}):
        assert lora(tmp_path, tiny_lm, corpus_texts, **change).log_stem != base.log_stem, change
