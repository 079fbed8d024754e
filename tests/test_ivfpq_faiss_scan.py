"""IVF-PQ on the CPU through faiss's scan: a CPU index with subspace codebooks keeps its lists in
a faiss ArrayInvertedLists that faiss's IndexIVFPQ scans in place; results equal the torch
scan's (up to float rounding and ties) for every metric, the lists are never copied, the
cached faiss index follows every change of the tables or lists, memory is counted, and the
torch storage stays for CUDA and per-list codebooks."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest
import torch

from qinco2 import ivfpq
from qinco2.errors import ConfigError
from qinco2.ivfpq import IndexParams, SearchParams
from qinco2.ivfpq.faiss_lists import FaissInvertedLists
from qinco2.ivfpq.lists import InvertedLists

D, N, NQ, K = 16, 3000, 60, 10
BASE = IndexParams(n_lists=12, pq_dim=8, kmeans_n_iters=5)


@pytest.fixture(scope="module")
def data(clustered):
    x = clustered(N + NQ, D=D, C=16, seed=21)
    return x[:N], x[N:]


def both(index, q, n_probes, k=K, **kw):
    """(faiss scan, torch scan) results."""
    return (ivfpq.search(SearchParams(n_probes=n_probes, cpu_scan="faiss", **kw), index, q, k),
            ivfpq.search(SearchParams(n_probes=n_probes, cpu_scan="torch", **kw), index, q, k))


def assert_same_up_to_ties(a, b, atol=1e-3):
    """Close distances (float32 sums in another order; the torch scan's expansion |q|^2 - 2 <q, c>
    + |c|^2 loses ~1e-4 to cancellation here); the same ids except between tied distances (an id
    may differ only where its distance equals another one within ``atol``)."""
    (da, ia), (db, ib) = a, b
    np.testing.assert_allclose(da, db, rtol=1e-4, atol=atol)
    for row, j in zip(*np.nonzero(ia != ib)):
        assert np.sum(np.isclose(db[row], db[row, j], rtol=1e-5, atol=atol)) >= 2 or j == db.shape[1] - 1 \
            or np.isclose(db[row, j], db[row, -1], rtol=1e-5, atol=atol), (row, j, da[row], db[row])


CASES = {
    "l2": BASE,
    "ip": dataclasses.replace(BASE, metric="inner_product"),
    "cosine": dataclasses.replace(BASE, metric="cosine"),
    "bits4": dataclasses.replace(BASE, pq_bits=4),
    "bits6-padded": dataclasses.replace(BASE, pq_bits=6, pq_dim=4 * 3),       # rot_dim 24
    "rotated": dataclasses.replace(BASE, force_random_rotation=True),
    "many-lists": dataclasses.replace(BASE, n_lists=48),       # 48 probes: torch.topk picks them, not heaps
    "l2-table": dataclasses.replace(BASE, pq_dim=4),           # pq_len 4: faiss's precomputed L2 table
}


@pytest.mark.parametrize("case", list(CASES))
def test_faiss_scan_equals_the_torch_scan(data, case):
    x, q = data
    index = ivfpq.build(CASES[case], x)
    assert isinstance(index.lists, FaissInvertedLists)
    for n_probes in (1, 3, 40, index.n_lists):
        assert_same_up_to_ties(*both(index, q, n_probes))
    dist, _ = ivfpq.search(SearchParams(n_probes=3), index, q, K)           # "auto": faiss's scan here
    np.testing.assert_array_equal(dist, both(index, q, 3)[0][0])
    order = 1 if CASES[case].metric == "inner_product" else -1           # best first
    assert (order * np.diff(dist, axis=1) <= 1e-6).all()


def test_faiss_scans_the_lists_in_place(data):
    """No copy of the lists: the faiss index searches the very ArrayInvertedLists the index
    holds, and the index grows by the scan's tables only (quantizer, codebooks, L2 table)."""
    x, q = data
    for pq_dim in (4, 8):                # pq_len 4: faiss's precomputed L2 table; pq_len 2: none
        params = dataclasses.replace(BASE, pq_dim=pq_dim, conservative_memory_allocation=True)  # exact sizes
        index = ivfpq.build(params, x)
        before = index.nbytes()
        ivfpq.search(SearchParams(n_probes=2), index, q, K)
        scan = index.lists.view
        assert int(faiss.downcast_InvertedLists(scan.ivf.invlists).this) == int(index.lists.invlists.this)
        assert not scan.ivf.own_invlists and scan.ivf.ntotal == index.size
        table = 4 * index.n_lists * index.pq_dim * index.pq_book_size if pq_dim == 4 else 0
        assert scan.ivf.use_precomputed_table == (1 if table else -1)
        assert scan.nbytes == 4 * index.n_lists * (index.rot_dim + 1) + index.pq_centers.nbytes + table
        assert index.nbytes() == before + scan.nbytes
        est = ivfpq.estimate_memory(N, D, index.params)
        assert est["cpu_scan_bytes"] == scan.nbytes
        assert abs(est["index_bytes"] + est["cpu_scan_bytes"] - index.nbytes()) <= 0.02 * index.nbytes()
        assert ivfpq.estimate_memory(N, D, index.params, device="cuda")["cpu_scan_bytes"] == 0


