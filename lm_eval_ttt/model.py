"""``--model ttt-nn``: train on each document's nearest neighbours before scoring it.

Per ``loglikelihood_rolling`` request, one document at a time:
retrieve k neighbours -> one AdamW step per chunk, nearest first (or farthest first) ->
score with HFLM's own rolling log-likelihood in eval mode -> restore weights and optimizer.
With k = 0 nothing is trained and the scores are HFLM's, bit for bit. ``eval_at_k`` adds
scoring points on the way (the paper's curve) without re-scoring after every neighbour.
"""

from __future__ import annotations

import time

from lm_eval.api.instance import Instance

from .harness import NeighbourLM, as_bool, as_int_or_none
from .ttt import TestTimeTrainer, TTTConfig

ORDERS = ("nearest", "farthest")


def parse_eval_at_k(value, k: int) -> list[int]:
    """``"0:1:5"`` -> [0, 1, 5, k] (colons: lm-eval splits model_args on commas)."""
    if value is None or value == "":
        return [k]
    points = sorted({int(float(v)) for v in str(value).replace(",", ":").split(":") if v != ""} | {k})
    if points[0] < 0 or points[-1] > k:
        raise ValueError(f"eval_at_k values must lie in [0, k={k}], got {value!r}")
    return points


class TTTNNLM(NeighbourLM):
    method = "ttt-nn"

    def __init__(
        self,
        lr: float | None = None,
        max_neighbor_tokens: int | None = None,
        order: str = "nearest",
        reset_optimizer: bool = True,
        eval_at_k: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.order = order
        self.eval_at_k = parse_eval_at_k(eval_at_k, self.k)
        self.ttt_config = TTTConfig(
            lr=self.learning_rate(lr),
            max_length=self.max_length,
            max_neighbor_tokens=as_int_or_none(max_neighbor_tokens),
            reset_optimizer=as_bool(reset_optimizer),
            seed=self.seed,
        )
        self.trainer = TestTimeTrainer(self.model, self.ttt_config)

    def method_settings(self) -> dict:
        return {
            "lr": self.ttt_config.lr,
            "max_neighbor_tokens": self.ttt_config.max_neighbor_tokens,
            "order": self.order,
            "reset_optimizer": self.ttt_config.reset_optimizer,
            "eval_at_k": self.eval_at_k,
        }

    def score_document(self, request: Instance) -> dict:
        """Retrieve, train, score at each k of ``eval_at_k``, reset."""
        timings = {"retrieve_s": 0.0, "train_s": 0.0, "score_s": 0.0, "reset_s": 0.0}
        t = time.perf_counter()
        neighbours = self.neighbours(request)
        timings["retrieve_s"] = time.perf_counter() - t
        tokens = [self.tokenizer(n, add_special_tokens=False).input_ids for n in neighbours.texts]
        if self.order == "farthest":
            tokens = tokens[::-1]
        scores, losses, done = {}, [], 0
        try:
            for point in self.eval_at_k:
                t = time.perf_counter()
                losses += self.trainer.train(tokens[done:point])
                done = point
                timings["train_s"] += time.perf_counter() - t
                t = time.perf_counter()
                scores[str(min(point, len(tokens)))] = self.hf_score(request)
                timings["score_s"] += time.perf_counter() - t
        finally:
            t = time.perf_counter()
            self.trainer.reset()
            timings["reset_s"] = time.perf_counter() - t
        return {
            "loglikelihood": scores[str(min(self.k, len(tokens)))],
            "loglikelihood_at_k": scores,
            "neighbour_ids": neighbours.ids,
            "distances": neighbours.distances,
            "missing_shards": neighbours.missing_shards,
            "excluded_duplicates": neighbours.excluded_duplicates,
            "neighbours_found": len(neighbours.ids),
            "chunk_losses": losses,
            "train_steps": sum(map(len, losses)),
            **timings,
        }
