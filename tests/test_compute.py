"""Making TTT-NN worth its compute: dynamic evaluation after the neighbours, training only the
top blocks, several neighbour chunks per step, and what every document cost."""

from __future__ import annotations

import pytest
import torch
from conftest import fake_lm, make_lm, requests
from lm_eval.api.instance import Instance
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

from lm_eval_ttt.baselines import DynamicEvalLM
from lm_eval_ttt.documents import LOGLIKELIHOOD
from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.settings import ModelArgumentError, TrainSettings
from lm_eval_ttt.trainers import build_trainer, transformer_blocks
from lm_eval_ttt.ttt import TestTimeTrainer, TTTConfig, padded_batch, row_losses

SMALL = dict(vocab_size=97)
CONFIGS = {
    "gpt2": GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=64, **SMALL),
    "llama": LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **SMALL),
    "qwen2": Qwen2Config(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, **SMALL),
    "gpt_neox": GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              max_position_embeddings=64, **SMALL),
}


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = CONFIGS[arch]
    for rate in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "attention_dropout"):
        if hasattr(config, rate):
            setattr(config, rate, 0.0)
    return AutoModelForCausalLM.from_config(config).eval()


def chunks(n: int, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, 97, (length - i,), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_train_layers_trains_the_top_blocks_and_what_runs_after_them(arch):
    model = tiny(arch)
    blocks = transformer_blocks(model)
    assert len(blocks.stack) == 3
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, trainer = build_trainer(model, TrainSettings(lr=1e-2, train_layers=1), max_length=32, seed=0, pad_id=0,
                                   peft_loaded=False)
    top = {id(p) for p in blocks.stack[2].parameters()}
    below = [p for b in blocks.stack[:2] for p in b.parameters()] + list(model.get_input_embeddings().parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    trained = {id(p) for p in trainer.params}
    assert top <= trained and not trained & {id(p) for p in below}
    if not tied:  # a tied head would train the input embeddings, and need the backward pass through every block
        assert {id(p) for p in model.get_output_embeddings().parameters()} <= trained
    assert len(trainer._snapshot) == len(trainer.params)  # the snapshot and Adam hold only these
    reached = []
    blocks.stack[1].register_full_backward_hook(lambda *a: reached.append(1))
    trainer.train([[chunks(1)[0]]])
    assert reached == []  # the backward pass stopped above the lower blocks
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    names = {id(p): n for n, p in model.named_parameters()}
    assert changed and changed <= {names[i] for i in trained}
    assert len(trainer.optimizer.state) == len(trainer.params)
    trainer.reset()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_train_layers_with_lora_puts_adapters_in_those_blocks_only():
    model, trainer = build_trainer(tiny("llama"), TrainSettings(adapter="lora", train_layers=2, lr=1e-2), max_length=32,
                                   seed=0, pad_id=0, peft_loaded=False)
    adapted = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapted and all("lora_" in n for n in adapted)
    assert {n.split("layers.")[1].split(".")[0] for n in adapted} == {"1", "2"}


def test_train_layers_is_refused_where_it_cannot_apply():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

    with pytest.raises(ModelArgumentError, match="cannot find the transformer blocks of NoBlocks"):
        transformer_blocks(NoBlocks())
    with pytest.raises(ModelArgumentError, match="train_layers=4: the model has 3 transformer blocks"):
        build_trainer(tiny("gpt2"), TrainSettings(train_layers=4), max_length=32, seed=0, pad_id=0, peft_loaded=False)


def test_a_padded_batch_has_the_loss_of_its_unpadded_chunks():
    model = tiny("llama")
    rows = chunks(3)
    ids, mask, labels = padded_batch(rows, pad_id=0, device="cpu")
    with torch.no_grad():
        sums, counts = row_losses(model(input_ids=ids, attention_mask=mask).logits, labels)
        alone = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss for r in rows]
    torch.testing.assert_close(sums / counts, torch.stack(alone), rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [len(r) - 1 for r in rows]


def test_neighbour_batch_takes_one_step_per_batch_and_one_is_the_paper_loop_bit_for_bit():
    rows = chunks(5, length=24)
    config = TTTConfig(lr=1e-3, max_length=32)
    model = tiny("llama")
    trainer = TestTimeTrainer(model, config)
    losses = trainer.train([rows])
    (work,) = trainer.work()
    assert work.steps == 5 and work.tokens == sum(map(len, rows)) and len(losses[0]) == 5
    after_one = [p.detach().clone() for p in model.parameters()]
    trainer.reset()
    reference = tiny("llama")  # the paper's loop, written out
    params = [p for p in reference.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, eps=1e-8, weight_decay=0.01)
    reference.train()
    for r in rows:
        ids = torch.tensor([r])
        reference(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(after_one, reference.parameters()))
    batched = TestTimeTrainer(tiny("llama"), TTTConfig(lr=1e-3, max_length=32, neighbour_batch=2))
    per_neighbour = batched.train([rows])[0]
    (work,) = batched.work()
    assert work.steps == 3 and work.tokens == sum(map(len, rows))  # batches of 2, 2 and 1
    assert per_neighbour[0][0] == pytest.approx(losses[0][0][0],
                                                rel=1e-5)  # the first batch starts from the same weights


def test_compute_settings_change_the_identity(tiny_lm, corpus_texts, tmp_path):
    base = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts)
    stems = {fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, **change).log_stem for change in (
        {"train_layers": 1}, {"neighbour_batch": 2}, {"dyneval_iterations": 1},
        {"dyneval_iterations": 1, "dyneval_lr": 1e-3})}
    assert len(stems) == 4 and base.log_stem not in stems
    # without steps on the document its rate changes no score: the same log
    assert fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, dyneval_lr=1e-3).log_stem == base.log_stem


