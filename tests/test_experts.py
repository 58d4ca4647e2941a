"""Amortised test-time training: experts built per cluster, merged exactly, used by ttt-nn."""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import TEST_TASKS, cli, fake_lm, make_lm, requests, run
from fakes import FakeIndex

from lm_eval_ttt.experts import (
    MANIFEST,
    ExpertChoice,
    Experts,
    ExpertsError,
    ExpertsManifest,
    expert_file,
    merge_weights,
)
from lm_eval_ttt.experts_build import load_model, train_experts
from lm_eval_ttt.harness import model_fingerprint
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.settings import ExpertsSettings, ModelArgumentError
from lm_eval_ttt.ttt import chunk_tokens

SETTINGS = ExpertsSettings(clusters=3, docs_per_expert=4, lr=1e-2, lora_r=4, max_length=64, max_doc_tokens=96)


def state_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def fake_index(corpus_texts):
    return FakeIndex(corpus_texts[:120])


@pytest.fixture(scope="module")
def built(tiny_lm, fake_index, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts") / "experts"
    model, tokenizer = load_model(str(tiny_lm))
    manifest = train_experts(fake_index, out, SETTINGS, model, tokenizer, str(tiny_lm), progress=False)
    return out, manifest


def test_merge_weights_are_a_stable_softmax_over_the_top_cosines():
    choice = merge_weights(np.array([0.1, 0.9, 0.5, 0.9]), top=3, temperature=1e-4)
    assert choice.ids == [1, 3, 2]  # highest first, ties to the smaller id
    assert choice.weights == pytest.approx([0.5, 0.5, 0.0])  # no overflow or NaN at a tiny temperature
    soft = merge_weights(np.array([0.2, 0.6]), top=2, temperature=0.04)
    assert soft.weights == pytest.approx([1 / (1 + np.exp(-10)), np.exp(-10) / (1 + np.exp(-10))])
    assert merge_weights(np.array([0.3, 0.2]), top=1, temperature=0.04).weights == [1.0]


def _in_out(module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    rows, cols = module.weight.shape
    return (rows, cols) if isinstance(module, Conv1D) else (cols, rows)  # Conv1D keeps (in, out)


def _synthetic(model, names, rank=2, experts=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    factors = {c: {n: (torch.randn(rank, _in_out(modules[n])[0], generator=generator) * 0.5,
                       torch.randn(_in_out(modules[n])[1], rank, generator=generator) * 0.5) for n in names}
               for c in range(experts)}
    manifest = ExpertsManifest(pretrained="", model="", index="", vectors="exact",
                               clustering={"clusters": experts, "seed": 0, "sample": 0, "centroids_sha256": ""},
                               training={"lora_r": rank, "lora_alpha": 2.0 * rank, "docs_per_expert": 1}, experts=[])
    return Experts(None, manifest, np.eye(experts, 4, dtype=np.float32), factors)


def test_merging_is_exact_in_delta_w_never_an_average_of_factors(tiny_lm):
    model, _ = load_model(str(tiny_lm))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    experts = _synthetic(model, names)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    base_logits = model(ids).logits
    experts.attach(model)
    choice = ExpertChoice([0, 1], [0.3, 0.7], [0.9, 0.8])
    with experts.applied(choice):
        merged = model(ids).logits
    assert torch.equal(model(ids).logits, base_logits)  # outside the document the offset is gone
    with pytest.raises(RuntimeError), experts.applied(choice):
        raise RuntimeError("a document that fails half-way")
    assert torch.equal(model(ids).logits, base_logits)  # restored bit for bit all the same
    dense, averaged = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            (a0, b0), (a1, b1) = experts.factors[0][name], experts.factors[1][name]
            delta = experts.scale * (0.3 * b0 @ a0 + 0.7 * b1 @ a1)
            dict(dense.named_modules())[name].weight += delta
            mean_a, mean_b = 0.3 * a0 + 0.7 * a1, 0.3 * b0 + 0.7 * b1  # the pitfall: factors averaged apart
            dict(averaged.named_modules())[name].weight += experts.scale * mean_b @ mean_a
    assert torch.allclose(merged, dense(ids).logits, atol=1e-4)
    assert not torch.allclose(merged, averaged(ids).logits, atol=1e-2)


def test_gpt2_conv1d_layers_take_the_offset_in_their_own_layout():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32, vocab_size=64))
    model.eval()  # no dropout
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]  # (in, out) weights; c_proj square
    experts = _synthetic(model, names, experts=1)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    reference = copy.deepcopy(model)  # each layer's output plus s x A^T B^T, as the LoRA the expert was
    for name in names:
        a, b = experts.factors[0][name]
        dict(reference.named_modules())[name].register_forward_hook(
            lambda module, args, out, a=a, b=b: out + experts.scale * args[0] @ a.T @ b.T)
    experts.attach(model)
    with experts.applied(ExpertChoice([0], [1.0], [1.0])):
        merged = model(ids).logits
    assert torch.allclose(merged, reference(ids).logits, atol=1e-4)
    wrong = _synthetic(model, ["transformer.h.0.attn.c_attn"], experts=1)
    a, b = wrong.factors[0]["transformer.h.0.attn.c_attn"]
    wrong.factors[0]["transformer.h.0.attn.c_attn"] = (b.T, a.T)  # factors of a (32 x 96) layer
    with pytest.raises(ExpertsError, match="c_attn.*weight there is"):
        wrong.attach(model)


