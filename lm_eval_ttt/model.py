"""``--model ttt-nn``: train on each document's neighbours before scoring it.

Per document (a rolling text, a multiple-choice question, a generation prompt), given its
neighbours (nearest first, or as selected): one AdamW step per chunk of each neighbour ->
the harness's own scoring of all the document's requests -> restore weights and optimizer.
With k = 0 nothing is trained and the answers are ``--model hf``'s. ``eval_at_k`` adds
scoring points on the way (the paper's curve) without re-scoring after every neighbour.
With ``adapter=lora, doc_batch=B`` the same happens for B documents at once, each with its
own adapter.
"""

from __future__ import annotations

import dataclasses
import time

from index_server.encoder import CHARS_PER_TOKEN_BOUND

from .documents import Document
from .harness import NeighbourLM
from .lora import BatchedLoRATrainer
from .retriever import Neighbours
from .scoring import continuation_scores
from .settings import ModelArgumentError, NeighbourSettings, RunSettings, TrainSettings, TTTSettings
from .trainers import build_trainer, check_train_settings, step_counts


def scoring_points(eval_at_k: tuple[int, ...] | None, k: int) -> list[int]:
    """``eval_at_k`` plus the final k, sorted; each must lie in [0, k]."""
    points = sorted(set(eval_at_k or ()) | {k})
    if points[-1] > k:
        raise ModelArgumentError(f"eval_at_k values must lie in [0, k={k}], got {list(eval_at_k)}")
    return points


class TTTNNLM(NeighbourLM):
    method = "ttt-nn"
    setting_groups = (RunSettings, NeighbourSettings, TrainSettings, TTTSettings)

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
        ttt, train = self.settings_of(TTTSettings), self.settings_of(TrainSettings)
        scoring_points(ttt.eval_at_k, self.neighbour_settings.k)
        check_train_settings(train, hf_kwargs)
        if train.doc_batch > 1 and not ttt.reset_optimizer:
            raise ModelArgumentError("doc_batch > 1 resets every document's adapter and Adam state: "
                                     "reset_optimizer=false needs doc_batch=1")

    def identity(self) -> dict:
        return {**super().identity(), "lr": self.trainer.config.lr if self.trainer else None}

    def training_order(self, neighbours: Neighbours) -> Neighbours:
        """Farthest first (the order ablation) reverses the neighbours; their sigmas follow
        the selection order and are not logged then."""
        if self.ttt_settings.order == "nearest":
            return neighbours
        return dataclasses.replace(neighbours, ids=neighbours.ids[::-1], distances=neighbours.distances[::-1],
                                   texts=neighbours.texts[::-1], sigmas=None)

    def neighbour_tokens(self, neighbours: Neighbours) -> list[list[int]]:
        cap = self.ttt_settings.max_neighbor_tokens
        texts = [t[: cap * CHARS_PER_TOKEN_BOUND] if cap else t for t in neighbours.texts]
        return [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]

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

    def _train(self, tokens: list[list[list[int]]]) -> list[list[list[float]]]:
        """Per document, its chunk losses per neighbour; one document unless batched."""
        if self.batched:
            return self.trainer.train(tokens)
        return [self.trainer.train(tokens[0])]

    def _results(self, documents: list[Document]) -> list[list]:
        """Each document's answers with the current weights (its own adapter when batched)."""
        if not self.batched:
            return [self.stock_results(d) for d in documents]
        adapters = self.trainer.adapters
        pairs, owners = [], []
        for slot, document in enumerate(documents):
            if document.request_type == "loglikelihood_rolling":
                doc_pairs = self.windows(document.text)
            elif document.request_type == "loglikelihood":
                doc_pairs = self.encode_pairs(document)
            else:
                continue  # generated below, one document at a time with its adapter
            pairs += doc_pairs
            owners += [slot] * len(doc_pairs)
        scored = continuation_scores(self, pairs, batch=self.batch_size * len(documents),
                                     rows=lambda indices: adapters.use([owners[i] for i in indices]))
        results = []
        for slot, document in enumerate(documents):
            mine = [x for x, owner in zip(scored, owners) if owner == slot]
            if document.request_type == "loglikelihood_rolling":
                results.append([sum(ll for ll, _ in mine)])
            elif document.request_type == "loglikelihood":
                results.append([list(x) for x in mine])
            else:
                with adapters.use(slot):
                    results.append(self.stock_results(document))
        return results

    def score_documents(self, documents: list[Document], neighbours: list[Neighbours]) -> list[dict]:
        """Train up to each scoring point, score, and reset at the end. With doc_batch > 1 the
        batch trains at once and its timings are split evenly over its documents."""
        tokens = [self.neighbour_tokens(n) for n in neighbours]
        scores: list[dict] = [{} for _ in documents]
        losses: list[list] = [[] for _ in documents]
        timings = {"train_s": 0.0, "score_s": 0.0, "reset_s": 0.0}
        done, scored_at = 0, None
        try:
            for point in self.eval_at_k:
                t = time.perf_counter()
                if point > done:
                    for i, trained in enumerate(self._train([tok[done:point] for tok in tokens])):
                        losses[i] += trained
                done = point
                timings["train_s"] += time.perf_counter() - t
                reached = [min(point, len(tok)) for tok in tokens]
                if reached == scored_at:
                    continue  # no document has a neighbour left to train on: same weights, same scores
                t = time.perf_counter()
                for i, results in enumerate(self._results(documents)):
                    scores[i][str(reached[i])] = results
                scored_at = reached
                timings["score_s"] += time.perf_counter() - t
        finally:
            t = time.perf_counter()
            skipped = self.trainer.skipped_steps if self.trainer is not None else 0
            if self.trainer is not None:
                self.trainer.reset()
            timings["reset_s"] = time.perf_counter() - t
        share = {key: value / len(documents) for key, value in timings.items()}
        return [{"results": scores[i][str(min(self.k, len(tokens[i])))], "results_at_k": scores[i],
                 "chunk_losses": losses[i], **step_counts(sum(map(len, losses[i])), skipped),
                 **({"doc_batch": len(documents)} if self.batched else {}), **share} for i in range(len(documents))]
