"""qinco2.kmeans: the one Lloyd k-means, against a slow obvious numpy reference and faiss."""

from __future__ import annotations

import tracemalloc

import faiss
import numpy as np
import pytest
import torch

from qinco2.errors import InputError
from qinco2.kmeans import _assign_and_sum, _Points, kmeans, nearest, kmeans_progress


def _blobs(n: int, D: int, n_blobs: int, seed: int, spread: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, spread, (n_blobs, D))
    return (centres[rng.integers(n_blobs, size=n)] + rng.normal(size=(n, D))).astype(np.float32)


def _mse(x, c) -> float:
    return float(faiss.knn(np.ascontiguousarray(x, dtype=np.float32), c, 1)[0].mean())


def _reference_lloyd(x_ND, c_KD, niter, w_N=None):
    """Plain float64 Lloyd: nearest centroid by a full distance table, weighted means.
    Returns the centroids and the assignment to them."""
    x, c = x_ND.astype(np.float64), c_KD.astype(np.float64).copy()
    w = np.ones(len(x)) if w_N is None else w_N.astype(np.float64)
    for _ in range(niter):
        assign = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        for k in range(len(c)):
            mine = assign == k
            assert w[mine].sum() > 0, "the reference is only used on data without empty clusters"
            c[k] = (w[mine, None] * x[mine]).sum(0) / w[mine].sum()
    return c, ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


@pytest.fixture(scope="module")
def tiny():
    """200 points in 6 blobs (D=4) and 5 of them as initial centroids; no cluster empties on
    this data (the reference checks), so both implementations follow the same path."""
    x = _blobs(200, 4, 6, seed=1)
    return x, x[[0, 40, 80, 120, 160]].copy()


# ----------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("weighted", [False, True])
def test_same_as_the_reference_lloyd(tiny, weighted):
    x, c0 = tiny
    w = np.random.default_rng(2).uniform(0.1, 3, len(x)) if weighted else None
    if weighted:
        w[::7] = 0                                  # points without weight do not move centroids
    c = kmeans(x, 5, niter=6, init=c0, weights=w)
    c_ref, assign_ref = _reference_lloyd(x, c0, 6, w)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-5)        # float32 centroids
    np.testing.assert_array_equal(faiss.knn(x, c, 1)[1][:, 0], assign_ref)


def test_groups_are_independent_k_means(tiny):
    x, c0 = tiny
    rng = np.random.default_rng(3)
    x_GND = np.stack([x, x[rng.permutation(len(x))] * 2 + 1, x[:, ::-1]])
    c0_GKD = np.stack([c0, c0 * 2 + 1, c0[:, ::-1]])
    w = rng.uniform(0.5, 2, len(x))
    for weights in (None, w):
        c_GKD = kmeans(x_GND, 5, niter=4, init=c0_GKD, weights=weights)
        assert c_GKD.shape == (3, 5, 4)
        for g in range(3):
            c_ref, _ = _reference_lloyd(x_GND[g], c0_GKD[g], 4, weights)
            np.testing.assert_allclose(c_GKD[g], c_ref, rtol=1e-5, atol=1e-5)


def test_torch_assignment_equals_faiss():
    """The torch (CUDA) and faiss (CPU) assignments agree; distances within float32 error."""
    rng = np.random.default_rng(4)
    x, c = rng.normal(size=(2, 300, 6)).astype(np.float32), rng.normal(size=(2, 9, 6)).astype(np.float32)
    d_GN, ids_GN = nearest(torch.from_numpy(x), torch.from_numpy(c))
    for g in range(2):
        d_ref, ids_ref = faiss.knn(x[g], c[g], 1)
        np.testing.assert_array_equal(ids_GN[g].numpy(), ids_ref[:, 0])
        np.testing.assert_allclose(d_GN[g].numpy(), d_ref[:, 0], rtol=1e-4, atol=1e-4)


