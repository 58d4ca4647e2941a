"""The paper's baselines as harness models next to ``ttt-nn``, on the same base loop, so every
method sees the same neighbours of the same documents and logs the same way.

* ``ttt-nn-context``: the neighbours as in-context text before the document (every request
  type: before the rolling windows, the question's context, or the generation prompt).
* ``ttt-nn-interp``: the model's next-token distribution mixed with the neighbours' token
  histogram (rolling and multiple-choice requests; generation is refused).
* ``ttt-nn-dyneval``: dynamic evaluation, training on the document's own earlier windows
  (rolling requests only: the others have no earlier windows to learn from).

Each reduces to ``--model hf`` exactly when it has nothing to add (k = 0, lambda = 0,
iterations = 0).
"""

from __future__ import annotations

import math
import time

import torch

from index_server.encoder import CHARS_PER_TOKEN_BOUND

from .documents import KINDS, REQUEST_TYPES, Document
from .dyneval import score_dynamically
from .harness import NeighbourLM
from .retriever import Neighbours
from .scoring import continuation_scores
from .settings import (
    DEFAULT_DYNEVAL_LR,
    ContextSettings,
    DynamicEvalSettings,
    InterpolationSettings,
    ModelArgumentError,
    NeighbourSettings,
    RunSettings,
    TrainSettings,
)
from .trainers import build_trainer, check_train_settings, implied_hf_kwargs


class InContextLM(NeighbourLM):
    """Neighbours prepended as context: farthest first, the nearest adjacent to the document,
    trimmed from the far end to ``context_tokens``. For rolling documents the windows shrink
    by the context length so the document's own tokens are never truncated and only they are
    scored."""

    method = "ttt-nn-context"
    setting_groups = (RunSettings, NeighbourSettings, ContextSettings)

    def __init__(self, pretrained=None, **kwargs) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        budget = self.settings_of(ContextSettings).context_tokens
        self.context_tokens = self.max_length // 2 if budget is None else budget
        self._check_budget(self.context_tokens, self.max_length)

    @staticmethod
    def _check_budget(tokens: int | None, max_length: int | None) -> None:
        if tokens is not None and max_length is not None and not tokens < max_length:
            raise ModelArgumentError(f"context_tokens must lie in [0, max_length={max_length}), got {tokens}")

    def check_settings(self, hf_kwargs: dict) -> None:
        super().check_settings(hf_kwargs)  # with max_length given, the budget is checked before loading
        max_length = hf_kwargs.get("max_length")
        self._check_budget(self.settings_of(ContextSettings).context_tokens,
                           int(float(max_length)) if max_length is not None else None)

    def identity(self) -> dict:
        return {**super().identity(), "context_tokens": self.context_tokens}

    def neighbour_context(self, neighbour_texts: list[str]) -> list[int]:
        """Token ids ``... n3 <eot> n2 <eot> n1 <eot>`` cut to the last ``context_tokens``."""
        context: list[int] = []
        for text in neighbour_texts:  # nearest first: each one goes in front of the previous
            need = self.context_tokens - len(context)
            if need <= 0:
                break
            tail = text[-need * CHARS_PER_TOKEN_BOUND :]
            ids = self.tokenizer(tail, add_special_tokens=False).input_ids + [self.eot_token_id]
            context = ids[-need:] + context
        return context

    def score_document(self, document: Document, neighbours: Neighbours) -> dict:
        t = time.perf_counter()
        context = self.neighbour_context(neighbours.texts)
        results = self.answers(document, window=self.max_length - len(context), context=context)
        return {"results": results, "context_tokens_used": len(context), "score_s": time.perf_counter() - t}


