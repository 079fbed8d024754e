"""IVF-PQ: parameters and errors, exactness against brute force over decoded codes, faiss
parity, n_probes monotonicity, look-up-table precisions, metrics, input dtypes, extend,
save/load, refinement and memory estimates."""

from __future__ import annotations

import dataclasses
import itertools
import tracemalloc

import faiss
import numpy as np
import pytest
import torch

from qinco2 import ivfpq
from qinco2.errors import ConfigError, InputError, ModelFileError
from qinco2.ivfpq import IndexParams, SearchParams
from qinco2.metrics import knn

D, N, NQ = 16, 4000, 100


@pytest.fixture(scope="module")
def data(clustered):
    x = clustered(N + NQ, D=D, C=24, seed=3)
    return x[:N], x[N:]


SMALL = IndexParams(n_lists=16, pq_dim=8, pq_bits=6, kmeans_n_iters=8)


@pytest.fixture(scope="module")
def index(data):
    return ivfpq.build(SMALL, data[0])


def brute_force(index, x_db, q, k, metric="sqeuclidean"):
    """Exhaustive search over the decoding of every stored code (no rotation here)."""
    list_nos = np.repeat(np.arange(index.n_lists), index.list_sizes)
    codes = np.concatenate([index.list_codes(li) for li in range(index.n_lists)])
    ids = np.concatenate([index.list_ids(li) for li in range(index.n_lists)])
    xr = index.decode(list_nos, codes)
    d = ((q[:, None] - xr[None]) ** 2).sum(-1) if metric == "sqeuclidean" else -(q @ xr.T)
    order = np.argsort(d, 1, kind="stable")[:, :k]
    d_by_id = np.empty_like(d)
    d_by_id[:, ids] = d
    return np.take_along_axis(d, order, 1), d_by_id


def assert_same_results(dist, ids, ref_dist, ref_by_id, tol=1e-3):
    """Same sorted distances, and each returned id at its true distance (ties may swap ids)."""
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-4, atol=tol)
    np.testing.assert_allclose(np.take_along_axis(ref_by_id, ids, 1), ref_dist, rtol=1e-4, atol=tol)


def recall(neighbors, gt, k=10):
    return np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(neighbors, gt)])


# ---------------------------------------------------------------------------- parameters and errors
@pytest.mark.parametrize("dim, expected", [(20, 16), (96, 96), (100, 96), (128, 64), (200, 96), (960, 480)])
def test_default_pq_dim_follows_cuvs(dim, expected):
    assert ivfpq.default_pq_dim(dim) == expected


@pytest.mark.parametrize("change, words", [
    ({"pq_bits": 3}, "pq_bits"), ({"pq_bits": 9}, "pq_bits"),
    ({"pq_dim": 5, "pq_bits": 5}, "multiple of 8"), ({"metric": "l1"}, "metric"),
    ({"codebook_kind": "per_subspace"}, "codebook_kind"), ({"pq_dim": 17}, "pq_dim"),
    ({"kmeans_trainset_fraction": 0}, "kmeans_trainset_fraction"),
])
def test_bad_build_parameters_are_named(data, change, words, monkeypatch):
    monkeypatch.setattr("qinco2.ivfpq.builder.kmeans", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=words):
        ivfpq.build(dataclasses.replace(SMALL, **change), data[0])


