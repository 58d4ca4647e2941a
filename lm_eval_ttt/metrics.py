"""The harness's rolling-likelihood metrics, written once (lm-eval's ``bits_per_byte``,
``byte_perplexity``, ``word_perplexity`` aggregations over summed log-likelihoods)."""

from __future__ import annotations

import math
from collections.abc import Sequence

METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")


def bits_per_byte(loglikelihoods: Sequence[float], n_bytes: int) -> float:
    """-sum ll / (bytes * ln 2), natural-log log-likelihoods as the harness sums them."""
    return -sum(loglikelihoods) / (n_bytes * math.log(2))


def utf8_bytes(texts: Sequence[str]) -> int:
    return sum(len(t.encode("utf-8")) for t in texts)