def test_the_faiss_index_follows_extends_and_table_changes(data):
    x, q = data
    for conservative in (False, True):                   # conservative: every extend rewrites the lists
        params = dataclasses.replace(BASE, conservative_memory_allocation=conservative)
        index = ivfpq.build(dataclasses.replace(params, add_data_on_build=False), x)
        ivfpq.extend(index, x[:1000])
        ivfpq.search(SearchParams(n_probes=4), index, q, K)                # builds the faiss index
        ivfpq.extend(index, x[1000:], np.arange(1000, N))
        assert_same_up_to_ties(*both(index, q, 4))
        whole = ivfpq.build(params, x)
        np.testing.assert_array_equal(ivfpq.search(SearchParams(n_probes=4), index, q, K)[1],
                                      ivfpq.search(SearchParams(n_probes=4), whole, q, K)[1])
    first = index.lists.view
    with torch.no_grad():
        index.pq_centers[:, :, 0] += 0.5                  # in place: the cached faiss index is stale
    assert_same_up_to_ties(*both(index, q, 4))
    assert index.lists.view is not first


def test_reduced_precision_settings_give_float32_tables_on_faiss(data):
    x, q = data
    index = ivfpq.build(BASE, x)
    ref = ivfpq.search(SearchParams(n_probes=4), index, q, K)
    for lut, internal in (("float16", "float32"), ("uint8", "float16")):
        got = ivfpq.search(SearchParams(n_probes=4, lut_dtype=lut, internal_distance_dtype=internal), index, q, K)
        np.testing.assert_array_equal(got[1], ref[1])
        torch_scan = ivfpq.search(SearchParams(n_probes=4, lut_dtype=lut, internal_distance_dtype=internal,
                                               cpu_scan="torch"), index, q, K)
        np.testing.assert_allclose(torch_scan[0], ref[0], rtol=0.05)      # the torch scan honours them


def test_faiss_threads_follow_torch_and_are_restored(data, monkeypatch):
    x, q = data
    index = ivfpq.build(BASE, x)
    seen, real = [], faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: seen.append(n) or real(n))
    old_torch, old_faiss = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    try:
        ivfpq.search(SearchParams(n_probes=2), index, q, K)
    finally:
        torch.set_num_threads(old_torch)
    assert seen == [1, old_faiss] and faiss.omp_get_max_threads() == old_faiss


