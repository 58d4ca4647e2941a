import math

import pytest
from conftest import fake_lm, requests
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from test_model import state_hash

from lm_eval_ttt import baselines
from lm_eval_ttt.documents import GENERATE, LOGLIKELIHOOD, ROLLING, group_documents
from lm_eval_ttt.metrics import bits_per_byte, utf8_bytes

MC = [Instance(LOGLIKELIHOOD, {}, ("Question: which module parses JSON?\nAnswer:", c), 0, metadata=("mc", 0, 1))
      for c in (" json", " os", " re")]
GEN = [Instance(GENERATE, {}, ("def add(a, b):\n    return", {"until": ["\n"], "max_gen_toks": 6}), 0,
                metadata=("gen", 0, 1))]


@pytest.mark.parametrize("name, kwargs", [
    ("InContextLM", {"k": 0}),
    ("InterpolationLM", {"k": 3, "lambda": 0.0}),
    ("DynamicEvalLM", {"iterations": 0}),
])
def test_baseline_with_nothing_to_add_equals_hf(tiny_lm, corpus_texts, test_docs, tmp_path, name, kwargs):
    model = fake_lm(getattr(baselines, name), tmp_path, tiny_lm, corpus_texts, **kwargs)
    ours = bits_per_byte(model.loglikelihood_rolling(requests(test_docs), disable_tqdm=True), utf8_bytes(test_docs))
    hf = bits_per_byte(HFLM.loglikelihood_rolling(model, requests(test_docs), disable_tqdm=True), utf8_bytes(test_docs))
    assert abs(ours - hf) <= 1e-6 * hf, (ours, hf)
    if name != "DynamicEvalLM":  # the request types it supports beyond rolling
        ours, hf = model.loglikelihood(MC), HFLM.loglikelihood(model, MC, disable_tqdm=True)
        assert [x[0] for x in ours] == pytest.approx([x[0] for x in hf], rel=1e-6)
        assert [x[1] for x in ours] == [x[1] for x in hf]
    if name == "InContextLM":
        assert model.generate_until(GEN) == HFLM.generate_until(model, GEN, disable_tqdm=True)


@pytest.mark.parametrize("name, kwargs", [
    ("InContextLM", {"k": 3}),
    ("InterpolationLM", {"k": 3, "lambda": 0.2}),
    ("DynamicEvalLM", {"iterations": 1, "lr": 1e-3}),
])
def test_baselines_change_scores_and_leave_weights_alone(tiny_lm, corpus_texts, test_docs, tmp_path, name, kwargs):
    model = fake_lm(getattr(baselines, name), tmp_path, tiny_lm, corpus_texts, **kwargs)
    before = state_hash(model.model)
    ours = model.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    hf = HFLM.loglikelihood_rolling(model, requests(test_docs), disable_tqdm=True)
    assert all(math.isfinite(x) for x in ours)
    assert ours != hf
    assert state_hash(model.model) == before
    if name == "InContextLM":  # neighbours before the question's context change every choice's score
        assert [x[0] for x in model.loglikelihood(MC)] != [x[0] for x in HFLM.loglikelihood(model, MC,
                                                                                            disable_tqdm=True)]


def test_in_context_keeps_the_document_whole_and_the_nearest_neighbour_adjacent(tiny_lm, corpus_texts, test_docs,
                                                                                 tmp_path):
    from lm_eval_ttt.retriever import Neighbours

    model = fake_lm(baselines.InContextLM, tmp_path, tiny_lm, corpus_texts, k=2, context_tokens=24)
    tok = lambda s: model.tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    nearest, farther = "def nearest_neighbour(): return 'closest text'", "class Farther:\n    pass\n" * 3
    context = model.neighbour_context([nearest, farther])
    assert len(context) == 24
    assert context[-len(tok(nearest)) - 1:] == tok(nearest) + [model.eot_token_id]  # adjacent to the document
    assert context[: -len(tok(nearest)) - 1] == (tok(farther) + [model.eot_token_id])[-(23 - len(tok(nearest))):]
    scored = []
    score = model.score_windows
    model.score_windows = lambda pairs: scored.append(pairs) or score(pairs)
    (document,) = group_documents(ROLLING, requests(test_docs[:1]))
    model.score_document(document, Neighbours([0, 1], [0.0, 1.0], [nearest, farther]))
    (windows,) = scored  # the pairs the document was scored with
    assert sum((cont for _, cont in windows), []) == model.tok_encode(test_docs[0])  # every document token, once
    assert all(len(ctx) + len(cont) <= model.max_length + 1 for ctx, cont in windows)
    assert all(ctx[:24] == context for ctx, _ in windows)
    assert windows[0][0][24:] == [model.prefix_token_id]  # the document starts right after the nearest neighbour


def test_dyneval_trains_between_windows_only(tiny_lm, corpus_texts, test_docs, tmp_path):
    """Training after the last window could change no score: it is neither spent nor counted."""
    model = fake_lm(baselines.DynamicEvalLM, tmp_path, tiny_lm, corpus_texts, iterations=2, lr=1e-3)
    calls = []
    train = model.trainer.train
    model.trainer.train = lambda documents, lr=None: calls.append(len(documents[0])) or train(documents, lr)
    doc = max(test_docs, key=len)
    windows = model.windows(doc)
    assert len(windows) > 1
    model.loglikelihood_rolling(requests([doc]), disable_tqdm=True)
    assert calls == [1] * (2 * (len(windows) - 1))  # 2 iterations after each window but the last


def test_dyneval_does_not_count_fp16_steps_the_scaler_skipped(tiny_lm, corpus_texts, test_docs, tmp_path):
    """A step skipped on fp16 overflow takes no step: the log counted it as a gradient step."""
    import torch

    from lm_eval_ttt.runlog import read_log

    model = fake_lm(baselines.DynamicEvalLM, tmp_path, tiny_lm, corpus_texts, iterations=1, lr=1e-3, precision="fp16")
    model.trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # every early step overflows
    doc = max(test_docs, key=len)
    windows = len(model.windows(doc))
    model.loglikelihood_rolling(requests([doc]), disable_tqdm=True)
    (record,) = read_log(model.log_stem).values()
    assert record["skipped_steps"] == windows - 1
    assert record["train_steps"] == 0
