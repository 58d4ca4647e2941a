"""The paper's baselines as harness models next to ``ttt-nn``, sharing its retriever and
neighbour cache so every method sees the same neighbours of the same documents.

* ``ttt-nn-context``: the neighbours as in-context text before the document.
* ``ttt-nn-interp``: the model's next-token distribution mixed with the neighbours' token
  histogram.
* ``ttt-nn-dyneval``: dynamic evaluation, training on the document's own earlier windows.

Each reduces to ``--model hf`` exactly when it has nothing to add (k = 0, lambda = 0,
iterations = 0): all of them score the harness's own disjoint rolling windows.
"""

from __future__ import annotations

import math
import time

import torch
from lm_eval.api.instance import Instance

from .harness import NeighbourLM, as_int_or_none
from .ttt import TestTimeTrainer, TTTConfig

# Characters of a neighbour tokenised when only its tail is needed as context.
_CHARS_PER_TOKEN_BOUND = 64


class InContextLM(NeighbourLM):
    """Neighbours prepended as context: farthest first, the nearest adjacent to the document,
    trimmed from the far end to ``context_tokens``. Windows shrink by the context length so
    the document's own tokens are never truncated; only they are scored. (The reference
    baseline fed the tail of the farthest neighbours instead.)"""

    method = "ttt-nn-context"

    def __init__(self, context_tokens: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        budget = as_int_or_none(context_tokens)
        self.context_tokens = self.max_length // 2 if budget is None else budget
        if not 0 <= self.context_tokens < self.max_length:
            raise ValueError(f"context_tokens must lie in [0, max_length={self.max_length}), got {self.context_tokens}")

    def method_settings(self) -> dict:
        return {"context_tokens": self.context_tokens}

    def neighbour_context(self, neighbour_texts: list[str]) -> list[int]:
        """Token ids ``... n3 <eot> n2 <eot> n1 <eot>`` cut to the last ``context_tokens``."""
        context: list[int] = []
        for text in neighbour_texts:  # nearest first: each one goes in front of the previous
            need = self.context_tokens - len(context)
            if need <= 0:
                break
            tail = text[-need * _CHARS_PER_TOKEN_BOUND :]
            ids = self.tokenizer(tail, add_special_tokens=False).input_ids + [self.eot_token_id]
            context = ids[-need:] + context
        return context

    def context_windows(self, text: str, neighbour_texts: list[str]) -> list[tuple[list[int], list[int]]]:
        context = self.neighbour_context(neighbour_texts)
        return [(context + ctx, cont) for ctx, cont in self.windows(text, self.max_length - len(context))]

    def score_document(self, request: Instance) -> dict:
        t = time.perf_counter()
        neighbours = self.neighbours(request)
        retrieve_s = time.perf_counter() - t
        t = time.perf_counter()
        windows = self.context_windows(request.args[0], neighbours.texts)
        scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
        return {
            "loglikelihood": sum(ll for ll, _ in scored),
            "neighbour_ids": neighbours.ids,
            "distances": neighbours.distances,
            "context_tokens_used": len(windows[0][0]) - 1,
            "windows": len(windows),
            "retrieve_s": retrieve_s,
            "score_s": time.perf_counter() - t,
        }


class InterpolationLM(NeighbourLM):
    """p(t) = (1 - lambda) p_model(t) + lambda h(t), h the neighbours' token histogram.

    ``lambda`` (alias ``lam``) must be chosen on documents that are not scored: the README
    shows the validation sweep on the index split. lambda = 0 is the base model exactly.
    """

    method = "ttt-nn-interp"

    def __init__(self, lam: float = 0.1, **kwargs) -> None:
        lam = float(kwargs.pop("lambda", lam))
        super().__init__(**kwargs)
        if not 0 <= lam < 1:
            raise ValueError(f"lambda must lie in [0, 1), got {lam}")
        self.lam = lam

    def method_settings(self) -> dict:
        return {"lambda": self.lam}

    def histogram(self, neighbour_texts: list[str], vocab: int) -> torch.Tensor:
        counts = torch.zeros(vocab, dtype=torch.float64, device=self.device)
        for text in neighbour_texts:
            ids = torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
            ids = ids[ids < vocab].to(self.device)
            counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64, device=self.device))
        return counts / counts.sum().clamp(min=1.0)

    def score_document(self, request: Instance) -> dict:
        t = time.perf_counter()
        neighbours = self.neighbours(request)
        retrieve_s = time.perf_counter() - t
        t = time.perf_counter()
        log_keep = math.log1p(-self.lam)
        log_lam = math.log(self.lam) if self.lam > 0 else -math.inf
        total, hist = 0.0, None
        with torch.no_grad():
            for ctx, cont in self.windows(request.args[0]):
                inputs = torch.tensor([(ctx + cont)[:-1]], device=self.device)
                logits = self.model(inputs).logits[0, -len(cont) :]
                targets = torch.tensor(cont, device=self.device)
                model_lp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0].double()
                if hist is None:
                    hist = self.histogram(neighbours.texts, logits.shape[-1])
                mixed = torch.logaddexp(log_keep + model_lp, log_lam + hist[targets].log())
                total += float(mixed.sum())
        return {
            "loglikelihood": total,
            "neighbour_ids": neighbours.ids,
            "distances": neighbours.distances,
            "retrieve_s": retrieve_s,
            "score_s": time.perf_counter() - t,
        }


class DynamicEvalLM(NeighbourLM):
    """Dynamic evaluation (Krause et al.): score a window, then take ``iterations`` AdamW
    steps on it before scoring the next one; weights and optimizer reset per document.
    No retrieval: the baseline that learns from the test document alone."""

    method = "ttt-nn-dyneval"
    uses_retrieval = False

    def __init__(self, lr: float | None = None, iterations: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.iterations = as_int_or_none(iterations) or 0
        config = TTTConfig(lr=self.learning_rate(lr), max_length=self.max_length, seed=self.seed)
        self.trainer = TestTimeTrainer(self.model, config)

    def method_settings(self) -> dict:
        return {"lr": self.trainer.config.lr, "iterations": self.iterations}

    def score_document(self, request: Instance) -> dict:
        total, train_s, score_s = 0.0, 0.0, 0.0
        try:
            for ctx, cont in self.windows(request.args[0]):
                t = time.perf_counter()
                total += self._loglikelihood_tokens([(None, ctx, cont)], disable_tqdm=True)[0][0]
                score_s += time.perf_counter() - t
                t = time.perf_counter()
                self.trainer.train([ctx + cont] * self.iterations)
                train_s += time.perf_counter() - t
        finally:
            self.trainer.reset()
        return {"loglikelihood": total, "train_s": train_s, "score_s": score_s}
