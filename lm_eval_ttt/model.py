"""``--model ttt-nn``: train on each document's neighbours before scoring it.

Per document (a rolling text, a multiple-choice question, a generation prompt), given its
neighbours (nearest first, or as selected): one AdamW step per chunk of each neighbour ->
the harness's own scoring of all the document's requests -> restore weights and optimizer.
With k = 0 nothing is trained and the answers are ``--model hf``'s. ``eval_at_k`` adds
scoring points on the way (the paper's curve) without re-scoring after every neighbour.
"""

from __future__ import annotations

import time

from .documents import Document
from .harness import NeighbourLM
from .lora import BatchedLoRATrainer, score_pairs
from .retriever import Neighbours
from .settings import ModelArgumentError, NeighbourSettings, TrainSettings, TTTSettings
from .trainers import build_trainer

# Characters of a neighbour tokenised when only its first max_neighbor_tokens are trained on.
_CHARS_PER_TOKEN_BOUND = 64


def scoring_points(eval_at_k: tuple[int, ...] | None, k: int) -> list[int]:
    """``eval_at_k`` plus the final k, sorted; each must lie in [0, k]."""
    points = sorted(set(eval_at_k or ()) | {k})
    if points[-1] > k:
        raise ModelArgumentError(f"eval_at_k values must lie in [0, k={k}], got {list(eval_at_k)}")
    return points


class TTTNNLM(NeighbourLM):
    method = "ttt-nn"
    setting_groups = (NeighbourSettings, TrainSettings, TTTSettings)

    def __init__(self, pretrained=None, **kwargs) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self.train_settings = self.settings_of(TrainSettings)
        self.ttt_settings = self.settings_of(TTTSettings)
        self.eval_at_k = scoring_points(self.ttt_settings.eval_at_k, self.k)
        # k=0 never trains: no trainer, so no copy of the weights either
        self.trainer = build_trainer(self, self.train_settings, self.ttt_settings.max_neighbor_tokens,
                                     self.ttt_settings.reset_optimizer) if self.k > 0 else None

    def check_settings(self, hf_kwargs: dict) -> None:
        super().check_settings(hf_kwargs)
        from .trainers import check_train_settings

        scoring_points(self.settings_of(TTTSettings).eval_at_k, self.neighbour_settings.k)
        check_train_settings(self.settings_of(TrainSettings), hf_kwargs)

    def identity(self) -> dict:
        return {**super().identity(), "lr": self.trainer.config.lr if self.trainer else None}

    def neighbour_tokens(self, neighbours: Neighbours) -> list[list[int]]:
        cap = self.ttt_settings.max_neighbor_tokens
        texts = [t[: cap * _CHARS_PER_TOKEN_BOUND] if cap else t for t in neighbours.texts]
        tokens = [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        return tokens[::-1] if self.ttt_settings.order == "farthest" else tokens

    @property
    def batched(self) -> bool:
        return isinstance(self.trainer, BatchedLoRATrainer)

    def document_batches(self, documents: list[Document]) -> list[list[Document]]:
        """doc_batch documents at a time, similar lengths together (less padding)."""
        if not self.batched:
            return super().document_batches(documents)
        ordered = sorted(documents, key=lambda d: len(d.text))
        size = self.train_settings.doc_batch
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def batched_results(self, documents: list[Document]) -> list[list]:
        """Each document's answers with its own adapter (slot = its position in the batch)."""
        adapters = self.trainer.adapters
        pairs, owners = [], []
        for slot, document in enumerate(documents):
            if document.request_type == "loglikelihood_rolling":
                doc_pairs = self.windows(document.text)
            elif document.request_type == "loglikelihood":
                doc_pairs = self.encode_pairs(document)
            else:
                continue
            pairs += [(slot, ctx, cont) for ctx, cont in doc_pairs]
            owners += [slot] * len(doc_pairs)
        scored = score_pairs(self, adapters, pairs, batch=self.batch_size * len(documents))
        results = []
        for slot, document in enumerate(documents):
            mine = [s for s, owner in zip(scored, owners) if owner == slot]
            if document.request_type == "loglikelihood_rolling":
                results.append([sum(ll for ll, _ in mine)])
            elif document.request_type == "loglikelihood":
                results.append([list(x) for x in mine])
            else:
                with adapters.use(slot):
                    results.append(self.stock_results(document))
        return results

    def score_documents(self, documents: list[Document], neighbours: list[Neighbours]) -> list[dict]:
        """doc_batch > 1: train every document of the batch at once, each on its own adapter;
        timings are the batch's, split evenly over its documents."""
        if not self.batched:
            return super().score_documents(documents, neighbours)
        tokens = [self.neighbour_tokens(n) for n in neighbours]
        scores: list[dict] = [{} for _ in documents]
        losses: list[list] = [[] for _ in documents]
        timings = {"train_s": 0.0, "score_s": 0.0, "reset_s": 0.0}
        done = 0
        try:
            for point in self.eval_at_k:
                t = time.perf_counter()
                if point > done:
                    for i, trained in enumerate(self.trainer.train([tok[done:point] for tok in tokens])):
                        losses[i] += trained
                done = point
                timings["train_s"] += time.perf_counter() - t
                t = time.perf_counter()
                for i, results in enumerate(self.batched_results(documents)):
                    scores[i][str(min(point, len(tokens[i])))] = results
                timings["score_s"] += time.perf_counter() - t
        finally:
            t = time.perf_counter()
            self.trainer.reset()
            timings["reset_s"] = time.perf_counter() - t
        share = {key: value / len(documents) for key, value in timings.items()}
        return [{"results": scores[i][str(min(self.k, len(tokens[i])))], "results_at_k": scores[i],
                 "chunk_losses": losses[i], "train_steps": sum(map(len, losses[i])), "doc_batch": len(documents),
                 **share} for i in range(len(documents))]

    def score_document(self, document: Document, neighbours: Neighbours) -> dict:
        """Train up to each scoring point, score, and reset at the end."""
        tokens = self.neighbour_tokens(neighbours)
        timings = {"train_s": 0.0, "score_s": 0.0, "reset_s": 0.0}
        scores, losses, done = {}, [], 0
        try:
            for point in self.eval_at_k:
                t = time.perf_counter()
                if point > done:
                    losses += self.trainer.train(tokens[done:point])
                done = point
                timings["train_s"] += time.perf_counter() - t
                t = time.perf_counter()
                scores[str(min(point, len(tokens)))] = self.stock_results(document)
                timings["score_s"] += time.perf_counter() - t
        finally:
            t = time.perf_counter()
            if self.trainer is not None:
                self.trainer.reset()
            timings["reset_s"] = time.perf_counter() - t
        return {
            "results": scores[str(min(self.k, len(tokens)))],
            "results_at_k": scores,
            "chunk_losses": losses,
            "train_steps": sum(map(len, losses)),
            **timings,
        }