def test_build_writes_every_expert_with_its_cluster_documents_and_cost(built, fake_index, tiny_lm):
    out, manifest = built
    data = json.loads((out / MANIFEST).read_text())
    assert data["index"] == fake_index.manifest.identity and data["vectors"] == "exact"
    keys = np.load(out / "centroids.npy")
    assert keys.shape == (3, fake_index.manifest.dim) and np.allclose(np.linalg.norm(keys, axis=1), 1)
    sample = fake_index.data / np.linalg.norm(fake_index.data, axis=1, keepdims=True)
    for expert in manifest.experts:
        assert (out / expert_file(expert.cluster)).is_file() and expert.sha256
        assert 0 < len(expert.docs) <= SETTINGS.docs_per_expert and expert.seconds > 0
        assert all(int(np.argmax(keys @ sample[d])) == expert.cluster for d in expert.docs)  # its own cluster's
        # one step per chunk of each document's first max_doc_tokens tokens
        assert expert.steps == sum(len(chunk_tokens(t[:96], 64)) for t in _tokens(tiny_lm, fake_index, expert.docs))
    assert len({tuple(e.docs) for e in manifest.experts}) == 3
    assert manifest.offline_s == pytest.approx(manifest.clustering_s + sum(e.seconds for e in manifest.experts))


def test_each_expert_draws_its_documents_from_the_whole_index_not_the_clustering_sample(fake_index, monkeypatch):
    from lm_eval_ttt import experts_build

    monkeypatch.setattr(experts_build, "SAMPLE_PER_CLUSTER", 10)  # k-means sees 30 of the 120 documents
    settings = ExpertsSettings(clusters=3, docs_per_expert=8)
    manifest, keys = experts_build.plan(fake_index, settings, "model", "pretrained", progress=False)
    assert manifest.clustering["sample"] == 30
    members = np.argmax(fake_index.data @ keys.T, axis=1)
    for expert in manifest.experts:
        size = int((members == expert.cluster).sum())
        assert len(expert.docs) == min(8, size)  # the budget spent evenly, not bounded by the sample's share
        assert len(set(expert.docs)) == len(expert.docs) and all(members[d] == expert.cluster for d in expert.docs)
    assert manifest.plan["scanned"] <= len(fake_index.data)
    again, _ = experts_build.plan(fake_index, settings, "model", "pretrained", progress=False)
    assert [e.docs for e in again.experts] == [e.docs for e in manifest.experts]  # seeded


def _tokens(tiny_lm, index, ids):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm))
    return [tokenizer(t, add_special_tokens=False).input_ids for t in index.texts(ids)]


def test_a_killed_build_resumes_at_the_first_missing_expert(built, fake_index, tiny_lm, tmp_path):
    out, manifest = built
    copy_dir = tmp_path / "experts"
    copy_dir.mkdir()
    for path in out.iterdir():
        (copy_dir / path.name).write_bytes(path.read_bytes())
    data = json.loads((copy_dir / MANIFEST).read_text())
    data["experts"][2]["sha256"] = ""  # as if killed while training the last expert
    (copy_dir / MANIFEST).write_text(json.dumps(data))
    (copy_dir / expert_file(2)).unlink()
    kept = {n: (copy_dir / expert_file(n)).stat().st_mtime_ns for n in (0, 1)}
    model, tokenizer = load_model(str(tiny_lm))
    resumed = train_experts(fake_index, copy_dir, SETTINGS, model, tokenizer, str(tiny_lm), progress=False)
    assert {n: (copy_dir / expert_file(n)).stat().st_mtime_ns for n in (0, 1)} == kept  # not retrained
    assert resumed.experts[2].sha256 == manifest.experts[2].sha256  # the same expert, bit for bit
    other = ExpertsSettings(**{**SETTINGS.__dict__, "lr": 5e-3})
    with pytest.raises(ExpertsError, match="other settings.*lr"):
        train_experts(fake_index, copy_dir, other, model, tokenizer, str(tiny_lm), progress=False)


