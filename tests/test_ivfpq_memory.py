"""IVF-PQ memory bounds at scale, checked by counting rows, bytes and passes (never time).

Search: whatever the list sizes, no temporary outgrows ``workspace_bytes`` (large lists are
scanned in pieces) and the results equal the unbounded run's. Build: the k-means sample is
never copied to float32 (k-means reads a view of the data block by block), PQ codebooks read
only the rows they train on, ``"cluster"`` codebooks group the sample by list in one pass, and
the codebooks equal those of the whole-sample algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import qinco2.kmeans
from qinco2 import ivfpq
from qinco2.ivfpq import IndexParams, SearchParams, builder, scan
from qinco2.kmeans import kmeans

D, N, NQ = 16, 20_000, 40


def _outputs(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


class LargestTemporary(TorchFunctionMode):
    """Bytes of the largest tensor storage created by a torch operation, leaving out the
    storages of the index (views of its buffers and tables)."""

    def __init__(self, index):
        super().__init__()
        lists = index.lists                  # torch buffers, or (CPU, subspace) lists held by faiss
        held = [getattr(lists, name) for name in ("codes", "ids", "size", "start") if hasattr(lists, name)]
        held += [index.centers, index.centers_rot, index.pq_centers, index.rotation_matrix]
        self.held = {t.untyped_storage().data_ptr() for t in held}
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _outputs(out):
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.held:
                self.bytes = max(self.bytes, storage.nbytes())
        return out


@pytest.fixture(scope="module")
def big_lists(clustered):
    """Two lists of about 10,000 vectors each, and queries that probe both."""
    x = clustered(N + NQ, D=D, C=24, seed=11)
    index = ivfpq.build(IndexParams(n_lists=2, pq_dim=8, pq_bits=6, kmeans_n_iters=4), x[:N])
    assert index.list_sizes.min() > 4_000
    return index, x[N:]


def assert_same_up_to_ties(dist, ids, ref_dist, ref_ids):
    """Equal distances; an id may differ only where its distance is tied (twice in the row, or
    the k-th one)."""
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-6)   # float32 sums of the same terms
    for row, j in zip(*np.nonzero(ids != ref_ids)):
        d = ref_dist[row, j]
        assert np.isclose(ref_dist[row], d, rtol=1e-6).sum() >= 2 or np.isclose(d, ref_dist[row, -1], rtol=1e-6)


# ---------------------------------------------------------------------------- search
@pytest.mark.parametrize("lut, internal", [("float32", "float32"), ("float16", "float32"), ("uint8", "float16")])
def test_search_temporaries_stay_under_the_workspace_on_large_lists(big_lists, lut, internal):
    index, q = big_lists
    p = SearchParams(n_probes=2, lut_dtype=lut, internal_distance_dtype=internal, cpu_scan="torch")
    workspace = 1 << 20              # a list's decoded rows or its 40 queries' scores: 0.6 to 3 MB
    with LargestTemporary(index) as probe:
        dist, ids = ivfpq.search(p, index, q, 10, workspace_bytes=workspace)
    assert probe.bytes <= workspace, (probe.bytes, workspace)
    with LargestTemporary(index) as unbounded:
        ref_dist, ref_ids = ivfpq.search(p, index, q, 10)
    assert unbounded.bytes > 2 * workspace          # the bound was needed
    assert_same_up_to_ties(dist, ids, ref_dist, ref_ids)


def test_chunks_cover_the_lists_in_order_under_the_budget():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 12))
        size = rng.integers(1, 3000, n).tolist()
        pairs = rng.integers(1, 50, n).tolist()
        budget, row, pair_row = int(rng.integers(1, 400_000)), 100, 8
        chunks = scan._chunks(size, pairs, float(rng.integers(0, 5000)), row, pair_row, budget)
        first = np.concatenate([[0], np.cumsum(size)])
        assert [c[2] for c in chunks] == [0] + [c[3] for c in chunks[:-1]] and chunks[-1][3] == first[-1]
        for u0, u1, a, b in chunks:
            assert b > a and (u1 == u0 + 1 or (a, b) == (first[u0], first[u1]))   # whole lists or a piece
            assert first[u0] <= a and b <= first[u1]
            m = sum(pairs[u0:u1])
            assert b - a == 1 or (b - a) * (row + m * pair_row) <= budget


def test_estimate_counts_the_bounded_search_workspace(big_lists):
    index, q = big_lists
    p = SearchParams(n_probes=2, cpu_scan="torch")       # the torch scan's bounded workspace

    def workspace(n_queries, workspace_bytes):
        est = ivfpq.estimate_memory(N, D, index.params, n_queries=n_queries, search_params=p,
                                    workspace_bytes=workspace_bytes)
        assert est["search_peak_bytes"] - est["index_bytes"] >= est["search_workspace_bytes"]
        return est["search_workspace_bytes"]

    assert workspace(1, 16 << 20) < workspace(NQ, 16 << 20) < workspace(10 * NQ, 16 << 20) == 16 << 20
    for budget in (1 << 20, scan.DEFAULT_WORKSPACE_BYTES):      # measured <= estimated <= budget
        with LargestTemporary(index) as probe:
            ivfpq.search(p, index, q, 10, workspace_bytes=budget)
        assert probe.bytes <= workspace(NQ, budget) <= budget
    huge = ivfpq.estimate_memory(10**9, 128, IndexParams(n_lists=1024, pq_dim=32), n_queries=10**4)
    assert huge["search_workspace_bytes"] == scan.DEFAULT_WORKSPACE_BYTES
    n_train = 10**9 // 2                            # the float32 sample of the old build: 256 GB
    assert huge["build_peak_bytes"] < n_train * 128 * 4 / 100


# ---------------------------------------------------------------------------- build
class Tracked(np.ndarray):
    """An array that records the most rows that indexing ever copied out of it (views are free)."""

    copied = 0

    def __getitem__(self, key):
        out = super().__getitem__(key)
        if isinstance(out, np.ndarray) and out.ndim == 2 and not np.may_share_memory(out, self):
            Tracked.copied = max(Tracked.copied, len(out))
        return out


@pytest.mark.parametrize("kind, metric", [("subspace", "sqeuclidean"), ("cluster", "sqeuclidean"),
                                          ("subspace", "cosine")])
def test_build_converts_the_sample_chunk_by_chunk(tmp_path, clustered, monkeypatch, kind, metric):
    n, chunk = 30_000, 1000
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(n, D))
    mm[:] = clustered(n, D=D, seed=2)
    x = mm.view(Tracked)
    Tracked.copied = 0
    converted, kmeans_inputs = [], []
    float_rows, convert = builder.float_rows, qinco2.kmeans._Points.convert

    def spy_kmeans(points, K, **kw):
        kmeans_inputs.append(points)
        return kmeans(points, K, **{**kw, "max_bytes": 200_000})      # blocks of 581 rows

    def spy_convert(self, block):
        if isinstance(block, np.ndarray):
            converted.append(block.shape[-2])
        return convert(self, block)

    monkeypatch.setattr(builder, "CHUNK_ROWS", chunk)
    monkeypatch.setattr(builder, "float_rows", lambda a, *args: converted.append(len(a)) or float_rows(a, *args))
    monkeypatch.setattr(builder, "kmeans", spy_kmeans)
    monkeypatch.setattr(qinco2.kmeans._Points, "convert", spy_convert)
    params = IndexParams(n_lists=8, pq_dim=4, pq_bits=4, kmeans_n_iters=2, codebook_kind=kind, metric=metric,
                         max_train_points_per_pq_code=16)        # PQ training: at most 256 rows or sub-vectors
    index = ivfpq.build(params, x)
    assert index.size == n
    n_train = n // 2
    assert sum(converted) > n_train and max(converted) <= chunk < n_train       # chunks, never the sample
    assert Tracked.copied <= chunk
    first = kmeans_inputs[0]
    assert len(first) == n_train and isinstance(first, np.ndarray)
    if metric == "cosine":                       # the normalised sample: float16, half a float32 copy
        assert first.dtype == np.float16
    else:                                        # a view of the memory map itself
        assert np.shares_memory(first, mm)


class SampleLengthOutputs(TorchFunctionMode):
    """Counts the torch operations, outside k-means, whose output has one row per sample row:
    each is a pass over the sample's labels or rows."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.count, self.paused = n, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self.count += sum(t.ndim >= 1 and len(t) >= self.n for t in _outputs(out))
        return out


