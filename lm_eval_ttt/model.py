"""``--model ttt-nn``: train on each document's neighbours before scoring it.

Per document (a rolling text, a multiple-choice question, a generation prompt), given its
neighbours (nearest first, or as selected): training steps on the chunks of each neighbour
-> the harness's own scoring of all the document's requests -> restore weights and
optimizer. With k = 0 nothing is trained and the answers are ``--model hf``'s.
``eval_at_k`` adds scoring points on the way (the paper's curve) without re-scoring after
every neighbour. ``dyneval_iterations`` scores a rolling document by dynamic evaluation
after the neighbours (``dyneval.py``). With ``adapter=lora, doc_batch=B`` the same happens
for B documents at once, each with its own adapter. With ``experts=DIR`` a document starts
from the merged experts nearest its query embedding (``experts.py``) and all of the above
happens on top of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

from .documents import KINDS, REQUEST_TYPES, Document
from .dyneval import score_dynamically
from .experts import Experts, experts_problem
from .harness import NeighbourLM
from .retriever import Neighbours
from .scoring import continuation_scores
from .settings import ModelArgumentError, NeighbourSettings, RunSettings, TrainSettings, TTTSettings
from .trainer import TrainWork
from .trainers import build_trainer, check_train_settings, implied_hf_kwargs
from .ttt import capped_tokens


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
        self.experts = None
        if self.ttt_settings.experts is not None:  # on the plain model's layers, before a trainer wraps them
            self.experts = Experts.load(self.ttt_settings.experts, self._model_fingerprint,
                                        self.retriever.manifest.identity)
            self.experts.attach(self.model)
        self.trainer = None  # k=0 without dynamic evaluation never trains: no trainer, no copy of the weights
        if self.k > 0 or self.ttt_settings.dyneval_iterations:
            self._model, self.trainer = build_trainer(
                self.model, self.train_settings, max_length=self.max_length, seed=self.seed,
                pad_id=self.tokenizer.pad_token_id or 0, peft_loaded=bool(self.peft),
                reset_optimizer=self.ttt_settings.reset_optimizer, neighbour_batch=self.ttt_settings.neighbour_batch)
        if self.ttt_settings.dyneval_iterations:  # dynamic evaluation learns from a scored text: rolling tasks only
            self.request_types = tuple(name for name in REQUEST_TYPES if KINDS[name].own_text)

    def check_settings(self, hf_kwargs: dict) -> None:
        super().check_settings(hf_kwargs)
        ttt, train = self.settings_of(TTTSettings), self.settings_of(TrainSettings)
        scoring_points(ttt.eval_at_k, self.neighbour_settings.k)
        check_train_settings(train, hf_kwargs)
        if train.doc_batch > 1 and not ttt.reset_optimizer:
            raise ModelArgumentError("doc_batch > 1 resets every document's adapter and Adam state: "
                                     "reset_optimizer=false needs doc_batch=1")
        if train.doc_batch > 1 and ttt.neighbour_batch > 1:
            raise ModelArgumentError("doc_batch > 1 already batches the documents' chunks: neighbour_batch must be 1")
        if ttt.dyneval_iterations and train.doc_batch > 1:
            raise ModelArgumentError("dyneval_iterations scores each document window by window with its own steps: "
                                     "doc_batch must be 1")
        if ttt.experts is not None and (problem := experts_problem(ttt.experts)):
            raise ModelArgumentError(f"experts={problem}")
        if ttt.experts is not None and hf_kwargs.get("peft"):
            raise ModelArgumentError("experts are built on the plain model: they cannot be combined with peft=")
        if ttt.experts is not None and train.doc_batch > 1:
            raise ModelArgumentError("experts start each document from its own merged experts: doc_batch must be 1")
        if ttt.dyneval_iterations and ttt.eval_at_k:
            raise ModelArgumentError("dyneval_iterations changes the weights while the document is scored, so there "
                                     "is no curve over k: drop eval_at_k")

    def implied_hf_kwargs(self) -> dict:
        return implied_hf_kwargs(self.settings_of(TrainSettings))

    def identity(self) -> dict:
        identity = {**super().identity(), "lr": self.trainer.lr if self.trainer else None}
        if not self.ttt_settings.dyneval_iterations:
            del identity["dyneval_lr"]  # no step on the document: its rate changes no score
        if self.experts is None:
            del identity["experts_top"], identity["experts_temperature"]
        else:
            identity["experts_digest"] = self.experts.manifest.digest()
            if self.ttt_settings.experts_top == 1:
                del identity["experts_temperature"]  # one expert has weight 1 at any temperature
        return identity

    def needs_retriever(self) -> bool:
        """Experts are chosen by the query embedding of the index's encoder, even at k=0."""
        return super().needs_retriever() or self.settings_of(TTTSettings).experts is not None

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self.experts is not None:  # the offline cost a reader weighs against the test-time seconds
            info["ttt_nn"]["experts"] = self.experts.info()
        return info

    def training_order(self, neighbours: Neighbours) -> Neighbours:
        """Farthest first (the order ablation) reverses the neighbours; their sigmas follow
        the selection order and are not logged then."""
        if self.ttt_settings.order == "nearest":
            return neighbours
        return dataclasses.replace(neighbours, ids=neighbours.ids[::-1], distances=neighbours.distances[::-1],
                                   texts=neighbours.texts[::-1], sigmas=None)

    def neighbour_tokens(self, neighbours: Neighbours) -> list[list[int]]:
        """Each neighbour's tokens, its first ``max_neighbor_tokens`` when capped."""
        return capped_tokens(self.tokenizer, neighbours.texts, self.ttt_settings.max_neighbor_tokens)

    def document_batches(self, documents: list[Document]) -> list[list[Document]]:
        """As many documents as the trainer trains at once, similar lengths together (less padding)."""
        size = self.trainer.slots if self.trainer is not None else 1
        if size == 1:
            return super().document_batches(documents)
        ordered = sorted(documents, key=lambda d: len(d.text))
        return [ordered[i : i + size] for i in range(0, len(ordered), size)]

    def _weights(self, slot: int):
        return self.trainer.weights(slot) if self.trainer is not None else contextlib.nullcontext()

    def _results(self, documents: list[Document]) -> list[list]:
        """Each document's answers with its own trained weights: a one-slot trainer's document
        through HFLM's own scoring; a batched trainer's documents with one forward pass per
        batch of pairs, row i with the weights of its document (generations one at a time)."""
        if self.trainer is None or self.trainer.slots == 1:
            with self._weights(0):
                return [self.answers(d) for d in documents]
        pairs, owners = [], []
        for slot, document in enumerate(documents):
            if document.kind.pairs is not None:
                doc_pairs = document.kind.pairs(self, document, None)
                pairs += doc_pairs
                owners += [slot] * len(doc_pairs)
        scored = continuation_scores(self, pairs, batch=self.batch_size * len(documents),
                                     rows=lambda indices: self.trainer.weights([owners[i] for i in indices]))
        results = []
        for slot, document in enumerate(documents):
            if document.kind.pairs is None:
                with self.trainer.weights(slot):
                    results.append(self.answers(document))
            else:
                results.append(document.kind.fold([x for x, owner in zip(scored, owners) if owner == slot]))
        return results

    def score_documents(self, documents: list[Document], neighbours: list[Neighbours]) -> list[dict]:
        """With experts: the document's experts chosen and merged, then trained and scored on
        top of them (``experts_s``: choosing and merging, the query's embedding included)."""
        if self.experts is None:
            return self._train_and_score(documents, neighbours)
        (document,) = documents
        start = time.perf_counter()
        query = self.retriever.query_vector(document.query(self.neighbour_settings.query))
        choice = self.experts.choose(query, self.ttt_settings.experts_top, self.ttt_settings.experts_temperature)
        with self.experts.applied(choice):
            seconds = time.perf_counter() - start
            (record,) = self._train_and_score(documents, neighbours)
        own = self.exclude_ids(document)
        trained_on = {i for c in choice.ids for i in self.experts.manifest.experts[c].docs}
        return [{**record, **choice.record(), "experts_s": seconds,
                 # a validation document drawn from the corpus: did its experts train on it?
                 **({"experts_trained_on_document": bool(own & trained_on)} if own else {})}]

    def _train_and_score(self, documents: list[Document], neighbours: list[Neighbours]) -> list[dict]:
        """Train up to each scoring point, score, and reset at the end. A batch's scoring and
        reset time is split evenly over its documents; training time is the trainer's own
        account per document."""
        tokens = [self.neighbour_tokens(n) for n in neighbours]
        scores: list[dict] = [{} for _ in documents]
        losses: list[list] = [[] for _ in documents]
        extra: list[dict] = [{} for _ in documents]
        score_s, done, scored_at = 0.0, 0, None
        work = [TrainWork() for _ in documents]
        try:
            for point in self.eval_at_k:
                if point > done:
                    for i, trained in enumerate(self.trainer.train([tok[done:point] for tok in tokens])):
                        losses[i] += trained
                done = point
                reached = [min(point, len(tok)) for tok in tokens]
                if reached == scored_at:
                    continue  # no document has a neighbour left to train on: same weights, same scores
                if self.ttt_settings.dyneval_iterations:
                    results, extra[0], seconds = self._score_dynamically(documents[0])
                    results = [results]
                else:
                    start = time.perf_counter()
                    results = self._results(documents)
                    seconds = time.perf_counter() - start
                score_s += seconds
                for i, result in enumerate(results):
                    scores[i][str(reached[i])] = result
                scored_at = reached
            if self.trainer is not None:
                work = [dataclasses.replace(w) for w in self.trainer.work()[: len(documents)]]
        finally:
            start = time.perf_counter()
            if self.trainer is not None:
                self.trainer.reset()
            reset_s = time.perf_counter() - start
        n = len(documents)
        return [{"results": scores[i][str(min(self.k, len(tokens[i])))], "results_at_k": scores[i],
                 "chunk_losses": losses[i], **work[i].record(), **extra[i], "score_s": score_s / n,
                 "reset_s": reset_s / n, **({"doc_batch": n} if self.trainer is not None and self.trainer.slots > 1
                                            else {})} for i in range(n)]

    def _score_dynamically(self, document: Document) -> tuple[list, dict, float]:
        """Dynamic evaluation after the neighbours: the answers, the log fields that tell the
        steps on the neighbours from those on the document, and the scoring seconds."""
        on_neighbours = dataclasses.replace(self.trainer.work()[0])
        results, window_lls, seconds = score_dynamically(self, self.trainer, document,
                                                          self.ttt_settings.dyneval_iterations,
                                                          lr=self.ttt_settings.dyneval_lr)
        total = self.trainer.work()[0]
        return results, {"neighbour_steps": on_neighbours.steps, "document_steps": total.steps - on_neighbours.steps,
                         "document_tokens": total.tokens - on_neighbours.tokens, "window_lls": window_lls}, seconds
