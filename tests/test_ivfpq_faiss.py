"""IVF-PQ export to ``faiss.IndexIVFPQ`` and import back: faiss searches an exported index like
ours, decodes its codes like ours, the round trip changes nothing, an index trained by faiss
searches like faiss once imported, and what faiss cannot hold raises InputError."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from qinco2 import ivfpq
from qinco2.errors import InputError
from qinco2.ivfpq import IndexParams, SearchParams

D, N, NQ, K, PROBES = 16, 3000, 50, 10, 3
BASE = IndexParams(n_lists=8, pq_dim=8, kmeans_n_iters=6)


@pytest.fixture(scope="module")
def data(clustered):
    x = clustered(N + NQ, D=D, C=12, seed=5)
    return x[:N], x[N:]


def ours(index, q, n_probes=PROBES):
    return ivfpq.search(SearchParams(n_probes=n_probes, lut_dtype="float32"), index, q, K)


def theirs(findex, q, n_probes=PROBES):
    faiss.extract_index_ivf(findex).nprobe = n_probes
    return findex.search(q, K)


def assert_same(a, b, rtol=1e-4, atol=1e-3):
    """Same distances; the same ids where a query's distances are distinct (ties may swap)."""
    (da, ia), (db, ib) = a, b
    np.testing.assert_allclose(da, db, rtol=rtol, atol=atol)
    gaps = np.diff(da, axis=1)
    distinct = np.ones_like(ia, dtype=bool)
    distinct[:, 1:] &= np.abs(gaps) > 10 * atol
    distinct[:, :-1] &= np.abs(gaps) > 10 * atol
    assert (ia[distinct] == ib[distinct]).mean() > 0.99
    assert distinct.mean() > 0.5


CASES = {
    "l2": BASE,
    "ip": BASE.__class__(**{**BASE.__dict__, "metric": "inner_product"}),
    "bits6": BASE.__class__(**{**BASE.__dict__, "pq_bits": 6}),
    "rotated": BASE.__class__(**{**BASE.__dict__, "force_random_rotation": True}),
    "padded": BASE.__class__(**{**BASE.__dict__, "pq_dim": 6}),            # rot_dim = 18
}


@pytest.fixture(scope="module", params=list(CASES))
def built(request, data):
    return ivfpq.build(CASES[request.param], data[0])


def test_faiss_searches_the_exported_index_like_ours(built, data):
    findex = ivfpq.to_faiss(built)
    assert findex.ntotal == built.size
    assert isinstance(findex, faiss.IndexPreTransform) == (built.rot_dim != D or built.params.force_random_rotation)
    for n_probes in (1, PROBES, built.n_lists):
        assert_same(theirs(findex, data[1], n_probes), ours(built, data[1], n_probes))
    copy = faiss.deserialize_index(faiss.serialize_index(findex))          # a self-contained faiss index
    assert_same(theirs(copy, data[1]), ours(built, data[1]))


def test_faiss_decodes_like_ours(built):
    list_nos = np.repeat(np.arange(built.n_lists), built.list_sizes)
    codes = np.concatenate([built.list_codes(li) for li in range(built.n_lists)])
    ids = np.concatenate([built.list_ids(li) for li in range(built.n_lists)])
    mine = np.empty((built.size, D), dtype=np.float32)
    mine[ids] = built.decode(list_nos, codes)
    np.testing.assert_allclose(ivfpq.to_faiss(built).reconstruct_n(0, built.size), mine, atol=1e-4)


def test_round_trip_is_identical(built, data):
    back = ivfpq.from_faiss(ivfpq.to_faiss(built))
    keys = ("n_lists", "metric", "pq_dim", "pq_bits", "codebook_kind")      # training-only ones are not carried
    assert [getattr(back.params, k) for k in keys] == [getattr(built.params, k) for k in keys]
    assert back.dim == built.dim and back.rot_dim == built.rot_dim
    for t in ("centers", "rotation_matrix", "pq_centers"):
        np.testing.assert_allclose(getattr(back, t).numpy(), getattr(built, t).numpy(), atol=1e-5)
    assert np.array_equal(back.list_sizes, built.list_sizes)
    for li in range(built.n_lists):
        assert np.array_equal(back.list_ids(li), built.list_ids(li))
        assert np.array_equal(back.list_codes(li), built.list_codes(li))
    a, b = ours(back, data[1]), ours(built, data[1])
    if built.rot_dim == D and not built.params.force_random_rotation:
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])     # the very same tables
    else:
        assert_same(a, b)        # centres come back as rotate^T(rotated centres): float rounding


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_faiss_built_index_imports(data, metric):
    x, q = data
    quantizer = faiss.IndexFlatL2(D) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(D)
    ref = faiss.IndexIVFPQ(quantizer, D, 8, 4, 8, metric)
    ref.train(x)
    ref.add_with_ids(x, np.arange(N, dtype=np.int64) * 3 + 7)
    mine = ivfpq.from_faiss(ref)
    assert mine.size == N and mine.fingerprint is None
    assert mine.metric == ("sqeuclidean" if metric == faiss.METRIC_L2 else "inner_product")
    assert_same(ours(mine, q), theirs(ref, q))


def test_faiss_rotated_index_imports(data):
    x, q = data
    ref = faiss.index_factory(D, "RR16,IVF8,PQ8x4")
    ref.train(x)
    ref.add(x)
    mine = ivfpq.from_faiss(ref)
    assert mine.params.force_random_rotation
    assert_same(ours(mine, q), theirs(ref, q))


def test_unsupported_raise_input_error(data):
    x = data[0]
    cluster = ivfpq.build(IndexParams(n_lists=4, pq_dim=4, kmeans_n_iters=2, codebook_kind="cluster"), x)
    with pytest.raises(InputError, match="codebook_kind"):
        ivfpq.to_faiss(cluster)
    cosine = ivfpq.build(IndexParams(n_lists=4, pq_dim=4, kmeans_n_iters=2, metric="cosine"), x)
    with pytest.raises(InputError, match="metric"):
        ivfpq.to_faiss(cosine)
    flat = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, 4)
    with pytest.raises(InputError, match="IndexIVFPQ"):
        ivfpq.from_faiss(flat)
    no_residual = faiss.IndexIVFPQ(faiss.IndexFlatL2(D), D, 4, 4, 4)
    no_residual.by_residual = False
    no_residual.train(x)
    with pytest.raises(InputError, match="by_residual"):
        ivfpq.from_faiss(no_residual)
    pca = faiss.index_factory(D, "PCA8,IVF4,PQ4x4")
    pca.train(x)
    with pytest.raises(InputError, match="rotation"):
        ivfpq.from_faiss(pca)