def _halves(tiny_lm) -> tuple[str, str]:
    """A text of about three 64-token windows, and another made of the same lines reordered."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    first = ""
    for i in range(400):
        line = f"value_{i} = compute({i}, {i * 7 % 13})\n"
        if len(tok(first + line).input_ids) > 64 * 3 + 10:
            break
        first += line
    return first, "".join(reversed(first.splitlines(keepends=True)))


def test_dynamic_evaluation_after_the_neighbours_never_trains_on_a_token_before_scoring_it(tiny_lm, corpus_texts,
                                                                                          tmp_path):
    """A document whose second half repeats its first: its first half scores as it does when
    the second half differs (nothing of the second half was learned before the first was
    scored), and the repeat scores better than the other second half."""
    first, other = _halves(tiny_lm)
    repeat = first
    args = dict(k=2, max_neighbor_tokens=64, lr=1e-3, dyneval_iterations=2, dyneval_lr=3e-3)
    records = {}
    for name, text in (("repeat", first + repeat), ("other", first + other)):
        lm = fake_lm(TTTNNLM, tmp_path / name, tiny_lm, corpus_texts, **args)
        lm.loglikelihood_rolling(requests([text]), disable_tqdm=True)
        (records[name],) = read_log(lm.log_stem).values()
    windows = len(records["repeat"]["window_lls"])
    assert windows >= 6
    half = windows // 2
    assert records["repeat"]["window_lls"][:half] == records["other"]["window_lls"][:half]
    assert sum(records["repeat"]["window_lls"][half + 1:]) > sum(records["other"]["window_lls"][half + 1:])
    r = records["repeat"]
    assert r["neighbour_steps"] + r["document_steps"] == r["train_steps"]
    assert r["document_steps"] == 2 * (windows - 1) and r["neighbour_steps"] == 2  # 2 neighbours of one chunk


def test_dynamic_evaluation_without_neighbours_is_ttt_nn_dyneval(tiny_lm, corpus_texts, test_docs, tmp_path):
    """The document's own windows are trained on whole: max_neighbor_tokens caps neighbours only,
    and neighbour_batch batches neighbour chunks, never a window's iterations."""
    ours = fake_lm(TTTNNLM, tmp_path / "ttt", tiny_lm, corpus_texts, k=0, dyneval_iterations=1, dyneval_lr=1e-3,
                   lr=1e-3, max_neighbor_tokens=16, neighbour_batch=4)
    theirs = make_lm(DynamicEvalLM, tmp_path / "dyneval", tiny_lm, None, iterations=1, lr=1e-3)
    docs = requests(test_docs[:2])
    assert ours.loglikelihood_rolling(docs, disable_tqdm=True) == theirs.loglikelihood_rolling(docs, disable_tqdm=True)
    twice = fake_lm(TTTNNLM, tmp_path / "twice", tiny_lm, corpus_texts, k=0, dyneval_iterations=2, neighbour_batch=2)
    twice.loglikelihood_rolling(requests(test_docs[:1]), disable_tqdm=True)
    (record,) = read_log(twice.log_stem).values()
    assert record["document_steps"] == 2 * (len(record["window_lls"]) - 1)  # two steps per window, not one batch


