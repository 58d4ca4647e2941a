"""Selecting what to train on: SIFT's greedy posterior-variance minimisation,
adaptive compute, and the selection stage shared by every method and both backends."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_lm, requests
from fakes import FakeIndex

from lm_eval_ttt.model import TTTNNLM
from lm_eval_ttt.retriever import Retriever
from lm_eval_ttt.runlog import read_log
from lm_eval_ttt.selection import normalise, select_sift, sigmas_of
from lm_eval_ttt.settings import NeighbourSettings


def posterior_variance(q: np.ndarray, picked: np.ndarray, lam: float) -> float:
    """sigma^2(q | X) = k(q,q) - k_X(q)^T (K_X + lam I)^-1 k_X(q), straight from the definition."""
    if len(picked) == 0:
        return float(q @ q)
    k_x = picked @ q
    return float(q @ q - k_x @ np.linalg.solve(picked @ picked.T + lam * np.eye(len(picked)), k_x))


def brute_force_greedy(query, candidates, k, lam, repeats=True) -> tuple[list[int], list[float]]:
    """At each step, the candidate whose (noisy) observation leaves the smallest posterior
    variance of the query, recomputed from scratch for every candidate."""
    q, x = normalise(query[None])[0], normalise(candidates)
    order, sigmas = [], []
    for _ in range(k):
        options = [j for j in range(len(x)) if repeats or j not in order]
        variances = [posterior_variance(q, x[order + [j]], lam) for j in options]
        best = options[int(np.argmin(variances))]
        order.append(best)
        sigmas.append(float(np.sqrt(max(min(variances), 0.0))))
    return order, sigmas


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_candidates, dim", [(8, 4), (20, 16), (50, 32), (50, 384)])
def test_greedy_selection_equals_brute_force(seed, n_candidates, dim):
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim)
    candidates = centre + rng.standard_normal((n_candidates, dim)) * rng.uniform(0.3, 2.0)
    query = centre + rng.standard_normal(dim)
    for lam, repeats in ((0.01, True), (0.5, True), (0.1, False)):
        k = min(12, n_candidates)
        picked = select_sift(query, candidates, k, lam, repeats=repeats)
        order, sigmas = brute_force_greedy(query, candidates, k, lam, repeats)
        assert picked.order == order, (lam, repeats)
        np.testing.assert_allclose(picked.sigmas, sigmas, rtol=1e-7, atol=1e-9)


def test_first_pick_is_the_nearest_by_absolute_cosine():
    rng = np.random.default_rng(1)
    candidates, query = rng.standard_normal((40, 16)), rng.standard_normal(16)
    candidates[7] = -2.5 * query + 0.1 * rng.standard_normal(16)  # anti-correlated: informative too
    cosines = normalise(candidates) @ normalise(query[None])[0]
    assert select_sift(query, candidates, 1, 0.01).order == [int(np.argmax(np.abs(cosines)))] == [7]


def test_large_lambda_without_repeats_degenerates_to_absolute_cosine_order():
    """Property: as lambda grows, every observation is so noisy that picking one barely
    changes the others' covariance with the query (updates are O(1/lambda)), so the greedy
    order becomes the prior ranking by <q,x>^2 / (|x|^2 + lambda), i.e. by |cosine| for
    normalised vectors; without repeats that is nearest-neighbour order by |cosine|."""
    rng = np.random.default_rng(2)
    candidates, query = rng.standard_normal((30, 8)), rng.standard_normal(8)
    by_cosine = list(np.argsort(-np.abs(normalise(candidates) @ normalise(query[None])[0]), kind="stable"))
    assert select_sift(query, candidates, 30, 1e6, repeats=False).order == by_cosine
    assert select_sift(query, candidates, 30, 1e-3, repeats=False).order != by_cosine  # small lambda diversifies


def test_redundant_candidates_are_skipped_and_repeats_are_allowed():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal(16), rng.standard_normal(16)
    query = a + b
    candidates = np.stack([a + 0.01 * rng.standard_normal(16) for _ in range(5)] + [b])  # 5 near-copies of a
    picked = select_sift(query, candidates, 2, 0.01)
    assert set(picked.order) == {picked.order[0], 5} and picked.order[0] < 5  # one copy of a, then b
    assert len(set(select_sift(query, candidates[:1], 3, 0.01).order)) == 1  # one candidate: picked again


def test_adaptive_stopping_stops_on_irrelevant_candidates_not_on_near_identical_ones():
    rng = np.random.default_rng(4)
    query = rng.standard_normal(64)
    irrelevant = rng.standard_normal((50, 64))  # nearly orthogonal to the query in 64 dimensions
    similar = query + 0.02 * rng.standard_normal((50, 64))
    alpha = 0.5  # sigma ~ 1 allows 1/alpha = 2 steps; informative candidates drive sigma down fast
    stopped = select_sift(query, irrelevant, 20, 0.01, alpha=alpha)
    assert stopped.stop_reason == "alpha" and len(stopped.order) <= 2
    kept = select_sift(query, similar, 20, 0.01, alpha=alpha)
    assert kept.stop_reason == "k reached" and len(kept.order) == 20
    assert kept.sigmas[-1] < 0.05 < stopped.sigmas[0] if stopped.sigmas else kept.sigmas[-1] < 0.05


def test_sigmas_along_nearest_order_use_the_same_surrogate():
    rng = np.random.default_rng(5)
    query, candidates = rng.standard_normal(8), rng.standard_normal((6, 8))
    order = [0, 1, 2]
    expected = [np.sqrt(posterior_variance(normalise(query[None])[0], normalise(candidates)[order[: i + 1]], 0.1))
                for i in range(3)]
    np.testing.assert_allclose(sigmas_of(query, candidates, order, 0.1), expected, rtol=1e-9)


def test_gain_can_grow_after_a_pick_so_lazy_greedy_is_not_exact():
    """Why selection is exact greedy, not SIFT-Fast's lazy queue: the variance reduction is not
    submodular. Here candidate 1 is useless alone (orthogonal to the query) but valuable once
    candidate 0 is known, so a stale score is no upper bound."""
    from lm_eval_ttt.selection import _Posterior

    query = np.array([1.0, 0.0])
    candidates = np.array([[1.0, 1.0], [0.0, 1.0]])
    posterior = _Posterior(query, candidates, 0.01)
    before = posterior.gains()[1]
    posterior.observe(0)
    assert before < 1e-12 < posterior.gains()[1]


def test_sift_through_the_model_logs_its_selection(tiny_lm, small_index, test_docs, tmp_path):
    """One real run: SIFT over gRPC shard servers; the picks equal the in-process index's."""
    from index_server.server import ServerConfig, start_server

    server, port, _ = start_server(ServerConfig(index=small_index))
    try:
        lm = make_lm(TTTNNLM, tmp_path, tiny_lm, f"grpc://127.0.0.1:{port}", k=6, select="sift", candidates=40,
                     sift_lambda=0.01, eval_at_k="0:3", max_neighbor_tokens=32)
        lm.loglikelihood_rolling(requests(test_docs[:2]), disable_tqdm=True)
        records = list(read_log(lm.log_stem).values())
        for r in records:
            assert len(r["neighbour_ids"]) == len(r["sigmas"]) == 6 and r["stop_reason"] == "k reached"
            assert r["candidates"] == 40 and r["vectors"] == "exact"
            assert all(a >= b for a, b in zip(r["sigmas"], r["sigmas"][1:]))  # uncertainty only falls
            assert len(r["chunk_losses"]) == 6  # one training pass per selected example
        direct = Retriever.open(NeighbourSettings(index=str(small_index), select="sift", candidates=40))
        assert records[0]["neighbour_ids"] == direct.neighbours(test_docs[0], 6).ids  # same picks on both backends
        lm.close()
    finally:
        server.stop(0)