def test_torch_assignment_path_gives_the_same_k_means(tiny, monkeypatch):
    """The loop with the torch assignment (as on CUDA), run on the CPU, equals the faiss one."""
    x, c0 = tiny
    w = np.random.default_rng(5).uniform(0.5, 2, len(x))
    with_faiss = kmeans(np.stack([x, -x]), 5, niter=6, init=np.stack([c0, -c0]), weights=w)
    monkeypatch.setattr("qinco2.kmeans._nearest_block", nearest)
    with_torch = kmeans(np.stack([x, -x]), 5, niter=6, init=np.stack([c0, -c0]), weights=w)
    np.testing.assert_allclose(with_torch, with_faiss, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(tiny):
    x, c0 = tiny
    cpu = kmeans(x, 5, niter=6, init=c0)
    cuda = kmeans(torch.from_numpy(x), 5, niter=6, init=c0, device="cuda")
    assert cuda.device.type == "cuda"
    np.testing.assert_allclose(cuda.cpu().numpy(), cpu, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- quality
def test_as_good_as_faiss_kmeans():
    """Mean MSE over seeds within 2% of faiss.Kmeans with the same iterations (many more blobs
    than centroids, so the seed-to-seed spread of the local minima is small)."""
    x = _blobs(4096, 8, 1000, seed=0)
    ours, ref = [], []
    for seed in range(3):
        ours.append(_mse(x, kmeans(x, 64, niter=10, seed=seed)))
        km = faiss.Kmeans(8, 64, niter=10, seed=seed, max_points_per_centroid=1 << 30)
        km.train(x)
        ref.append(_mse(x, km.centroids))
    assert np.mean(ours) < 1.02 * np.mean(ref)


# ----------------------------------------------------------------------------- behaviour
def test_progress_once_per_iteration_with_decreasing_mse():
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    calls = []
    kmeans(x, 16, niter=7, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(i, 7) for i in range(1, 8)]
    mses = [c[2] for c in calls]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(mses, mses[1:]))    # Lloyd never gets worse
    with kmeans_progress(7, enabled=False) as bar:
        assert bar is None
    with kmeans_progress(7) as bar:
        kmeans(x, 16, niter=7, progress=bar)


def test_a_fixed_point_ends_the_loop_with_the_same_result(tiny):
    x, c0 = tiny
    calls = []
    c = kmeans(x, 5, niter=200, init=c0, progress=lambda *a: calls.append(a))
    assert len(calls) < 200 and calls[-1][:2] == (200, 200)
    np.testing.assert_array_equal(c, kmeans(x, 5, niter=len(calls) + 3, init=c0))


def test_counts_and_sums_are_exact():
    x = np.repeat(np.eye(3, dtype=np.float32), [5, 7, 9], axis=0)
    c_GKD = torch.from_numpy(np.eye(3, dtype=np.float32))[None]
    sums, mass, sse = _assign_and_sum(_Points(x, None, 1 << 20), c_GKD, None, rows=4)
    assert mass.dtype == torch.int64 and mass.tolist() == [[5, 7, 9]]
    assert sums.dtype == torch.float64 and float(sse.sum()) == 0
    w = torch.full((21,), 2.0 ** 30, dtype=torch.float64)
    _, mass_w, _ = _assign_and_sum(_Points(x, None, 1 << 20), c_GKD, w, rows=4)
    assert mass_w.dtype == torch.float64 and mass_w.tolist() == [[5 * 2.0 ** 30, 7 * 2.0 ** 30, 9 * 2.0 ** 30]]


def test_no_empty_cluster_when_n_is_at_least_k():
    """A start from 16 copies of one point: 15 empty clusters, split from the worst ones."""
    points = np.random.default_rng(5).normal(0, 10, (16, 4)).astype(np.float32)
    x = np.repeat(points, 50, axis=0)
    c = kmeans(x, 16, niter=30, init=np.repeat(points[:1], 16, axis=0))
    assert np.bincount(faiss.knn(x, c, 1)[1][:, 0], minlength=16).min() > 0
    assert _mse(x, c) < 1e-6
    few = kmeans(x[:3], 5, niter=3)                 # N < K: no error, finite centroids
    assert few.shape == (5, 4) and np.isfinite(few).all()


def test_seeded_and_deterministic():
    x = _blobs(1000, 8, 20, seed=3)
    a = kmeans(x, 16, seed=1)
    np.testing.assert_array_equal(a, kmeans(x, 16, seed=1))
    np.testing.assert_array_equal(a, kmeans(x, 16, seed=torch.Generator().manual_seed(1)))
    assert not np.array_equal(a, kmeans(x, 16, seed=2))


def test_memmap_read_by_blocks_gives_the_same_centroids(tmp_path):
    x = (_blobs(3000, 8, 40, seed=6) * 10 + 128).clip(0, 255).astype(np.uint8)
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="r", shape=x.shape)
    c = kmeans(mm, 32, niter=5, max_bytes=20_000)          # ~60 rows per block
    assert c.dtype == np.float32 and c.shape == (32, 8)
    np.testing.assert_allclose(c, kmeans(x.astype(np.float32), 32, niter=5), rtol=1e-6, atol=1e-5)


def test_memmap_is_never_copied_whole_to_float(tmp_path):
    n, d = 200_000, 16
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(n, d))
    mm[:] = np.random.default_rng(0).integers(0, 255, (n, d), dtype=np.uint8)
    tracemalloc.start()
    kmeans(mm, 16, niter=1, max_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * d * 4 / 4          # a float32 copy: 12.8 MB; one block: < 1 MB


def test_torch_in_torch_out():
    x = torch.from_numpy(_blobs(500, 4, 10, seed=7))
    c = kmeans(x, 8, niter=3)
    assert isinstance(c, torch.Tensor) and c.shape == (8, 4) and c.dtype == torch.float32
    np.testing.assert_array_equal(c.numpy(), kmeans(x.numpy(), 8, niter=3))


@pytest.mark.parametrize("call, words", [
    (lambda x: kmeans(x[0], 4), "shape"),
    (lambda x: kmeans(x.astype(bool), 4), "dtype"),
    (lambda x: kmeans(x, 0), "K >= 1"),
    (lambda x: kmeans(x, 4, weights=-np.ones(len(x))), ">= 0"),
    (lambda x: kmeans(x, 4, weights=np.ones(3)), "one per point"),
    (lambda x: kmeans(x, 4, init=np.zeros((3, 2))), "init"),
])
def test_bad_arguments_raise_input_errors(call, words):
    with pytest.raises(InputError, match=words):
        call(np.zeros((10, 2), dtype=np.float32))
