"""Choosing what to train on among retrieved candidates: nearest-first, or SIFT.

SIFT (Hübotter et al., ICLR 2025; jonhue/activeft) models the query's embedding with a
Gaussian process whose kernel is linear in the (normalised) embeddings,
k(x, x') = <x, x'>, and observations carry noise of variance ``lam``. It greedily picks the
candidate that most reduces the posterior variance of the query,

    sigma^2(q | X) = k(q, q) - k_X(q)^T (K_X + lam I)^-1 k_X(q),

allowing repeats (one more gradient step on a very informative candidate). A near-duplicate
of something already picked no longer reduces the variance, so redundancy is avoided;
``lam`` trades relevance for diversity. The first pick maximises <q, x>^2 / (1 + lam): the
nearest candidate by |cosine|, so SIFT's first step equals nearest neighbours'.

Implementation: exact greedy with rank-one updates of every candidate's posterior
covariance with the query and posterior variance (a pivoted incremental Cholesky, the
role SIFT-Fast's incremental inverse plays): O(K d) per step, vectorised over the K
candidates, so K in the thousands costs milliseconds. activeft's SIFT-Fast instead keeps a
lazy priority queue whose stale scores it treats as upper bounds; the variance reduction is
not submodular (a candidate's score can *grow* after another is picked), so lazy greedy can
pick differently from greedy. Exact greedy has no such gap and is fast enough.

Adaptive compute (activeft PR #93): with sigma_n the posterior standard deviation after
n picks, selection stops before step n when sigma_n > 1 / (alpha n). activeft applies this
as a filter with exact VTL and gets NaN with SIFT-Fast; here it stops the sequence, for
both. ``sigmas`` for nearest-first order use the same surrogate, so the two compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STOP_K = "k reached"
STOP_ALPHA = "alpha"
STOP_DISTANCE = "max_distance"
STOP_EXHAUSTED = "candidates exhausted"
STOP_NONE = "no candidates"


@dataclass
class Selection:
    order: list[int]  # candidate positions, in training order (repeats possible for SIFT)
    sigmas: list[float]  # posterior standard deviation of the query after each step
    stop_reason: str


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class _Posterior:
    """Posterior of the query and the candidates under the linear-kernel surrogate,
    updated one noisy observation at a time."""

    def __init__(self, query: np.ndarray, candidates: np.ndarray, lam: float):
        self.x = normalise(candidates)
        q = normalise(query[None])[0]
        self.lam = lam
        self.cov = self.x @ q  # cov(q, x_j | picks)
        self.var = np.einsum("ij,ij->i", self.x, self.x)  # var(x_j | picks)
        self.var_q = float(q @ q)
        self.updates: list[np.ndarray] = []  # u_t over the candidates: Sigma = K - sum_t u_t u_t^T

    def gains(self) -> np.ndarray:
        """Reduction of the query's variance if each candidate were observed next."""
        return self.cov**2 / (self.var + self.lam)

    def observe(self, j: int) -> float:
        """Condition on a noisy observation of candidate j; returns the query's new std."""
        cross = self.x @ self.x[j]  # prior cov(x_i, x_j)
        for u in self.updates:
            cross -= u * u[j]
        scale = np.sqrt(self.var[j] + self.lam)
        u, u_q = cross / scale, self.cov[j] / scale
        self.cov -= u_q * u
        self.var -= u * u
        self.var_q -= u_q * u_q
        self.updates.append(u)
        return float(np.sqrt(max(self.var_q, 0.0)))


def _stop_for_alpha(alpha: float | None, sigma: float, step: int) -> bool:
    return alpha is not None and sigma > 1.0 / (alpha * step)


def select_sift(query: np.ndarray, candidates: np.ndarray, k: int, lam: float, alpha: float | None = None,
                repeats: bool = True) -> Selection:
    """Greedy posterior-variance minimisation: up to k picks among the candidate rows."""
    if len(candidates) == 0:
        return Selection([], [], STOP_NONE)
    posterior = _Posterior(query, candidates, lam)
    order, sigmas = [], []
    while len(order) < k:
        gains = posterior.gains()
        if not repeats:
            gains[order] = -np.inf
            if len(order) == len(candidates):
                return Selection(order, sigmas, STOP_EXHAUSTED)
        j = int(np.argmax(gains))  # ties go to the nearer candidate (lower position)
        sigma = posterior.observe(j)
        if _stop_for_alpha(alpha, sigma, len(order) + 1):
            return Selection(order, sigmas, STOP_ALPHA)
        order.append(j)
        sigmas.append(sigma)
    return Selection(order, sigmas, STOP_K)


def sigmas_of(query: np.ndarray, candidates: np.ndarray, order: list[int], lam: float) -> list[float]:
    """Posterior standard deviations of the query along a given order (nearest-first)."""
    posterior = _Posterior(query, candidates, lam)
    return [posterior.observe(j) for j in order]