def test_bad_inputs_fail_before_any_work(data, index, monkeypatch):
    monkeypatch.setattr("qinco2.ivfpq.builder.kmeans", lambda *a, **k: pytest.fail("work started"))
    x, q = data
    with pytest.raises(InputError, match="larger than the 10 training vectors"):
        ivfpq.build(SMALL, x[:10])
    bad = x.copy()
    bad[123, 4] = np.nan
    with pytest.raises(InputError, match="NaN or Inf values \\(first in row 123\\)"):
        ivfpq.build(SMALL, bad)
    with pytest.raises(InputError, match="NaN"):
        ivfpq.extend(index, bad[100:200])
    with pytest.raises(InputError, match="dimension 15 but the index has dim=16"):
        ivfpq.search(SearchParams(), index, q[:, :15], 10)
    with pytest.raises(InputError, match="k=5000 is larger than the 4000 vectors"):
        ivfpq.search(SearchParams(), index, q, 5000)
    with pytest.raises(InputError, match="dtype float64"):
        ivfpq.build(SMALL, x.astype(np.float64))
    with pytest.raises(ConfigError, match="lut_dtype"):
        ivfpq.search(SearchParams(lut_dtype="int4"), index, q, 10)


def test_rotation_when_dim_is_not_a_multiple_of_pq_dim(clustered):
    x = clustered(1000, D=30, seed=4)
    idx = ivfpq.build(IndexParams(n_lists=4, pq_dim=8, pq_bits=4, kmeans_n_iters=2), x)
    R = idx.rotation_matrix
    assert (idx.rot_dim, idx.pq_len) == (32, 4) and R.shape == (32, 30)
    torch.testing.assert_close(R.T @ R, torch.eye(30), atol=1e-5, rtol=0)  # orthonormal columns
    same = ivfpq.build(IndexParams(n_lists=4, pq_dim=8, pq_bits=4, kmeans_n_iters=2), x[:, :16])
    assert torch.equal(same.rotation_matrix, torch.eye(16))
    forced = ivfpq.build(IndexParams(n_lists=4, pq_dim=8, pq_bits=4, kmeans_n_iters=2,
                                     force_random_rotation=True), x[:, :16])
    assert not torch.allclose(forced.rotation_matrix, torch.eye(16))


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["subspace", "cluster"])
def test_all_lists_probed_equals_brute_force_over_decoded_codes(data, kind):
    x, q = data
    idx = index_ = ivfpq.build(dataclasses.replace(SMALL, codebook_kind=kind), x)
    dist, ids = ivfpq.search(SearchParams(n_probes=idx.n_lists), index_, q, 10)
    assert_same_results(dist, ids, *brute_force(idx, x, q, 10))     # float32 sums: tolerance


def test_recall_close_to_faiss_ivfpq(data):
    x, q = data
    gt = knn(q, x, 10)
    ours = ivfpq.build(IndexParams(n_lists=16, pq_dim=8, pq_bits=8, kmeans_n_iters=10), x)
    ref = faiss.index_factory(D, "IVF16,PQ8x8")
    ref.train(x)
    ref.add(x)
    for n_probes in (1, 4, 16):
        ref.nprobe = n_probes
        r_faiss = recall(ref.search(q, 10)[1], gt)
        r_ours = recall(ivfpq.search(SearchParams(n_probes=n_probes), ours, q, 10)[1], gt)
        assert r_ours >= r_faiss - 0.05, (n_probes, r_ours, r_faiss)


def test_recall_never_drops_as_n_probes_grows(data, index):
    x, q = data
    gt = knn(q, x, 10)
    recalls, kth = [], []
    for n_probes in range(1, index.n_lists + 1):
        dist, ids = ivfpq.search(SearchParams(n_probes=n_probes), index, q, 10)
        recalls.append(recall(ids, gt))
        kth.append(dist[:, -1])
    assert all(b >= a for a, b in itertools.pairwise(recalls)), recalls
    for a, b in itertools.pairwise(kth):      # more candidates: each k-th distance can only shrink
        assert (b <= a + 1e-4).all()


@pytest.mark.parametrize("lut, internal", [("float16", "float32"), ("uint8", "float32"),
                                           ("float32", "float16"), ("uint8", "float16")])