def test_experts_alone_change_the_scores_and_never_write_the_base(built, tiny_lm, corpus_texts, test_docs, tmp_path):
    out, _ = built
    plain = make_lm(TTTNNLM, tmp_path / "plain", tiny_lm, None, k=0)
    hf = plain.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts[:120], k=0, experts=str(out), experts_top=2)
    before = state_hash(lm.model)
    scores = lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True)
    assert state_hash(lm.model) == before
    assert all(s != h for s, h in zip(scores, hf))
    records = list(read_log(lm.log_stem).values())
    assert all(len(r["experts"]) == 2 and sum(r["expert_weights"]) == pytest.approx(1) and r["experts_s"] > 0
               and r["train_steps"] == 0 for r in records)
    lm.score_documents = None  # a rerun resumes every document from the log: nothing is scored again
    assert lm.loglikelihood_rolling(requests(test_docs), disable_tqdm=True) == scores
    settings = json.loads(lm._identity_json())
    assert settings["experts_digest"] == ExpertsManifest.read(out).digest() and settings["experts_top"] == 2
    assert lm.get_model_info()["ttt_nn"]["experts"]["offline_s"] == pytest.approx(ExpertsManifest.read(out).offline_s)
    no_experts = json.loads(make_lm(TTTNNLM, tmp_path / "k0", tiny_lm, None, k=0)._identity_json())
    assert "experts_top" not in no_experts and "experts_digest" not in no_experts  # earlier logs keep their names


def test_neighbour_steps_and_fresh_adapters_start_from_the_experts(built, tiny_lm, corpus_texts, test_docs, tmp_path):
    out, _ = built
    docs = requests(test_docs[:2])
    alone = fake_lm(TTTNNLM, tmp_path / "alone", tiny_lm, corpus_texts[:120], k=0, experts=str(out))
    expected = alone.loglikelihood_rolling(docs, disable_tqdm=True)
    full = fake_lm(TTTNNLM, tmp_path / "full", tiny_lm, corpus_texts[:120], k=2, eval_at_k="0", lr=1e-3,
                   max_neighbor_tokens=64, experts=str(out))
    before = state_hash(full.model)
    full.loglikelihood_rolling(docs, disable_tqdm=True)
    assert state_hash(full.model) == before  # the trainer's reset returns to base; the offset is gone
    lora = fake_lm(TTTNNLM, tmp_path / "lora", tiny_lm, corpus_texts[:120], k=2, eval_at_k="0", adapter="lora",
                   lora_r=4, max_neighbor_tokens=64, experts=str(out))
    lora.loglikelihood_rolling(docs, disable_tqdm=True)
    for lm in (full, lora):
        records = list(read_log(lm.log_stem).values())
        at_zero = sorted(r["results_at_k"]["0"][0] for r in records)
        assert at_zero == pytest.approx(sorted(expected), rel=1e-6)  # k=0 point: the experts' own scores
        assert all(r["train_steps"] > 0 and r["results"] != r["results_at_k"]["0"] for r in records)


def test_dynamic_evaluation_starts_from_the_experts(built, tiny_lm, corpus_texts, test_docs, tmp_path):
    out, _ = built
    docs = requests(test_docs[:2])
    args = dict(k=0, experts=str(out), dyneval_iterations=1, dyneval_lr=1e-3)
    with_experts = fake_lm(TTTNNLM, tmp_path / "e", tiny_lm, corpus_texts[:120], **args)
    alone = fake_lm(TTTNNLM, tmp_path / "d", tiny_lm, corpus_texts[:120], k=0, dyneval_iterations=1,
                    dyneval_lr=1e-3)
    scores = with_experts.loglikelihood_rolling(docs, disable_tqdm=True)
    assert scores != alone.loglikelihood_rolling(docs, disable_tqdm=True)
    records = list(read_log(with_experts.log_stem).values())
    assert all(r["experts"] and r["document_steps"] > 0 and r["neighbour_steps"] == 0 for r in records)


