"""Tests of qinco2.ivfsearch.pairwise: IVF sub-codes, greedy pair tables, decoding, files, errors."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
import torch

from qinco2.checkpoint import atomic_torch_save, save_checkpoint
from qinco2.errors import ConfigError, InputError, ModelFileError, NotTrainedError
from qinco2.ivfsearch.aq import additive_decode, fit_additive_codebooks
from qinco2.ivfsearch.pairwise import FORMAT_TAG, PairwiseDecoder, ivf_subcodes, weighted_kmeans
from qinco2.metrics import mse

C, D, M, K = 6, 4, 3, 16


@pytest.fixture(scope="module")
def pair_data():
    """IVF codes whose residual targets depend on code *pairs* (not additive in single codes)."""
    rng = np.random.default_rng(0)
    N = 3000
    centroids = (5 * rng.normal(size=(C, D))).astype(np.float32)
    codes = np.empty((N, 1 + M), dtype=np.int32)
    codes[:, 0] = rng.choice(C, size=N, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    codes[:, 1:] = rng.integers(0, K, size=(N, M))
    f1, f2 = rng.normal(size=(2, K * K, D))
    t = f1[codes[:, 1] * K + codes[:, 2]] + 0.5 * f2[codes[:, 2] * K + codes[:, 3]]
    x = (centroids[codes[:, 0]] + t + 0.05 * rng.normal(size=t.shape)).astype(np.float32)
    return codes, x, centroids


@pytest.fixture(scope="module")
def trained(pair_data):
    codes, x, centroids = pair_data
    return PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False)


def test_learned_state_and_decode_shapes(trained, pair_data):
    codes = pair_data[0]
    J = round(2 * M)
    assert trained.M_ == M and trained.pairs_.shape == (J, 2) and trained.tables_.shape == (J, K * K, D)
    assert trained.tables_.dtype == np.float32 and len(trained.train_mse_) == J
    assert (trained.pairs_[:, 0] < trained.pairs_[:, 1]).all() and trained.pairs_.max() < M + 2
    xhat = trained.decode(codes[:100])
    assert xhat.shape == (100, D) and xhat.dtype == np.float32
    np.testing.assert_array_equal(trained.decode(codes[:100], batch_size=7), xhat)


def test_ivf_subcodes_shape_and_range(trained):
    sub = trained.ivf_subcodes_
    assert sub.shape == (C, 2) and np.issubdtype(sub.dtype, np.integer)
    assert sub.min() >= 0 and sub.max() < min(K, C)
    # C <= K: the first level gives every (distinct) centroid its own cluster
    assert len(np.unique(sub[:, 0])) == C


def test_greedy_never_increases_training_mse(trained, pair_data):
    codes, x, centroids = pair_data
    initial = mse(x - centroids[codes[:, 0]], 0 * x)
    curve = [initial] + trained.train_mse_
    # eval_rows >= N: each table is the exact minimiser over the evaluated rows; float32
    # tables may add ~1e-7 relative, hence the slack
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(curve))
    assert curve[-1] < 0.1 * initial
    # the logged MSE is the decoder's own MSE (float32 sums in another order: 1e-4 relative)
    assert mse(x, trained.decode(codes)) == pytest.approx(trained.train_mse_[-1], rel=1e-4)


def test_first_round_matches_plain_loop_reference(trained, pair_data):
    codes, x, centroids = pair_data
    cols = np.concatenate([codes[:, 1:], trained.ivf_subcodes_[codes[:, 0]]], 1)
    t = (x - centroids[codes[:, 0]]).astype(np.float64)
    best = None
    for a in range(cols.shape[1]):
        for b in range(a + 1, cols.shape[1]):
            table = np.zeros((K * K, D))
            for cell in np.unique(cols[:, a] * K + cols[:, b]):
                table[cell] = t[cols[:, a] * K + cols[:, b] == cell].mean(0)
            err = mse(t, table[cols[:, a] * K + cols[:, b]])
            if best is None or err < best[0]:
                best = (err, (a, b), table)
    assert tuple(trained.pairs_[0]) == best[1]
    # float64 means in another summation order, stored in float32
    np.testing.assert_allclose(trained.tables_[0], best[2], rtol=1e-5, atol=1e-6)
    assert trained.train_mse_[0] == pytest.approx(best[0], rel=1e-5)


def _reference_greedy(cols, t, J, n_eval):
    """The spec's greedy rounds on whole float64 arrays with plain loops over cells: slow, obvious."""
    t, pairs, tables, mses = t.copy(), [], [], []
    for _ in range(J):
        best = None
        for a in range(cols.shape[1]):
            for b in range(a + 1, cols.shape[1]):
                code = cols[:, a] * K + cols[:, b]
                table = np.zeros((K * K, D))
                for cell in np.unique(code):
                    table[cell] = t[code == cell].mean(0)
                table = table.astype(np.float32)          # the decoder stores and decodes float32
                err = mse(t[:n_eval], table[code[:n_eval]])
                if best is None or err < best[0]:
                    best = (err, (a, b), table)
        err, (a, b), table = best
        t -= table[cols[:, a] * K + cols[:, b]]
        pairs.append((a, b)), tables.append(table), mses.append(err)
    return np.array(pairs), np.stack(tables), mses