def test_low_precision_tables_keep_recall_and_distances(data, lut, internal):
    x, q = data[0] * 100, data[1] * 100          # squared distances ~1e5: beyond float16's range
    idx = ivfpq.build(SMALL, x)
    gt = knn(q, x, 10)
    dist, ids = ivfpq.search(SearchParams(n_probes=8), idx, q, 10)
    low_dist, low_ids = ivfpq.search(SearchParams(n_probes=8, lut_dtype=lut, internal_distance_dtype=internal),
                                     idx, q, 10)
    assert recall(low_ids, gt) >= recall(ids, gt) - 0.02
    assert np.isfinite(low_dist).all()
    tol = 0.05 if lut == "uint8" else 2e-3        # 8-bit floats: 3 mantissa bits per entry
    np.testing.assert_allclose(low_dist, dist, rtol=tol)


@pytest.mark.parametrize("metric", ["inner_product", "cosine"])
def test_inner_product_and_cosine_against_brute_force(data, metric):
    x, q = data
    idx = ivfpq.build(dataclasses.replace(SMALL, metric=metric), x)
    dist, ids = ivfpq.search(SearchParams(n_probes=idx.n_lists), idx, q, 10)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
    ref_dist, ref_by_id = brute_force(idx, x, qn, 10, metric="ip")
    sign = -1 if metric == "inner_product" else 1          # IP: -(-<q, x>); cosine: 1 + (-<q, x>)
    shift = 0 if metric == "inner_product" else 1
    assert_same_results(dist, ids, shift + sign * ref_dist, shift + sign * ref_by_id, tol=1e-4)
    steps = np.diff(dist, axis=1)
    assert (steps <= 1e-6).all() if metric == "inner_product" else (steps >= -1e-6).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.float16])
def test_integer_and_half_inputs_equal_their_float32_values(clustered, dtype):
    x = clustered(2000, D=D, seed=5)
    x = np.clip(np.round(x * 10), -100, 100).astype(dtype) if dtype != np.float16 else x.astype(dtype)
    if dtype == np.uint8:
        x = (x.astype(np.int16) + 100).astype(np.uint8)
    params = IndexParams(n_lists=8, pq_dim=8, pq_bits=4, kmeans_n_iters=3)
    a, b = ivfpq.build(params, x), ivfpq.build(params, x.astype(np.float32))
    q = x[:20]
    assert np.array_equal(ivfpq.search(SearchParams(n_probes=4), a, q, 5)[1],
                          ivfpq.search(SearchParams(n_probes=4), b, q.astype(np.float32), 5)[1])


def test_uint8_memmap_is_never_copied_whole_to_float(tmp_path):
    n, d = 600_000, 16
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(n, d))
    x[:] = np.random.default_rng(0).integers(0, 255, (n, d), dtype=np.uint8)
    tracemalloc.start()
    ivfpq.build(IndexParams(n_lists=8, pq_dim=4, pq_bits=4, kmeans_n_iters=1,
                            kmeans_trainset_fraction=0.05, max_train_points_per_pq_code=16), x)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < n * d * 4 / 2          # a float32 copy: 38 MB; two 4 MB chunks + ids: 13 MB


@pytest.mark.parametrize("kind", ["subspace", "cluster"])
def test_assignment_and_encoding_by_blocks_equal_one_block(data, kind, monkeypatch):
    x = torch.from_numpy(data[0][:500])
    idx = ivfpq.build(dataclasses.replace(SMALL, codebook_kind=kind, add_data_on_build=False), data[0])
    lists, codes = idx.assign(x), idx.encode(x, idx.assign(x))
    monkeypatch.setattr("qinco2.ivfpq.index.WORK_BYTES", 20_000)      # a few rows per block
    assert torch.equal(idx.assign(x), lists) and torch.equal(idx.encode(x, lists), codes)


