"""Paired bootstrap intervals over documents for bits per byte and its ratios.

The harness's bits per byte is an aggregate, -sum ll / (sum bytes * ln 2) over a task's
documents, so its uncertainty comes from which documents were drawn. A bootstrap resamples
the documents with replacement and recomputes each aggregate exactly as the harness does; a
*paired* bootstrap resamples the same documents for both runs of a ratio, so what two methods
share (a hard document is hard for both) cancels, and only their difference is left. Identical
runs give a ratio of exactly 1 in every resample: a zero-width interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0  # the same resamples for every run of a report: intervals are reproducible


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on the documents themselves
    low: float
    high: float
    documents: int

    def excludes(self, x: float) -> bool:
        return not self.low <= x <= self.high


Documents = Mapping[object, tuple[float, int]]  # document key -> (summed log-likelihood, UTF-8 bytes)


def _counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """How often each of n documents is drawn in each resample: (resamples, n)."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(value: float, samples: np.ndarray, n: int, level: float) -> Interval:
    tail = (1 - level) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return Interval(value, float(low), float(high), n)


def bits_per_byte_interval(documents: Documents, resamples: int = RESAMPLES, level: float = LEVEL,
                           seed: int = SEED) -> Interval | None:
    """Bits per byte of the documents with its bootstrap interval (None without documents)."""
    if not documents:
        return None
    lls, sizes = (np.array(v, dtype=np.float64) for v in zip(*documents.values()))
    counts = _counts(len(lls), resamples, seed)
    samples = -(counts @ lls) / ((counts @ sizes) * math.log(2))
    return _interval(float(-lls.sum() / (sizes.sum() * math.log(2))), samples, len(lls), level)


def ratio_interval(run: Documents, base: Documents, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = SEED) -> Interval | None:
    """bits per byte of ``run`` over that of ``base`` on the documents both scored, with the
    paired bootstrap interval (None when they share none). Each side's bytes come from its own
    record, so a mismatch in what was scored shows instead of cancelling."""
    shared = sorted(set(run) & set(base), key=str)
    if not shared:
        return None
    run_ll, run_bytes, base_ll, base_bytes = (np.array(v, dtype=np.float64) for v in zip(
        *((*run[d], *base[d]) for d in shared)))
    counts = _counts(len(shared), resamples, seed)
    samples = ((counts @ run_ll) / (counts @ run_bytes)) / ((counts @ base_ll) / (counts @ base_bytes))
    value = (run_ll.sum() / run_bytes.sum()) / (base_ll.sum() / base_bytes.sum())
    return _interval(float(value), samples, len(shared), level)
