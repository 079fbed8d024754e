"""Tests of qinco2.ivfsearch.aq: least-squares additive codebooks from co-occurrence counts."""

from __future__ import annotations

import numpy as np
import pytest

from qinco2.errors import InputError
from qinco2.ivfsearch.aq import additive_decode, fit_additive_codebooks
from qinco2.metrics import mse


def _additive_data(N=2000, M=3, K=8, D=5, noise=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    tables = rng.normal(size=(M, K, D)).astype(np.float32)
    codes = rng.integers(0, K, size=(N, M))
    clean = additive_decode(codes, tables)
    return codes, clean, clean + noise * rng.normal(size=clean.shape).astype(np.float32)


def _dense_lstsq_reconstruction(codes, targets, K):
    """Slow obvious reference: min-norm lstsq on the explicit one-hot design matrix."""
    N, M = codes.shape
    design = np.zeros((N, M * K))
    for m in range(M):
        design[np.arange(N), m * K + codes[:, m]] = 1.0
    X, *_ = np.linalg.lstsq(design, targets.astype(np.float64), rcond=None)
    return design @ X


def test_recovers_reconstructions_of_additive_data():
    codes, clean, targets = _additive_data()
    T = fit_additive_codebooks(codes, targets, 8)
    assert T.shape == (3, 8, 5) and T.dtype == np.float32
    recon = additive_decode(codes, T)
    # the tables themselves are only defined up to constants moved between steps; the
    # reconstructions are unique. Noise std 1e-3 on ~unit signals: the estimation error of 24
    # table rows from 2000 vectors is ~3e-9 relative (observed), 1e-7 leaves 30x slack
    assert mse(clean, recon) / mse(clean, 0 * clean) < 1e-7
    # least squares: no worse on the targets than the generating tables (float32 slack)
    assert mse(targets, recon) <= mse(targets, clean) * (1 + 1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_dense_lstsq_on_tiny_sizes(seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, size=(60, 3))
    codes[:, 2] = np.minimum(codes[:, 2], 2)         # code 3 of step 2 unused: extra rank loss
    targets = rng.normal(size=(60, 3))
    ref = _dense_lstsq_reconstruction(codes, targets, 4)
    recon = additive_decode(codes, fit_additive_codebooks(codes, targets, 4))
    # float32 tables and a 1e-6 ridge on counts >= 1: 1e-4 relative is generous
    assert np.linalg.norm(recon - ref) <= 1e-4 * np.linalg.norm(ref)


def test_no_worse_than_per_step_means():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 6, size=(1500, 4))
    # non-additive targets: a product of two codes' features plus noise
    f = rng.normal(size=(6, 4))
    targets = f[codes[:, 0]] * f[codes[:, 1]] + f[codes[:, 2]] + 0.3 * rng.normal(size=(1500, 4))
    baseline = np.zeros((4, 6, 4))
    residual = targets.copy()
    for m in range(4):                                  # residual means, one step after the other
        for k in range(6):
            rows = codes[:, m] == k
            baseline[m, k] = residual[rows].mean(0)
        residual -= baseline[m][codes[:, m]]
    lsq = mse(targets, additive_decode(codes, fit_additive_codebooks(codes, targets, 6)))
    assert lsq <= mse(targets, additive_decode(codes, baseline)) * (1 + 1e-6)
    assert lsq < mse(targets, 0 * targets)


def test_batching_and_unused_codes():
    codes, _, targets = _additive_data(N=300, K=10)
    codes[:, 1] %= 5                                   # codes 5..9 of step 1 never used
    T = fit_additive_codebooks(codes, targets, 10)
    assert np.isfinite(T).all() and np.abs(T[1, 5:]).max() < 1e-6
    # float64 sums in another order, float32 output: 1e-5 is ~100x float32 rounding
    np.testing.assert_allclose(additive_decode(codes, fit_additive_codebooks(codes, targets, 10, batch=7)),
                               additive_decode(codes, T), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_typed_errors():
    codes, _, targets = _additive_data(N=50)
    with pytest.raises(InputError, match="K=4"):
        fit_additive_codebooks(codes, targets, 4)
    with pytest.raises(InputError, match="rows"):
        fit_additive_codebooks(codes, targets[:10], 8)
    with pytest.raises(InputError, match="integer"):
        fit_additive_codebooks(codes.astype(np.float32), targets, 8)
    with pytest.raises(InputError, match="columns"):
        additive_decode(codes[:, :2], np.zeros((3, 8, 5)))


def test_decode_is_the_sum_of_table_rows_and_adds_in_place():
    rng = np.random.default_rng(3)
    tables = rng.normal(size=(4, 16, 6)).astype(np.float32)
    codes = rng.integers(0, 16, size=(50, 4))
    slow = np.array([sum(tables[m, row[m]].astype(np.float64) for m in range(4)) for row in codes])
    np.testing.assert_allclose(additive_decode(codes, tables), slow, rtol=1e-5, atol=1e-5)
    base = rng.normal(size=(50, 6)).astype(np.float32)
    out = base.copy()
    assert additive_decode(codes, tables, out_ND=out) is out
    np.testing.assert_allclose(out, base + slow, rtol=1e-5, atol=1e-5)