def test_missing_results_and_choice_of_scan(data):
    x, q = data
    index = ivfpq.build(dataclasses.replace(BASE, metric="inner_product"), x)
    k = int(index.list_sizes.max()) + 5                      # one probed list cannot fill k
    dist, ids = ivfpq.search(SearchParams(n_probes=1), index, q[:5], k)
    assert (ids == -1).any() and np.all(dist[ids < 0] == -np.inf) and np.isfinite(dist[ids >= 0]).all()
    l2 = ivfpq.build(BASE, x)
    dist, ids = ivfpq.search(SearchParams(n_probes=1), l2, q[:5], k)
    assert np.all(dist[ids < 0] == np.inf)
    cluster = ivfpq.build(dataclasses.replace(BASE, codebook_kind="cluster"), x)
    assert isinstance(cluster.lists, InvertedLists)
    ivfpq.search(SearchParams(n_probes=2), cluster, q, K)                 # "auto": the torch scan
    with pytest.raises(ConfigError, match="cpu_scan='faiss' needs a CPU index with codebook_kind='subspace'"):
        ivfpq.search(SearchParams(cpu_scan="faiss"), cluster, q, K)
    with pytest.raises(ConfigError, match="cpu_scan must be one of"):
        ivfpq.search(SearchParams(cpu_scan="gpu"), l2, q, K)


def test_faiss_lists_allocation_policy(data, monkeypatch):
    """As the torch storage: power-of-two capacities that extends fill without moving, exact
    sizes when conservative, one rewrite per bulk load, copies out of the lists."""
    x, _ = data
    relayouts = []
    real = FaissInvertedLists._relayout
    monkeypatch.setattr(FaissInvertedLists, "_relayout", lambda self, c: relayouts.append(1) or real(self, c))
    monkeypatch.setattr("qinco2.ivfpq.builder.CHUNK_ROWS", 500)
    exact = ivfpq.build(dataclasses.replace(BASE, conservative_memory_allocation=True), x)
    assert len(relayouts) == 1 and torch.equal(exact.lists.capacity, exact.lists.size)
    assert exact.lists.allocated_rows() == N
    grown = ivfpq.build(dataclasses.replace(BASE, add_data_on_build=False), x)
    for a in range(0, N, 250):
        ivfpq.extend(grown, x[a:a + 250])
    cap, size = grown.lists.capacity, grown.lists.size
    assert (cap >= size).all() and (cap <= 2 * size + 32).all()
    assert ((cap & (cap - 1)) == 0).all()                                # powers of two
    ids = grown.list_ids(0)
    ids[:] = -7                                                          # a copy: the index keeps its ids
    assert (grown.list_ids(0) >= 0).all()
    for li in range(grown.n_lists):
        np.testing.assert_array_equal(np.sort(grown.list_ids(li)), np.sort(exact.list_ids(li)))
        np.testing.assert_array_equal(grown.list_codes(li)[np.argsort(grown.list_ids(li))],
                                      exact.list_codes(li)[np.argsort(exact.list_ids(li))])


def test_save_load_keeps_the_faiss_lists(tmp_path, data):
    x, q = data
    index = ivfpq.build(BASE, x)
    ivfpq.save(tmp_path / "a.ivfpq", index)
    again = ivfpq.load(tmp_path / "a.ivfpq")
    assert isinstance(again.lists, FaissInvertedLists)
    for got, want in zip(ivfpq.search(SearchParams(n_probes=5), again, q, K),
                         ivfpq.search(SearchParams(n_probes=5), index, q, K)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_indexes_keep_the_torch_storage_and_scan(data):
    x, q = data
    gpu = ivfpq.build(BASE, x, device="cuda")
    assert isinstance(gpu.lists, InvertedLists) and gpu.lists.codes.is_cuda
    cpu = ivfpq.build(BASE, x)
    ids_g = ivfpq.search(SearchParams(n_probes=4), gpu, q, K)[1]
    ids_c = ivfpq.search(SearchParams(n_probes=4), cpu, q, K)[1]
    assert (ids_g == ids_c).mean() > 0.95                 # k-means float sums differ in order on GPU
    with pytest.raises(ConfigError, match="cpu_scan='faiss' needs a CPU index"):
        ivfpq.search(SearchParams(cpu_scan="faiss"), gpu, q, K)