def test_steps_on_the_documents_own_windows_have_one_default_rate(tiny_lm, corpus_texts, test_docs, tmp_path):
    """`--model ttt-nn-dyneval` and `--model ttt-nn` with dynamic evaluation, each at its defaults,
    train on the document's windows at the same rate and give the same log-likelihoods."""
    from lm_eval_ttt.settings import DEFAULT_DYNEVAL_LR

    ours = fake_lm(TTTNNLM, tmp_path / "ttt", tiny_lm, corpus_texts, k=0, dyneval_iterations=1)
    theirs = make_lm(DynamicEvalLM, tmp_path / "dyneval", tiny_lm, None, iterations=1)
    assert theirs.trainer.lr == ours.ttt_settings.dyneval_lr == DEFAULT_DYNEVAL_LR
    docs = requests(test_docs[:2])
    assert ours.loglikelihood_rolling(docs, disable_tqdm=True) == theirs.loglikelihood_rolling(docs, disable_tqdm=True)


@pytest.mark.parametrize("args", [{"adapter": "lora", "lr": 1e-2}, {"select": "sift", "candidates": 20}],
                         ids=["lora", "sift"])
def test_dynamic_evaluation_after_the_neighbours_works_with_adapters_and_selection(tiny_lm, corpus_texts, test_docs,
                                                                                  tmp_path, args):
    plain = fake_lm(TTTNNLM, tmp_path / "plain", tiny_lm, corpus_texts, k=2, max_neighbor_tokens=64, **args)
    dyn = fake_lm(TTTNNLM, tmp_path / "dyn", tiny_lm, corpus_texts, k=2, max_neighbor_tokens=64, dyneval_iterations=1,
                  **args)
    doc = requests([max(test_docs, key=len)])
    assert plain.loglikelihood_rolling(doc, disable_tqdm=True) != dyn.loglikelihood_rolling(doc, disable_tqdm=True)
    (record,) = read_log(dyn.log_stem).values()
    assert record["document_steps"] > 0 and record["neighbour_steps"] == 2


def test_dynamic_evaluation_is_refused_where_it_has_no_meaning(tiny_lm, corpus_texts, tmp_path):
    lm = fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, dyneval_iterations=1)
    question = [Instance(LOGLIKELIHOOD, {}, ("Which module parses JSON?", " json"), 0, metadata=("mc", 0, 1))]
    with pytest.raises(NotImplementedError, match="cannot answer loglikelihood requests"):
        lm.loglikelihood(question)
    assert not list((tmp_path / "logs").glob("*.jsonl"))
    for bad, message in (({"eval_at_k": "0:1"}, "drop eval_at_k"),
                         ({"adapter": "lora", "doc_batch": 2}, "doc_batch must be 1")):
        with pytest.raises(ModelArgumentError, match=message):
            fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, dyneval_iterations=1, **bad)
    with pytest.raises(ModelArgumentError, match="neighbour_batch must be 1"):
        fake_lm(TTTNNLM, tmp_path, tiny_lm, corpus_texts, adapter="lora", doc_batch=2, neighbour_batch=2)


def test_cheaper_configurations_run_through_the_harness(tiny_lm, corpus_texts, test_docs, tmp_path):
    """train_layers and neighbour_batch through the model: fewer tokens' worth of backward or
    fewer steps, logged as such, and weights restored."""
    full = fake_lm(TTTNNLM, tmp_path / "full", tiny_lm, corpus_texts, k=3, max_neighbor_tokens=64)
    top = fake_lm(TTTNNLM, tmp_path / "top", tiny_lm, corpus_texts, k=3, max_neighbor_tokens=64, train_layers=1)
    batched = fake_lm(TTTNNLM, tmp_path / "batched", tiny_lm, corpus_texts, k=3, max_neighbor_tokens=64,
                      neighbour_batch=3)
    docs = requests(test_docs[:1])
    scores = [lm.loglikelihood_rolling(docs, disable_tqdm=True) for lm in (full, top, batched)]
    assert len({tuple(s) for s in scores}) == 3
    (a,), (b,), (c,) = (read_log(lm.log_stem).values() for lm in (full, top, batched))
    assert a["train_steps"] == b["train_steps"] == 3 and c["train_steps"] == 1
    assert a["train_tokens"] == b["train_tokens"] == c["train_tokens"]