# ---------------------------------------------------------------------------- extend, lists, files
@pytest.mark.parametrize("conservative", [False, True])
def test_repeated_extend_equals_one_build(data, conservative):
    x, q = data
    params = dataclasses.replace(SMALL, conservative_memory_allocation=conservative)
    whole = ivfpq.build(params, x)
    assert N <= whole.lists.allocated_rows() <= N + 32 * whole.n_lists       # a built index is compact
    ids = 1000 + 3 * np.arange(N, dtype=np.int64)
    grown = ivfpq.build(dataclasses.replace(params, add_data_on_build=False), x)
    assert grown.size == 0
    for a in range(0, N, 97):                     # many small extends
        ivfpq.extend(grown, x[a:a + 97], ids[a:a + 97])
    assert grown.size == N and grown.list_sizes.sum() == N
    np.testing.assert_array_equal(grown.list_sizes, whole.list_sizes)
    for li in (0, 7):
        np.testing.assert_array_equal(grown.list_codes(li), whole.list_codes(li))
        np.testing.assert_array_equal(grown.list_ids(li), ids[whole.list_ids(li)])
    p = SearchParams(n_probes=4)
    np.testing.assert_array_equal(ivfpq.search(p, grown, q, 10)[1], ids[ivfpq.search(p, whole, q, 10)[1]])
    rows = grown.lists.allocated_rows()
    assert rows == N if conservative else N <= rows <= 4 * N + 32 * grown.n_lists


def test_save_load_round_trip_and_foreign_files(tmp_path, data, index):
    q = data[1]
    path = tmp_path / "a.ivfpq"
    ivfpq.save(path, index)
    again = ivfpq.load(path)
    p = SearchParams(n_probes=5)
    for got, want in zip(ivfpq.search(p, again, q, 10), ivfpq.search(p, index, q, 10)):
        np.testing.assert_array_equal(got, want)
    assert again.params == index.params
    assert again.lists.allocated_rows() <= again.size + 32 * again.n_lists     # loaded compact, not doubled
    (tmp_path / "junk").write_bytes(b"not an index")
    with pytest.raises(ModelFileError, match="not a qinco2 IVF-PQ index"):
        ivfpq.load(tmp_path / "junk")
    torch.save({"format": "qinco2-ivfpq", "version": 99}, tmp_path / "future")
    with pytest.raises(ModelFileError, match="version 99"):
        ivfpq.load(tmp_path / "future")
    with pytest.raises(ModelFileError, match="does not exist"):
        ivfpq.load(tmp_path / "missing")


def test_index_size_estimate_matches_the_real_size(data):
    x = data[0]
    params = dataclasses.replace(SMALL, conservative_memory_allocation=True)
    for kind in ("subspace", "cluster"):
        idx = ivfpq.build(dataclasses.replace(params, codebook_kind=kind), x)
        est = ivfpq.estimate_memory(N, D, dataclasses.replace(params, codebook_kind=kind))
        assert abs(est["index_bytes"] - idx.nbytes()) <= 0.02 * idx.nbytes(), (est, idx.nbytes())
    est = ivfpq.estimate_memory(10**6, 128, IndexParams(n_lists=1024, pq_dim=32, pq_bits=8))
    assert est["index_parts"]["codes"] == 32 * 10**6 and est["host_refinement_bytes"] == 128 * 4 * 10**6


# ---------------------------------------------------------------------------- refinement
def test_refine_with_raw_vectors_reranks_exactly(tmp_path, data, index):
    x, q = data
    gt = knn(q, x, 10)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=x.shape)
    mm[:] = x
    p = SearchParams(n_probes=8)
    plain = ivfpq.search(p, index, q, 10)[1]
    dist, ids = ivfpq.search_and_refine(p, index, q, 10, refine_ratio=4, dataset=mm)
    assert recall(ids, gt) > recall(plain, gt) + 0.1
    cand = ivfpq.search(p, index, q, 40)[1]
    exact = ((x[cand] - q[:, None]) ** 2).sum(-1)
    order = np.argsort(exact, 1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, np.take_along_axis(cand, order, 1))
    np.testing.assert_allclose(dist, np.take_along_axis(exact, order, 1), rtol=1e-5)


