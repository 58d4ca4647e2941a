"""The harness's rolling-likelihood metrics, written once (lm-eval's ``bits_per_byte``,
``byte_perplexity``, ``word_perplexity`` aggregations over summed log-likelihoods), and the
same aggregate at each scoring point of a run's per-document log records (its curve over k)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .documents import ROLLING

METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")


def bits_per_byte(loglikelihoods: Sequence[float], n_bytes: int) -> float:
    """-sum ll / (bytes * ln 2), natural-log log-likelihoods as the harness sums them."""
    return -sum(loglikelihoods) / (n_bytes * math.log(2))


def utf8_bytes(texts: Sequence[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)


def curve_points(records: Sequence[dict]) -> list[tuple[int, float, float]]:
    """(k, gradient steps per document up to k, bits per byte) from the ``results_at_k`` of
    rolling documents' log records. The steps are the neighbour steps up to k plus, with
    dynamic evaluation (a run of one scoring point), those on the document's own windows."""
    docs = [r for r in records if "results_at_k" in r and r.get("request_type") == ROLLING]
    if not docs:
        return []
    copies = [r.get("copies", 1) for r in docs]  # weighted as the harness weighs repeated documents
    total_bytes = sum(r["bytes"] * c for r, c in zip(docs, copies))
    # The scoring points are the keys of a document that reached the most neighbours; a document
    # with fewer (few candidates, adaptive stop) is keyed by what it reached and must not add
    # points of its own, where every other document would count its final score.
    richest = max(docs, key=lambda r: max(map(int, r["results_at_k"])))
    points = []
    for k in sorted(int(k) for k in richest["results_at_k"]):
        # a document's weights at k are those after the neighbours it had up to k
        lls = [_score_at(r["results_at_k"], k)[0] for r, c in zip(docs, copies) for _ in range(c)]
        steps = sum(sum(len(losses) for losses in r.get("chunk_losses", [])[:k]) + r.get("document_steps", 0)
                    for r in docs) / len(docs)
        points.append((k, steps, bits_per_byte(lls, total_bytes)))
    return points


def _score_at(results_at_k: dict[str, list], k: int) -> list:
    return results_at_k[str(max(int(key) for key in results_at_k if int(key) <= k))]