def test_all_rounds_match_whole_array_reference(pair_data):
    codes, x, centroids = pair_data
    # eval_rows < N and not a multiple of chunk_rows: choices are scored on a window ending mid-chunk
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2, eval_rows=1000).train(codes, x, centroids, progress=False,
                                                                           chunk_rows=128)
    cols = np.concatenate([codes[:, 1:], dec.ivf_subcodes_[codes[:, 0]]], 1).astype(np.int64)
    pairs, tables, mses = _reference_greedy(cols, (x - centroids[codes[:, 0]]).astype(np.float64), 2 * M, 1000)
    np.testing.assert_array_equal(dec.pairs_, pairs)
    # float64 means in another summation order, stored in float32 (at most an ulp apart)
    np.testing.assert_allclose(dec.tables_, tables, rtol=1e-5, atol=1e-6)
    # ulp-level table differences carry into the later residuals: 1e-8 relative seen
    np.testing.assert_allclose(dec.train_mse_, mses, rtol=1e-6)


def test_chunk_and_group_sizes_do_not_change_the_result(pair_data):
    codes, x, centroids = pair_data[0][:600], pair_data[1][:600], pair_data[2]
    whole = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False)
    # 7-row chunks (the last one short) and 3 of the 10 candidate tables per pass over the rows
    small = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False, chunk_rows=7,
                                                             accumulator_bytes=3 * K * K * (D + 1) * 8)
    np.testing.assert_array_equal(small.pairs_, whole.pairs_)
    # the same float64 sums, added in the same row order: equal up to an ulp of float32
    np.testing.assert_allclose(small.tables_, whole.tables_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(small.train_mse_, whole.train_mse_, rtol=1e-12)
    assert small.additive_baseline_mse(codes, x, chunk_rows=7) == pytest.approx(
        whole.additive_baseline_mse(codes, x), rel=1e-12)
    assert whole.decode_mse(codes, x, chunk_rows=7) == pytest.approx(mse(x, whole.decode(codes)), rel=1e-12)


class RowSlices:
    """An array-like over ``a`` that only hands out row slices ``[lo:hi]`` (like a codes file too
    large for memory), recording the most rows asked for at once; whole-array conversion raises."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.largest = a, a.shape, 0

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, f"only row slices, got {key!r}"
        rows = self.a[key].copy()
        self.largest = max(self.largest, len(rows))
        return rows

    def __array__(self, *args, **kwargs):
        raise AssertionError(f"whole-array conversion of {len(self.a)} rows")


def test_training_and_measuring_read_row_chunks_only(trained, pair_data):
    codes, x, centroids = pair_data
    codes_r, x_r, chunk = RowSlices(codes), RowSlices(x), 256
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2, eval_rows=1000).train(codes_r, x_r, centroids,
                                                                           progress=False, chunk_rows=chunk)
    ref = PairwiseDecoder(K=K, ivf_subcode_levels=2, eval_rows=1000).train(codes, x, centroids, progress=False)
    np.testing.assert_array_equal(dec.pairs_, ref.pairs_)
    np.testing.assert_array_equal(dec.tables_, ref.tables_)
    assert dec.additive_baseline_mse(codes_r, x_r, chunk_rows=chunk) == pytest.approx(
        ref.additive_baseline_mse(codes, x), rel=1e-12)
    assert dec.decode_mse(codes_r, x_r, chunk_rows=chunk) == pytest.approx(ref.decode_mse(codes, x), rel=1e-12)
    np.testing.assert_array_equal(dec.decode(codes_r, batch_size=chunk), ref.decode(codes))
    assert codes_r.largest == x_r.largest == chunk < len(codes)


def test_training_memory_is_one_chunk_not_the_training_set(tmp_path):
    """numpy's allocations (traced by tracemalloc) stay far below one float64 copy of x when x
    is a float16 memory map; torch's accumulators (K*K*D, not N*D) are not traced."""
    rng, N, chunk = np.random.default_rng(1), 60_000, 1000
    codes = np.empty((N, 1 + M), dtype=np.int32)
    codes[:, 0], codes[:, 1:] = rng.integers(0, C, N), rng.integers(0, K, (N, M))
    np.save(tmp_path / "codes.npy", codes)
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=(N, 16))
    x[:] = rng.normal(size=(N, 16))
    centroids = rng.normal(size=(C, 16)).astype(np.float32)
    codes, x = np.load(tmp_path / "codes.npy", mmap_mode="r"), np.load(tmp_path / "x.npy", mmap_mode="r")
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2, n_pairs_per_step=1, eval_rows=1000)
    tracemalloc.start()
    try:
        dec.train(codes, x, centroids, progress=False, chunk_rows=chunk)
        dec.additive_baseline_mse(codes, x, chunk_rows=chunk)
        dec.decode_mse(codes, x, chunk_rows=chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a float64 copy of x is N*16*8 = 7.7 MB (the whole-array code held two, ~18 MB in all); a
    # chunk's arrays are ~chunk*(16 + 5)*8 bytes each (0.7 MB peak seen), and the additive
    # baseline's fit on eval_rows rows ~1000*(2*(16 + 5) + 25)*8 bytes (0.6 MB)
    assert peak < N * 16 * 8 / 4


def test_pairwise_beats_additive_on_pair_structured_data(trained, pair_data):
    codes, x, _ = pair_data
    pairwise = mse(x, trained.decode(codes))
    additive = trained.additive_baseline_mse(codes, x)
    # the targets are sums of pair functions: additive tables cannot represent them
    assert pairwise < 0.5 * additive
    # the baseline sees the sub-code columns too, so it is no worse than AQ on the step codes
    t = x - pair_data[2][codes[:, 0]]
    steps_only = mse(t, additive_decode(codes[:, 1:], fit_additive_codebooks(codes[:, 1:], t, K)))
    assert additive <= steps_only * (1 + 1e-6)


def test_save_load_round_trip(trained, pair_data, tmp_path):
    codes = pair_data[0][:200]
    trained.save(tmp_path / "pw.pt")
    loaded = PairwiseDecoder.load(tmp_path / "pw.pt")
    assert loaded.get_params() == trained.get_params() and loaded.train_mse_ == trained.train_mse_
    np.testing.assert_array_equal(loaded.decode(codes), trained.decode(codes))
    assert not list(tmp_path.glob(".*.tmp"))          # atomic write left no temp file


def test_foreign_files_raise_model_file_error(trained, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    atomic_torch_save({"weights": torch.zeros(3)}, tmp_path / "untagged.pt")
    save_checkpoint(tmp_path / "codec.pt", {"D": 4}, {})   # a qinco2 codec model, not a decoder
    trained.save(tmp_path / "future.pt")
    payload = torch.load(tmp_path / "future.pt", weights_only=True)
    atomic_torch_save({**payload, "version": 99}, tmp_path / "future.pt")
    atomic_torch_save({"format": FORMAT_TAG, "version": 1, "params": {}, "state": {}}, tmp_path / "broken.pt")
    for name, match in [("missing.pt", "does not exist"), ("junk.pt", "torch.load failed"),
                        ("untagged.pt", "format tag"), ("codec.pt", "format tag"),
                        ("future.pt", "version 99"), ("broken.pt", "damaged")]:
        with pytest.raises(ModelFileError, match=match):
            PairwiseDecoder.load(tmp_path / name)


def test_untrained_and_bad_inputs(trained, pair_data):
    codes, x, centroids = pair_data
    with pytest.raises(NotTrainedError):
        PairwiseDecoder(K=K).decode(codes)
    bad = codes.copy()
    bad[0, 2] = K
    with pytest.raises(InputError, match="step codes"):
        trained.decode(bad)
    bad[0, 2], bad[1, 0] = 0, C
    with pytest.raises(InputError, match="IVF ids"):
        trained.decode(bad)
    with pytest.raises(InputError, match="columns"):
        trained.decode(codes[:, :3])
    with pytest.raises(InputError, match="rows"):
        PairwiseDecoder(K=K).train(codes, x[:10], centroids, progress=False)
    with pytest.raises(ConfigError, match="n_pairs_per_step"):
        PairwiseDecoder(K=K, n_pairs_per_step=0).train(codes, x, centroids, progress=False)


def test_weighted_kmeans_follows_the_weights():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(30, 3))
    w = np.ones(30)
    w[0] = 1e6
    cents, assign = weighted_kmeans(pts, w, 2, np.random.default_rng(0))
    # the heavy point pulls its centroid onto itself: offset <= (cluster size / 1e6) * spread
    np.testing.assert_allclose(cents[assign[0]], pts[0], atol=1e-4)
    w[5:] = 0                                           # only 5 lists hold vectors
    sub = ivf_subcodes(pts.astype(np.float32), w, levels=2, K=8, seed=0)
    assert sub.shape == (30, 2) and sub.max() < 5        # min(K, #weighted lists) centroids