def test_refine_with_a_qinco2_codec_uses_its_decoding(trained_codec, codec_data):
    x = np.concatenate(codec_data)
    q, db = x[:50], x[50:]
    codes = trained_codec.encode(db)
    idx = ivfpq.build(IndexParams(n_lists=8, pq_dim=4, pq_bits=4, kmeans_n_iters=3), db)
    p = SearchParams(n_probes=8)
    dist, ids = ivfpq.search_and_refine(p, idx, q, 5, refine_ratio=4, codec=trained_codec, codes=codes)
    cand = ivfpq.search(p, idx, q, 20)[1]
    xr = trained_codec.decode(codes)                 # M=3, K=16: many rows share a code (ties)
    exact = np.sort(((xr[cand] - q[:, None]) ** 2).sum(-1), 1)[:, :5]
    np.testing.assert_allclose(dist, exact, rtol=1e-5)
    np.testing.assert_allclose(((xr[ids] - q[:, None]) ** 2).sum(-1), exact, rtol=1e-5)
    assert all(set(i) <= set(c) for i, c in zip(ids, cand))
    with pytest.raises(InputError, match="either dataset="):
        ivfpq.search_and_refine(p, idx, q, 5)
    with pytest.raises(InputError, match="codes must have shape"):
        ivfpq.search_and_refine(p, idx, q, 5, codec=trained_codec, codes=codes[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree(data):
    x, q = data
    cpu = ivfpq.build(SMALL, x)
    gpu = ivfpq.build(SMALL, x, device="cuda")
    p = SearchParams(n_probes=4)
    ids_c, ids_g = ivfpq.search(p, cpu, q, 10)[1], ivfpq.search(p, gpu, q, 10)[1]
    assert (ids_c == ids_g).mean() > 0.95          # k-means float sums differ in order on GPU


def test_conservative_build_rewrites_the_lists_once_not_per_chunk(monkeypatch):
    """A conservative index loaded in many chunks: the rows rewritten by list relayouts stay
    O(N) (they were the sum of the sizes after every chunk, O(N^2 / chunk)), and every list
    still ends at its exact size."""
    from qinco2.ivfpq import builder
    from qinco2.ivfpq.lists import InvertedLists

    rewritten = []
    real = InvertedLists._relayout

    def spy(self, capacity):
        rewritten.append(int(self.size.sum()))
        return real(self, capacity)

    monkeypatch.setattr(builder, "CHUNK_ROWS", 50)
    monkeypatch.setattr(InvertedLists, "_relayout", spy)
    x = np.random.default_rng(0).normal(size=(2000, 16)).astype(np.float32)
    params = IndexParams(n_lists=8, pq_dim=4, kmeans_n_iters=2, conservative_memory_allocation=True)
    index = ivfpq.build(params, x)
    assert sum(rewritten) <= 4 * len(x), rewritten              # 41 relayouts of ~20N rows before
    lists = index.lists
    assert torch.equal(lists.capacity, lists.size) and int(lists.size.sum()) == len(x)
    ivfpq.extend(index, x[:120])                                # a later extend: exact again
    assert torch.equal(lists.capacity, lists.size) and int(lists.size.sum()) == len(x) + 120


@pytest.mark.parametrize("given, name", [("float16", "float16"), (np.float16, "float16"), (np.dtype("uint8"), "uint8"),
                                         (torch.float32, "float32"), (np.uint8, "uint8")])
def test_search_params_take_dtypes_as_cuvs_users_pass_them(given, name):
    p = ivfpq.SearchParams(lut_dtype=given, internal_distance_dtype=np.float32 if name == "uint8" else given)
    assert p.validated().lut_dtype == name
    with pytest.raises(ConfigError, match="lut_dtype must be one of"):
        ivfpq.SearchParams(lut_dtype=np.int64).validated()
