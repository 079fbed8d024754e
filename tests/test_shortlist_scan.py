"""Tests of qinco2.ivfsearch.shortlist_scan: the shortlist index scanned with per-query tables,
by the compiled kernel and by faiss's IVF-PQ scanner, gives faiss's own IVF-RQ search results."""

from __future__ import annotations

import os
import shutil

import faiss
import numpy as np
import pytest

from qinco2.ivfsearch import shortlist_scan
from qinco2.ivfsearch.shortlist import add_codes, aq_tables, build_index, make_empty_index

C, D, M, K = 16, 12, 3, 256


def _codes(rng, x, centroids):
    """IVF codes ``(N, 1+M)``: the nearest centroid, then random step codes."""
    lists = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return np.concatenate([lists[:, None], rng.integers(0, K, (len(x), M))], axis=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    centroids = rng.normal(size=(C, D)).astype(np.float32) * 3
    x = (centroids[rng.integers(0, C, 3000)] + rng.normal(size=(3000, D))).astype(np.float32)
    codes = _codes(rng, x, centroids)
    return dict(centroids=centroids, x_train=x[:2000], train_codes=codes[:2000], x_db=x[2000:2900],
                db_codes=codes[2000:2900], queries=x[2900:])


HAVE_CC = shutil.which(os.environ.get("CC", "cc")) is not None and os.environ.get("QINCO2_NATIVE", "1") != "0"
KINDS = {"native": shortlist_scan.NativeScan, "faiss": shortlist_scan.ShortlistScan}


@pytest.fixture(params=list(KINDS))
def kind(request, monkeypatch):
    """The scan under test: the compiled kernel (where a C compiler exists) or faiss's scanner."""
    if request.param == "native" and not HAVE_CC:
        pytest.skip("no C compiler: the compiled scan cannot be built here")
    if request.param == "faiss":
        monkeypatch.setattr(shortlist_scan, "_native_lib", lambda: None)
    return KINDS[request.param]


def _faiss_search(index, q, k, nprobe, ef=32):
    params = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=faiss.SearchParametersHNSW(efSearch=ef))
    return index.search(q, k, params=params)


def _assert_same(index, q, k, nprobe, rtol):
    D0, I0 = _faiss_search(index, q, k, nprobe)
    D1, I1 = shortlist_scan.search(index, q, k, nprobe, 32)
    found = I0 >= 0
    np.testing.assert_array_equal(I1 >= 0, found)
    # float32 sums grouped differently: ids may swap only where distances tie to rounding
    np.testing.assert_allclose(D1[found], D0[found], rtol=rtol, atol=rtol * np.abs(D0[found]).max())
    assert (I1 == I0).mean() > 0.99


@pytest.mark.parametrize("nprobe", [1, 3, C])
def test_l2_scan_matches_faiss(data, nprobe, kind, monkeypatch):
    monkeypatch.setattr(shortlist_scan, "QUERY_BATCH", 7 if nprobe == 3 else 4096)    # batches of queries too
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"], progress=False)
    assert isinstance(shortlist_scan.scanner(index), kind)
    _assert_same(index, data["queries"], 20, nprobe, rtol=1e-5)


def test_inner_product_scan_matches_faiss(data, kind):
    tables = aq_tables(build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"][:1],
                                   progress=False))
    index = make_empty_index(data["centroids"], tables, 0.0, 100.0, metric="ip")
    add_codes(index, tables, data["db_codes"], progress=False)
    assert isinstance(shortlist_scan.scanner(index), kind)
    for nprobe in (1, 4, C):
        _assert_same(index, data["queries"], 20, nprobe, rtol=1e-5)


