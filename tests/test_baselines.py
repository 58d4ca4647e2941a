import json
import math

import pytest

from conftest import requests
from lm_eval.models.huggingface import HFLM

N_DOCS = 3


@pytest.fixture(scope="module")
def docs(default_corpus):
    with open(default_corpus / "stdlib_code.test.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [t for t in texts if 300 < len(t) < 3000][:N_DOCS]


def make(cls, tmp_path, **kw):
    return cls(max_length=64, log_dir=str(tmp_path / "logs"), neighbour_cache=str(tmp_path / "cache"),
               device="cpu", batch_size=1, **kw)


def bits_per_byte(lls, texts):
    return -sum(lls) / sum(len(t.encode()) for t in texts) / math.log(2)


@pytest.mark.parametrize("name, kwargs", [
    ("InContextLM", {"k": 0}),
    ("InterpolationLM", {"k": 3, "lambda": 0.0}),
    ("DynamicEvalLM", {"iterations": 0}),
])
def test_baseline_with_nothing_to_add_equals_hf(default_index, docs, tmp_path, name, kwargs):
    from lm_eval_ttt import baselines

    model = make(getattr(baselines, name), tmp_path, **kwargs)
    ours = bits_per_byte(model.loglikelihood_rolling(requests(docs), disable_tqdm=True), docs)
    hf = bits_per_byte(HFLM.loglikelihood_rolling(model, requests(docs), disable_tqdm=True), docs)
    assert abs(ours - hf) <= 1e-6 * hf, (ours, hf)


@pytest.mark.parametrize("name, kwargs", [
    ("InContextLM", {"k": 3}),
    ("InterpolationLM", {"k": 3, "lambda": 0.2}),
    ("DynamicEvalLM", {"iterations": 1}),
])
def test_baselines_change_scores_and_leave_weights_alone(default_index, docs, tmp_path, name, kwargs):
    from lm_eval_ttt import baselines

    from test_model import state_hash

    model = make(getattr(baselines, name), tmp_path, **kwargs)
    before = state_hash(model.model)
    ours = model.loglikelihood_rolling(requests(docs), disable_tqdm=True)
    hf = HFLM.loglikelihood_rolling(model, requests(docs), disable_tqdm=True)
    assert all(math.isfinite(x) for x in ours)
    assert ours != hf
    assert state_hash(model.model) == before


def test_in_context_keeps_the_document_whole_and_the_nearest_neighbour_adjacent(default_index, docs, tmp_path):
    from lm_eval_ttt.baselines import InContextLM

    model = make(InContextLM, tmp_path, k=2, context_tokens=24)
    tok = lambda s: model.tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    nearest, farther = "def nearest_neighbour(): return 'closest text'", "class Farther:\n    pass\n" * 3
    context = model.neighbour_context([nearest, farther])
    assert len(context) == 24
    assert context[-len(tok(nearest)) - 1:] == tok(nearest) + [model.eot_token_id]  # adjacent to the document
    assert context[: -len(tok(nearest)) - 1] == (tok(farther) + [model.eot_token_id])[-(23 - len(tok(nearest))):]
    windows = model.context_windows(docs[0], [nearest, farther])
    assert sum((cont for _, cont in windows), []) == model.tok_encode(docs[0])  # every document token, once
    assert all(len(ctx) + len(cont) <= model.max_length + 1 for ctx, cont in windows)
    assert all(ctx[:24] == context for ctx, _ in windows)
    first_ctx = windows[0][0]
    assert first_ctx[24:] == [model.prefix_token_id]  # the document starts right after the nearest neighbour
