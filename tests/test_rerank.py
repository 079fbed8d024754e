"""Exact re-ranking: against a sort by brute force; ties keep the order of the candidates."""

from __future__ import annotations

import numpy as np

from qinco2.rerank import exact_rerank


def test_exact_rerank_orders_by_distance_then_candidate_order():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(50, 4)).astype(np.float32)
    db[30] = db[7]                                     # an exact tie: same vector, two ids
    q = db[[7, 12]] + np.float32(1e-3)
    others = np.setdiff1d(np.arange(50), [7, 30])
    cand = np.stack([np.r_[30, 7, rng.permutation(others)[:18]],   # the larger id of the tie first
                     rng.permutation(50)[:20]])
    cand[1, 5] = -1                                    # "no candidate"
    dist, ids = exact_rerank(q, cand, lambda i: db[i], 5)
    for r in range(2):
        valid = [c for c in cand[r].tolist() if c >= 0]
        ref = sorted(valid, key=lambda c: float(((db[c] - q[r]) ** 2).sum(dtype=np.float32)))[:5]  # stable
        assert ids[r].tolist() == ref
    assert ids[0, :2].tolist() == [30, 7]
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_query_batches_give_the_same_result_for_every_metric():
    """Queries re-ranked in batches of a few rows (many chunks) equal one whole batch."""
    rng = np.random.default_rng(1)
    db = rng.normal(size=(200, 6)).astype(np.float32)
    q = rng.normal(size=(23, 6)).astype(np.float32)
    cand = np.stack([rng.permutation(200)[:17] for _ in range(23)])
    cand[3, 4] = -1
    for metric in ("sqeuclidean", "inner_product", "cosine"):
        whole = exact_rerank(q, cand, lambda i: db[i], 5, metric=metric)
        small = exact_rerank(q, cand, lambda i: db[i], 5, metric=metric, batch_rows=2 * 17)
        np.testing.assert_array_equal(small[1], whole[1])
        np.testing.assert_array_equal(small[0], whole[0])