class InterpolationLM(NeighbourLM):
    """p(t) = (1 - lambda) p_model(t) + lambda h(t), h the neighbours' token histogram.

    ``lambda`` must be chosen on documents that are not scored (``ttt-nn tune``).
    lambda = 0, and a document without neighbours, is the base model exactly.
    """

    method = "ttt-nn-interp"
    setting_groups = (RunSettings, NeighbourSettings, InterpolationSettings)
    request_types = tuple(name for name in REQUEST_TYPES if KINDS[name].pairs is not None)

    def __init__(self, pretrained=None, **kwargs) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self.lam = self.settings_of(InterpolationSettings).lam

    def histogram(self, neighbour_texts: list[str], vocab: int) -> torch.Tensor | None:
        """The neighbours' token frequencies; None without any neighbour token."""
        counts = torch.zeros(vocab, dtype=torch.float64, device=self.device)
        for text in neighbour_texts:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
            ids = ids[ids < vocab].to(self.device)
            counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64, device=self.device))
        total = counts.sum()
        return counts / total if total > 0 else None

    def mixed_scores(self, pairs: list[tuple[list[int], list[int]]], neighbour_texts: list[str]
                     ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each continuation under the mixed distribution."""
        hist = self.histogram(neighbour_texts, self.model.config.vocab_size) if self.lam > 0 else None
        transform = None
        if hist is not None:
            log_keep, log_hist = math.log1p(-self.lam), math.log(self.lam) + hist.log()

            def transform(logprobs: torch.Tensor) -> torch.Tensor:
                return torch.logaddexp(log_keep + logprobs.double(), log_hist[: logprobs.shape[-1]])

        return continuation_scores(self, pairs, self.batch_size, transform=transform)

    def score_document(self, document: Document, neighbours: Neighbours) -> dict:
        t = time.perf_counter()
        results = self.answers(document, score=lambda pairs: self.mixed_scores(pairs, neighbours.texts))
        return {"results": results, "score_s": time.perf_counter() - t}


class DynamicEvalLM(NeighbourLM):
    """Dynamic evaluation (``dyneval.py``) from the base weights, ``iterations`` AdamW steps on
    each window after scoring it; weights and optimizer reset per document. No retrieval: the
    baseline that learns from the test document alone."""

    method = "ttt-nn-dyneval"
    setting_groups = (RunSettings, TrainSettings, DynamicEvalSettings)
    request_types = tuple(name for name in REQUEST_TYPES if KINDS[name].own_text)

    def __init__(self, pretrained=None, **kwargs) -> None:
        super().__init__(pretrained=pretrained, **kwargs)
        self.iterations = self.settings_of(DynamicEvalSettings).iterations
        # one default rate for steps on a document's own windows, whichever model takes them
        self._model, self.trainer = build_trainer(self.model, self.settings_of(TrainSettings),
                                                  max_length=self.max_length,
                                                  seed=self.seed, pad_id=self.tokenizer.pad_token_id or 0,
                                                  peft_loaded=bool(self.peft), method_lr=DEFAULT_DYNEVAL_LR)

    def check_settings(self, hf_kwargs: dict) -> None:
        super().check_settings(hf_kwargs)
        check_train_settings(self.settings_of(TrainSettings), hf_kwargs)
        if self.settings_of(TrainSettings).doc_batch > 1:
            raise ModelArgumentError("ttt-nn-dyneval trains on each document's own windows in turn: doc_batch must "
                                     "be 1")

    def implied_hf_kwargs(self) -> dict:
        return implied_hf_kwargs(self.settings_of(TrainSettings))

    def identity(self) -> dict:
        return {**super().identity(), "lr": self.trainer.lr}

    def score_document(self, document: Document, neighbours: Neighbours) -> dict:
        try:
            results, window_lls, score_s = score_dynamically(self, self.trainer, document, self.iterations)
            work = self.trainer.work()[0].record()
        finally:
            start = time.perf_counter()
            self.trainer.reset()
            reset_s = time.perf_counter() - start
        return {"results": results, **work, "window_lls": window_lls, "score_s": score_s, "reset_s": reset_s}