def test_scan_is_kept_and_sees_later_codes(data, kind):
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"][:500],
                        progress=False)
    scan = shortlist_scan.scanner(index)
    assert shortlist_scan.scanner(index) is scan                      # built once
    if kind is shortlist_scan.ShortlistScan:                          # (M + 1) sub-quantizers
        assert scan.ivf.precomputed_table.size() * 4 == shortlist_scan.table_bytes(C, M)
    else:                                                              # M tables per list, 256 norms
        assert scan.ltab_CMK.nbytes + scan.norms.nbytes == shortlist_scan.table_bytes(C, M - 1) + 4 * K
    add_codes(index, aq_tables(index), data["db_codes"][500:], start_id=500, progress=False)
    assert shortlist_scan.scanner(index) is scan
    _, ids = shortlist_scan.search(index, data["queries"], 900, C, 32)
    assert sorted(ids[0]) == list(range(900))                          # all lists probed: every code found
    _assert_same(index, data["queries"], 20, 4, rtol=1e-5)


def test_scan_after_reset_and_as_many_codes_again(data, kind):
    """``ntotal`` ends as it was, but faiss freed and reallocated the lists: the scan must not
    read the old ones (add_codes invalidates the kept addresses)."""
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"][:400],
                        progress=False)
    shortlist_scan.search(index, data["queries"], 20, 4, 32)            # addresses kept
    index.reset()
    add_codes(index, aq_tables(index), data["db_codes"][400:800], start_id=400, progress=False)
    _, ids = shortlist_scan.search(index, data["queries"], 400, C, 32)
    assert sorted(ids[0]) == list(range(400, 800))
    _assert_same(index, data["queries"], 20, 4, rtol=1e-5)


def test_native_scan_reads_each_probed_code_once(data):
    """Cost: the kernel scans exactly the codes of the probed lists, one pass each."""
    if not HAVE_CC:
        pytest.skip("no C compiler")
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"], progress=False)
    scan = shortlist_scan.scanner(index)
    assert isinstance(scan, shortlist_scan.NativeScan)
    q = data["queries"]
    hnsw = faiss.SearchParametersHNSW(efSearch=32)
    for nprobe in (1, 5):
        _, assign = index.quantizer.search(q, nprobe, params=hnsw)
        shortlist_scan.search(index, q, 10, nprobe, 32)
        assert scan.scanned == sum(index.invlists.list_size(int(lst)) for lst in assign.ravel())


def test_kernel_fills_missing_results_as_faiss(data, kind):
    """Fewer codes in the probed lists than k: -1 ids and faiss's distances for them."""
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"][:40],
                        progress=False)
    D0, I0 = _faiss_search(index, data["queries"], 30, 1)
    D1, I1 = shortlist_scan.search(index, data["queries"], 30, 1, 32)
    assert (I0 == -1).any()
    np.testing.assert_array_equal(I1 == -1, I0 == -1)
    np.testing.assert_array_equal(D1[I1 == -1], D0[I0 == -1])


def test_large_table_falls_back_to_faiss(data, monkeypatch, caplog):
    monkeypatch.setattr(shortlist_scan, "MAX_TABLE_BYTES", shortlist_scan.table_bytes(C, M) - 1)
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"], progress=False)
    with caplog.at_level("WARNING"):
        assert shortlist_scan.scanner(index) is None
    assert "slower scan" in caplog.text
    D0, I0 = _faiss_search(index, data["queries"], 10, 2)
    D1, I1 = shortlist_scan.search(index, data["queries"], 10, 2, 32)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_array_equal(D1, D0)


def test_decoded_norms_are_faiss_qint8(data):
    """The 256 norms of the scan's table: the centres of 256 equal steps of the norm range, as faiss
    decodes the byte (the searches above check them against faiss's distances)."""
    index = build_index(data["centroids"], data["train_codes"], data["x_train"], data["db_codes"], progress=False)
    rq = index.rq
    ours = shortlist_scan.decoded_norms(rq)
    assert np.all(np.diff(ours) > 0) and rq.norm_min <= ours[0] and ours[-1] <= rq.norm_max
    step = (rq.norm_max - rq.norm_min) / 256
    np.testing.assert_allclose([ours[0], ours[-1]], [rq.norm_min + step / 2, rq.norm_max - step / 2], rtol=1e-6)