def test_the_query_vector_is_the_one_retrieval_searched_with(corpus_texts, tmp_path):
    from conftest import fake_retriever

    retriever = fake_retriever(tmp_path, corpus_texts[:50])
    retriever.neighbours(corpus_texts[7], 3)
    searched = retriever.query_vector(corpus_texts[7])
    again = fake_retriever(tmp_path, corpus_texts[:50])  # a new process: from the neighbour cache on disk
    calls = again.encoder.calls
    assert np.array_equal(again.query_vector(corpus_texts[7]), searched) and again.encoder.calls == calls
    fresh = again.query_vector(corpus_texts[9])  # never retrieved: encoded once, then kept
    assert again.encoder.calls == calls + 1 and again.query_vector(corpus_texts[9]) is fresh


def test_experts_of_another_model_or_an_unfinished_build_are_refused(built, tiny_lm, corpus_texts, tmp_path):
    out, _ = built
    other = tmp_path / "other"
    (other).mkdir()
    for path in out.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    data = json.loads((other / MANIFEST).read_text())
    data["model"] = "0" * 32
    (other / MANIFEST).write_text(json.dumps(data))
    model, _ = load_model(str(tiny_lm))
    with pytest.raises(ExpertsError, match=f"model {'0' * 32}.*this run has model {model_fingerprint(model)}"):
        fake_lm(TTTNNLM, tmp_path / "a", tiny_lm, corpus_texts[:120], k=0, experts=str(other))
    data["experts"][1]["sha256"] = ""
    (other / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ModelArgumentError, match="2 of 3 experts built"):
        TTTNNLM(pretrained="/nonexistent", experts=str(other))  # before any model loads
    with pytest.raises(ModelArgumentError, match="not an experts directory"):
        TTTNNLM(pretrained="/nonexistent", experts=str(tmp_path))
    with pytest.raises(ModelArgumentError, match="doc_batch must be 1"):
        TTTNNLM(pretrained="/nonexistent", experts=str(out), adapter="lora", doc_batch=2)
    with pytest.raises(ModelArgumentError, match="peft="):
        TTTNNLM(pretrained="/nonexistent", experts=str(out), peft="/some/adapter")
    data = json.loads((out / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps(data))
    (other / expert_file(0)).write_bytes((out / expert_file(1)).read_bytes())  # a file swapped
    with pytest.raises(ExpertsError, match="differ from the manifest"):
        Experts.load(other, data["model"], data["index"])
    experts = Experts.load(out, data["model"], data["index"])
    with pytest.raises(ExpertsError, match="zero or not finite"):
        experts.choose(np.zeros(experts.keys.shape[1]), 1, 0.04)


def test_stock_lm_eval_runs_experts_built_by_the_cli_on_a_real_index(small_index, tiny_lm, capsys, tmp_path):
    out = tmp_path / "experts"
    built = cli(capsys, "ttt-nn", "experts", "build", "--index", str(small_index), "--out", str(out), "--pretrained",
                str(tiny_lm), "--clusters", "2", "--docs-per-expert", "2", "--max-length", "64")
    assert "2 experts" in built.stdout and ExpertsManifest.read(out).vectors in ("exact", "stored-f16")
    args = f"pretrained={tiny_lm},index={small_index},experts={out},k=1,max_length=64,log_dir={tmp_path / 'logs'}"
    run("lm_eval", "--model", "ttt-nn", "--model_args", args, "--tasks", "ttt_test_mc", "--include_path",
        str(TEST_TASKS), "--limit", "2", "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "o"))
    results = json.loads(next((tmp_path / "o").rglob("results_*.json")).read_text())
    assert results["config"]["ttt_nn"]["experts"]["clusters"] == 2
    records = [json.loads(line) for path in (tmp_path / "logs").glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert records and all(r["experts"] and r["neighbour_ids"] for r in records)


def test_a_build_over_grpc_equals_the_build_over_the_directory(small_index, tiny_lm, tmp_path):
    from index_server.server import ServerConfig, start_server
    from lm_eval_ttt.experts_build import build_experts

    settings = ExpertsSettings(clusters=2, docs_per_expert=2, max_length=64, max_doc_tokens=64)
    local = build_experts(str(small_index), tmp_path / "local", settings, str(tiny_lm), progress=False)
    server, port, _ = start_server(ServerConfig(index=small_index))
    try:
        remote = build_experts(f"grpc://127.0.0.1:{port}", tmp_path / "remote", settings, str(tiny_lm),
                               progress=False)
    finally:
        server.stop(None)
    assert remote.index == local.index and remote.vectors == local.vectors
    assert [(e.docs, e.sha256) for e in remote.experts] == [(e.docs, e.sha256) for e in local.experts]