def test_nearest_selection_is_the_index_top_k(small_index, test_docs):
    from index_server.search import LocalIndex

    plain = Retriever.open(NeighbourSettings(index=str(small_index)))
    local = LocalIndex(small_index)
    found = plain.neighbours(test_docs[0], 5)
    top = local.search(plain.encoder.encode([test_docs[0]]), 5)
    assert found.ids == top.ids[0].tolist() and found.stop_reason == "k reached"
    assert len(found.sigmas) == 5 and found.vectors == "exact"


def test_switching_the_selector_reuses_the_cached_candidates(corpus_texts, test_docs, tmp_path):
    index = FakeIndex(corpus_texts)
    first = Retriever(index, NeighbourSettings(select="sift", candidates=30), tmp_path, encoder=index.encoder)
    first.neighbours(test_docs[1], 4)
    again = Retriever(index, NeighbourSettings(select="nearest"), tmp_path, encoder=index.encoder)
    assert again.neighbours(test_docs[1], 4).cached and index.calls["search"] == 1


def test_lossy_index_candidates_are_re_embedded(corpus_texts, test_docs):
    """An index that keeps only PQ codes has no vectors to give: SIFT re-embeds the texts."""
    index = FakeIndex(corpus_texts, lossy=True)
    sift = Retriever(index, NeighbourSettings(select="sift", candidates=12), encoder=index.encoder)
    calls = index.encoder.calls
    found = sift.neighbours(test_docs[0], 3)
    assert found.vectors == "re-embedded" and len(found.ids) == 3
    assert index.encoder.calls == calls + 2  # the query, then the candidates' texts