def test_cluster_codebooks_group_the_sample_by_list_once(clustered, monkeypatch):
    n, n_lists = 8000, 32
    x = clustered(n, D=D, seed=6)
    counter = SampleLengthOutputs(n // 2)

    def paused_kmeans(*args, **kw):
        counter.paused = True
        try:
            return kmeans(*args, **kw)
        finally:
            counter.paused = False

    monkeypatch.setattr(builder, "CHUNK_ROWS", 500)
    monkeypatch.setattr(builder, "kmeans", paused_kmeans)
    params = IndexParams(n_lists=n_lists, pq_dim=4, pq_bits=4, kmeans_n_iters=2, codebook_kind="cluster",
                         max_train_points_per_pq_code=4, add_data_on_build=False)
    with counter:
        ivfpq.build(params, x)
    assert counter.count <= 4, counter.count       # labels gathered, sorted: not one scan per list


def _whole_sample_books(index, x_ND, gen):
    """The slow obvious reference: residuals of the whole float32 sample, then the cap; one
    boolean scan of the labels per list."""
    p, K, L = index.params, index.pq_book_size, index.pq_len
    list_nos = index.assign(x_ND)
    r_NSL = (index.rotate(x_ND) - index.centers_rot[list_nos]).view(len(x_ND), index.pq_dim, L)
    cap = K * p.max_train_points_per_pq_code
    if p.codebook_kind == "subspace":
        rows = torch.randperm(len(x_ND), generator=gen)[:cap]
        return kmeans(r_NSL[rows].transpose(0, 1).contiguous(), K, niter=p.kmeans_n_iters, seed=gen)
    books = torch.empty(index.n_lists, K, L)
    for li in range(index.n_lists):
        sub_NL = r_NSL[list_nos == li].reshape(-1, L)
        if len(sub_NL) == 0:
            sub_NL = r_NSL.reshape(-1, L)
        books[li] = kmeans(sub_NL[torch.randperm(len(sub_NL), generator=gen)[:cap]], K, niter=p.kmeans_n_iters,
                          seed=gen)
    return books


@pytest.mark.parametrize("kind", ["subspace", "cluster"])
def test_codebooks_equal_the_whole_sample_reference(clustered, kind, monkeypatch):
    x = clustered(4000, D=D, seed=8)
    params = IndexParams(n_lists=6, pq_dim=4, pq_bits=4, kmeans_n_iters=3, codebook_kind=kind,
                         add_data_on_build=False)
    index = ivfpq.build(params, x)
    index.centers[5] = 1e6                          # list 5 gets no sample row: the empty-list case
    index.centers_rot = index.rotate(index.centers)
    sample = x[1::2]
    monkeypatch.setattr(builder, "CHUNK_ROWS", 300)
    train = builder._subspace_books if kind == "subspace" else builder._cluster_books
    got = train(index, sample, torch.Generator().manual_seed(1), False)
    want = _whole_sample_books(index, torch.from_numpy(sample), torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, torch.as_tensor(want), rtol=0, atol=0)


def test_sample_is_a_strided_view_with_cuvs_sizes(clustered):
    x = clustered(1000, D=D, seed=1)
    gen = torch.Generator().manual_seed(0)
    for fraction, n_lists, size in [(0.5, 8, 500), (0.1, 8, 100), (0.3, 8, 333), (0.7, 8, 1000), (0.001, 40, 40)]:
        sample = builder._sample(x, fraction, n_lists, gen)
        assert len(sample) == size and np.shares_memory(sample, x)


@pytest.mark.parametrize("conservative", [True, False])
def test_a_bulk_add_sizes_the_lists_once(monkeypatch, conservative):
    """A bulk extend counts the vectors per list first: the buffers are allocated once (for a
    conservative index at the exact final size) and no list moves while filling."""
    x = np.random.default_rng(3).normal(size=(3000, D)).astype(np.float32)
    params = IndexParams(n_lists=8, pq_dim=8, kmeans_n_iters=4, add_data_on_build=False,
                         conservative_memory_allocation=conservative)
    monkeypatch.setattr(builder, "CHUNK_ROWS", 400)                 # 8 chunks, the last short
    ref = ivfpq.build(params, x)
    for i in range(0, len(x), 400):                                  # chunk by chunk: lists grow
        ivfpq.extend(ref, x[i:i + 400], np.arange(i, min(i + 400, len(x))))
    index = ivfpq.build(params, x)
    buffers, moves = [], []
    lists = index.lists
    relayout, relocate = type(lists)._relayout, type(lists)._relocate
    monkeypatch.setattr(type(lists), "_relayout",
                        lambda self, c: relayout(self, c) or buffers.append(self.allocated_rows()))
    monkeypatch.setattr(type(lists), "_relocate", lambda self, *a: moves.append(1) or relocate(self, *a))
    ivfpq.extend(index, x, np.arange(len(x)))
    assert moves == [] and len(buffers) == 1
    if conservative:
        assert buffers == [len(x)] and index.nbytes() == ref.nbytes()
    assert lists.ntotal == len(x) and buffers[0] <= 2 * len(x) + 8 * 32
    sp = SearchParams(n_probes=3)
    np.testing.assert_array_equal(ivfpq.search(sp, index, x[:20], 5)[1], ivfpq.search(sp, ref, x[:20], 5)[1])
