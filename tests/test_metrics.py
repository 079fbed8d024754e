"""Tests of qinco2.metrics on hand-made inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qinco2.errors import InputError
from qinco2.metrics import code_usage, knn, mse, recall_at


def test_recall_at_hand_made_ids():
    ids = np.array([[3, 1, 2, 0],
                    [0, 5, 6, 7],
                    [9, 9, 9, 4],
                    [8, 8, 8, 8]])
    gt = np.array([3, 5, 4, 1])
    assert recall_at(ids, gt, ks=(1, 2, 4)) == {1: 0.25, 2: 0.5, 4: 0.75}
    # a ground-truth table (Q, k): only the first column (the true nearest neighbour) counts
    gt_table = np.stack([gt, [1, 0, 9, 8]], axis=1)
    assert recall_at(ids, gt_table, ks=(1, 4)) == {1: 0.25, 4: 0.75}


def test_recall_is_non_decreasing_in_k():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (50, 10))
    r = recall_at(ids, rng.integers(0, 20, 50), ks=range(1, 11))
    assert all(r[k] <= r[k + 1] for k in range(1, 10))


def test_mse_matches_numpy_and_batches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 7)).astype(np.float32)
    y = x + rng.normal(scale=0.1, size=x.shape).astype(np.float32)
    want = float(((x.astype(np.float64) - y) ** 2).sum(1).mean())
    assert mse(x, y) == pytest.approx(want, rel=1e-12)
    assert mse(x, y, batch=33) == pytest.approx(want, rel=1e-12)  # batching changes nothing
    assert mse(x, y, scale=1e-4) == pytest.approx(want * 1e-4, rel=1e-12)
    assert mse(x, x) == 0.0


def test_knn_matches_brute_force():
    rng = np.random.default_rng(2)
    q, db = rng.normal(size=(20, 5)), rng.normal(size=(100, 5))
    d = ((q[:, None] - db[None]) ** 2).sum(-1)
    assert np.array_equal(knn(q, db, 3), np.argsort(d, axis=1)[:, :3])
    assert knn(q, db[:2], 5).shape == (20, 2)  # k is capped at the database size


def test_code_usage_entropy():
    K = 8
    uniform = np.tile(np.arange(K), 5)[:, None]                  # every code 5 times
    single = np.zeros((40, 1), np.int64)                          # one code only
    half = np.repeat(np.arange(K // 2), 10)[:, None]              # 4 codes, equally often
    used, entropy = code_usage(np.hstack([uniform, single, half]), [K, K, K])
    np.testing.assert_allclose(used, [1.0, 1 / K, 0.5])
    np.testing.assert_allclose(entropy, [math.log2(K), 0.0, 2.0], atol=1e-12)


def test_knn_inner_product_matches_numpy_brute_force():
    rng = np.random.default_rng(3)
    q = rng.normal(size=(30, 12)).astype(np.float32)
    x = (rng.normal(size=(200, 12)) * rng.uniform(0.2, 3.0, (200, 1))).astype(np.float32)  # norms vary
    scores = q.astype(np.float64) @ x.T.astype(np.float64)
    want_ip = np.argsort(-scores, axis=1, kind="stable")[:, :5]  # largest inner product first
    np.testing.assert_array_equal(knn(q, x, 5, metric="ip"), want_ip)
    d2 = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    want_l2 = np.argsort(d2, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(knn(q, x, 5), want_l2)  # the default stays L2
    assert (want_ip != want_l2).any()  # vectors of varying norm: the rankings differ


def test_knn_metrics_agree_on_unit_norm_vectors_and_bad_metric_raises():
    rng = np.random.default_rng(4)
    q, x = rng.normal(size=(20, 8)), rng.normal(size=(100, 8))
    q, x = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (q, x))
    np.testing.assert_array_equal(knn(q, x, 3, metric="ip"), knn(q, x, 3, metric="l2"))
    with pytest.raises(InputError, match="'l2'.*'ip'"):
        knn(q, x, 3, metric="cosine")
