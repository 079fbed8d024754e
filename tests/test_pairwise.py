"""Tests of qinco2.ivfsearch.pairwise: IVF sub-codes, greedy pair tables, decoding, files, errors."""

from __future__ import annotations

import itertools
import shutil
import tracemalloc

import numpy as np
import pytest
import torch

from qinco2.checkpoint import atomic_torch_save, save_checkpoint
from qinco2.errors import ConfigError, InputError, ModelFileError, NotTrainedError
from qinco2.ivfsearch.aq import additive_decode, fit_additive_codebooks
from qinco2.ivfsearch.pair_tables import ResidualFile
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


def _hold(n: int, holdout_rows: int = 100_000) -> int:
    """Rows held out by training on ``n`` rows (the decoder's rule)."""
    return max(1, min(holdout_rows, n // 4))


def test_learned_state_and_decode_shapes(trained, pair_data):
    codes = pair_data[0]
    J = len(trained.pairs_)
    assert 2 <= J <= round(2 * M) and trained.pairs_.shape == (J, 2) and trained.tables_.shape == (J, K * K, D)
    assert trained.tables_.dtype == np.float32 and len(trained.holdout_mse_) == len(trained.shrinkage_) == J
    assert (trained.pairs_[:, 0] < trained.pairs_[:, 1]).all() and trained.pairs_.max() < M + 2
    xhat = trained.decode(codes[:100])
    assert xhat.shape == (100, D) and xhat.dtype == np.float32
    np.testing.assert_array_equal(trained.decode(codes[:100], batch_size=7), xhat)
    # slow obvious reference: centroid + one AQ row per column + one row per pair table
    cols = np.concatenate([codes[:100, 1:], trained.ivf_subcodes_[codes[:100, 0]]], axis=1)
    slow = np.array([trained.ivf_centroids_[row[0]].astype(np.float64)
                     + sum(trained.aq_tables_[m, c[m]] for m in range(len(trained.aq_tables_)))
                     + sum(t[c[a] * K + c[b]] for (a, b), t in zip(trained.pairs_, trained.tables_))
                     for row, c in zip(codes[:100], cols)])
    np.testing.assert_allclose(xhat, slow, rtol=1e-4, atol=1e-4 * np.abs(slow).max())


def test_ivf_subcodes_shape_and_range(trained):
    sub = trained.ivf_subcodes_
    assert sub.shape == (C, 2) and np.issubdtype(sub.dtype, np.integer)
    assert sub.min() >= 0 and sub.max() < min(K, C)
    # C <= K: the first level gives every (distinct) centroid its own cluster
    assert len(np.unique(sub[:, 0])) == C


def test_every_table_lowers_the_held_out_mse(trained, pair_data):
    codes, x, centroids = pair_data
    h = _hold(len(codes))
    # the decoder starts from AQ tables (ridge chosen on the held-out rows)
    cols = np.concatenate([codes[:, 1:], trained.ivf_subcodes_[codes[:, 0]]], 1)
    initial = mse(x[:h] - centroids[codes[:h, 0]], additive_decode(cols[:h], trained.aq_tables_))
    assert initial <= trained.additive_baseline_mse(codes, x) * (1 + 1e-6)
    curve = [initial] + trained.holdout_mse_
    assert all(b < a * (1 - trained.min_gain) for a, b in itertools.pairwise(curve))
    assert curve[-1] < 0.1 * initial
    # the logged MSE is the decoder's own MSE on the held-out rows (float32 tables: 1e-4 relative)
    assert mse(x[:h], trained.decode(codes[:h])) == pytest.approx(trained.holdout_mse_[-1], rel=1e-4)


def _shrunk_table(t_fit, code_fit, lam):
    """Per-cell ``sum / (count + lam)`` with a plain loop over the occupied cells (0 elsewhere)."""
    table = np.zeros((K * K, D))
    for cell in np.unique(code_fit):
        rows = t_fit[code_fit == cell]
        table[cell] = rows.sum(0) / (len(rows) + lam)
    return table


def _reference_greedy(cols, t, J, h, shrinkage, min_gain):
    """The greedy rounds on whole float64 arrays: fit on rows ``h:``, score every pair and
    shrinkage on rows ``:h``, stop when the best gains less than ``min_gain``. Slow, obvious."""
    t, pairs, tables, mses, lams = t.copy(), [], [], [], []
    for _ in range(J):
        best, before = None, mse(t[:h], 0 * t[:h])
        for a in range(cols.shape[1]):
            for b in range(a + 1, cols.shape[1]):
                code = cols[:, a] * K + cols[:, b]
                for lam in shrinkage:
                    table = _shrunk_table(t[h:], code[h:], lam)
                    err = mse(t[:h], table[code[:h]])
                    if best is None or err < best[0]:
                        best = (err, (a, b), lam, table.astype(np.float32))   # decoded in float32
        err, (a, b), lam, table = best
        if not err < before * (1 - min_gain):
            break
        t -= table[cols[:, a] * K + cols[:, b]]
        pairs.append((a, b)), tables.append(table), mses.append(err), lams.append(lam)
    return np.array(pairs), np.stack(tables), mses, lams


def test_first_round_matches_plain_loop_reference(trained, pair_data):
    codes, x, centroids = pair_data
    cols = np.concatenate([codes[:, 1:], trained.ivf_subcodes_[codes[:, 0]]], 1)
    t = (x - centroids[codes[:, 0]]).astype(np.float64)
    h = _hold(len(codes))
    # the AQ start: least-squares tables on the fitting rows with one of the shrinkage values as ridge
    assert any(np.allclose(trained.aq_tables_, fit_additive_codebooks(cols[h:], t[h:], K, ridge=max(r, 1e-6)),
                           rtol=1e-4, atol=1e-5) for r in trained.shrinkage)
    t -= additive_decode(cols, trained.aq_tables_)
    pairs, tables, mses, lams = _reference_greedy(cols, t, 1, h, trained.shrinkage, trained.min_gain)
    assert tuple(trained.pairs_[0]) == tuple(pairs[0]) and trained.shrinkage_[0] == lams[0]
    # float64 sums in another summation order, stored in float32
    np.testing.assert_allclose(trained.tables_[0], tables[0], rtol=1e-5, atol=1e-6)
    assert trained.holdout_mse_[0] == pytest.approx(mses[0], rel=1e-5)


def test_all_rounds_match_whole_array_reference(pair_data):
    codes, x, centroids = pair_data
    # 700 held-out rows with 128-row chunks: the held-out window ends mid-chunk
    shrinkage = (0.0, 1.0, 3.0, 30.0)
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2, holdout_rows=700, shrinkage=shrinkage,
                          additive_start=False).train(codes, x, centroids, progress=False, chunk_rows=128)
    cols = np.concatenate([codes[:, 1:], dec.ivf_subcodes_[codes[:, 0]]], 1).astype(np.int64)
    pairs, tables, mses, lams = _reference_greedy(cols, (x - centroids[codes[:, 0]]).astype(np.float64), 2 * M,
                                                  700, shrinkage, dec.min_gain)
    np.testing.assert_array_equal(dec.pairs_, pairs)
    assert dec.shrinkage_ == lams and len(lams) >= 2
    # float64 sums in another order, stored in float32 (at most an ulp apart)
    np.testing.assert_allclose(dec.tables_, tables, rtol=1e-5, atol=1e-6)
    # ulp-level table differences carry into the later residuals
    np.testing.assert_allclose(dec.holdout_mse_, mses, rtol=1e-6)


def _noisy_pairs(rng, N, noise):
    """Codes whose residual is a weak pair function plus strong noise: few rows per cell."""
    codes = np.empty((N, 1 + M), dtype=np.int32)
    codes[:, 0], codes[:, 1:] = 0, rng.integers(0, K, size=(N, M))
    f = np.random.default_rng(7).normal(size=(K * K, D))
    t = f[codes[:, 1] * K + codes[:, 2]] + noise * rng.normal(size=(N, D))
    return codes, t.astype(np.float32)


def test_shrinkage_and_held_out_choice_beat_plain_means_on_fresh_data():
    """About 4 fitting rows per cell and noise 3x the signal: plain means decode their own rows
    well and fresh rows worse than no table; shrunk tables chosen on held-out rows do not."""
    rng = np.random.default_rng(5)
    (codes, x), (fresh_codes, fresh_x) = _noisy_pairs(rng, 1400, 3.0), _noisy_pairs(rng, 4000, 3.0)
    centroids = np.zeros((1, D), dtype=np.float32)
    plain = PairwiseDecoder(K=K, ivf_subcode_levels=0, shrinkage=(0.0,), min_gain=-1.0)
    with pytest.raises(ConfigError, match="min_gain"):
        plain.train(codes, x, centroids, progress=False)
    plain.min_gain = 0.0
    shrunk = PairwiseDecoder(K=K, ivf_subcode_levels=0).train(codes, x, centroids, progress=False)
    nothing = mse(fresh_x, 0 * fresh_x)
    assert min(shrunk.shrinkage_) > 0
    assert shrunk.decode_mse(fresh_codes, fresh_x) < 0.99 * nothing
    # the in-sample rule of version 1 (every table, lam = 0, chosen on fitted rows): worse than nothing
    fit_all = PairwiseDecoder(K=K, ivf_subcode_levels=0, shrinkage=(0.0,), holdout_rows=1, additive_start=False)
    fit_all.train(codes, x, centroids, progress=False)
    assert fit_all.decode_mse(fresh_codes, fresh_x) > nothing


def test_no_table_is_kept_when_none_helps():
    rng = np.random.default_rng(6)
    codes = np.zeros((2000, 1 + M), dtype=np.int32)
    codes[:, 1:] = rng.integers(0, K, size=(2000, M))
    x = rng.normal(size=(2000, D)).astype(np.float32)          # independent of the codes
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=0, shrinkage=(0.0, 1.0), additive_start=False).train(
        codes, x, np.zeros((1, D), np.float32), progress=False)
    assert dec.pairs_.shape == (0, 2) and dec.tables_.shape == (0, K * K, D) and dec.holdout_mse_ == []
    np.testing.assert_array_equal(dec.decode(codes[:5]), np.zeros((5, D), np.float32))


def test_chunk_and_group_sizes_do_not_change_the_result(pair_data):
    codes, x, centroids = pair_data[0][:600], pair_data[1][:600], pair_data[2]
    whole = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False)
    # 7-row chunks (the last one short) and 3 of the 10 candidate tables per pass over the rows
    small = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False, chunk_rows=7,
                                                             accumulator_bytes=3 * K * K * (2 * D + 2) * 8)
    np.testing.assert_array_equal(small.pairs_, whole.pairs_)
    # the same float64 sums, added in the same row order: equal up to an ulp of float32
    np.testing.assert_allclose(small.tables_, whole.tables_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(small.holdout_mse_, whole.holdout_mse_, rtol=1e-12)
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
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2, holdout_rows=1000).train(codes_r, x_r, centroids,
                                                                           progress=False, chunk_rows=chunk)
    ref = PairwiseDecoder(K=K, ivf_subcode_levels=2, holdout_rows=1000).train(codes, x, centroids, progress=False)
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
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2, n_pairs_per_step=1, holdout_rows=1000)
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
    # baseline's fit on holdout_rows rows ~1000*(2*(16 + 5) + 25)*8 bytes (0.6 MB)
    assert peak < N * 16 * 8 / 4


def test_pairwise_beats_additive_on_pair_structured_data(trained, pair_data):
    codes, x, _ = pair_data
    h = trained.n_holdout(len(codes))
    pairwise = mse(x[:h], trained.decode(codes[:h]))
    additive = trained.additive_baseline_mse(codes, x)
    # the targets are sums of pair functions: additive tables cannot represent them
    assert pairwise < 0.5 * additive
    # the baseline (fitted on the fitting rows, measured on the held-out ones) is a plain fit of
    # AQ tables on the step codes and the sub-codes
    t = x - pair_data[2][codes[:, 0]]
    cols = np.concatenate([codes[:, 1:], trained.ivf_subcodes_[codes[:, 0]]], 1)
    both = mse(t[:h], additive_decode(cols[:h], fit_additive_codebooks(cols[h:], t[h:], K)))
    assert additive == pytest.approx(both, rel=1e-6)


def test_save_load_round_trip(trained, pair_data, tmp_path):
    codes = pair_data[0][:200]
    trained.save(tmp_path / "pw.pt")
    loaded = PairwiseDecoder.load(tmp_path / "pw.pt")
    assert loaded.get_params() == trained.get_params() and loaded.holdout_mse_ == trained.holdout_mse_
    assert loaded.shrinkage_ == trained.shrinkage_
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


def test_version_1_files_still_load(pair_data, tmp_path):
    """Files of the in-sample version (``eval_rows``, ``train_mse_``, no shrinkage, no AQ tables)
    decode as before."""
    trained = PairwiseDecoder(K=K, ivf_subcode_levels=2, additive_start=False).train(*pair_data, progress=False)
    trained.save(tmp_path / "v2.pt")
    payload = torch.load(tmp_path / "v2.pt", weights_only=True)
    params = {k: v for k, v in payload["params"].items()
              if k not in ("holdout_rows", "shrinkage", "min_gain", "additive_start")}
    state = {k: v for k, v in payload["state"].items() if k not in ("holdout_mse_", "shrinkage_", "aq_tables_")}
    atomic_torch_save({**payload, "version": 1, "params": {**params, "eval_rows": 1000},
                       "state": {**state, "train_mse_": [0.5] * len(trained.pairs_)}}, tmp_path / "v1.pt")
    old = PairwiseDecoder.load(tmp_path / "v1.pt")
    assert old.holdout_rows == 1000 and old.holdout_mse_ == [0.5] * len(trained.pairs_)
    assert old.shrinkage_ == [0.0] * len(trained.pairs_) and not old.additive_start and len(old.aq_tables_) == 0
    np.testing.assert_array_equal(old.decode(pair_data[0][:50]), trained.decode(pair_data[0][:50]))


def test_additive_start_is_never_worse_than_aq_on_held_out_rows(pair_data):
    """Additive targets plus noise: AQ tables explain them, pair tables add little; the decoder
    starts from the AQ tables and keeps a pair table only when the held-out rows gain."""
    codes, _, centroids = pair_data
    rng = np.random.default_rng(8)
    g = rng.normal(size=(M, K, D))
    t = sum(g[m][codes[:, 1 + m]] for m in range(M)) + 0.3 * rng.normal(size=(len(codes), D))
    x = (centroids[codes[:, 0]] + t).astype(np.float32)
    dec = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False)
    h, aq = dec.n_holdout(len(codes)), dec.additive_baseline_mse(codes, x)
    assert dec.aq_tables_.shape == (M + 2, K, D)
    assert mse(x[:h], dec.decode(codes[:h])) <= aq * (1 + 1e-6)
    greedy = PairwiseDecoder(K=K, ivf_subcode_levels=2, additive_start=False).train(codes, x, centroids,
                                                                                   progress=False)
    # greedy pair tables from the centroids do not reach the joint least-squares fit here
    assert mse(x[:h], greedy.decode(codes[:h])) > mse(x[:h], dec.decode(codes[:h]))


class CountingRows:
    """Row slices of ``a``, counting the rows handed out."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.rows_read = a, a.shape, 0

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, key):
        rows = self.a[key]
        self.rows_read += len(rows)
        return rows


def test_each_round_reads_the_scratch_file_not_the_vectors(pair_data, tmp_path):
    """The vectors are read a fixed number of times (list sizes, AQ tables, the scratch file),
    however many rounds run; the residual of the chosen tables lives in the scratch file, which
    exists in ``scratch_dir`` during training only."""
    codes, x, centroids = pair_data
    x_r = CountingRows(x)
    seen = []

    def spy(self, a, b, table):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real_subtract(self, a, b, table)

    real_subtract = ResidualFile.subtract

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qinco2.ivfsearch.pair_tables.ResidualFile.subtract", spy)
        dec = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x_r, centroids, progress=False,
                                                               chunk_rows=500, accumulator_bytes=1,
                                                               scratch_dir=tmp_path)
    assert len(dec.pairs_) >= 3                         # several rounds of 10 one-pair groups each
    # finiteness check + AQ fit (held-out and fitting rows) + the scratch file: 3 passes at most,
    # where recomputing the residual read all rows twice per group per round (>= 60 passes here)
    assert x_r.rows_read <= 3 * len(x)
    J = dec._check_params(M)             # the last allowed round leaves the file as it is
    assert len(seen) == (len(dec.pairs_) - 1 if len(dec.pairs_) == J else len(dec.pairs_))
    assert all(len(names) == 1 and names[0].startswith("qinco2-pairwise-") for names in seen)
    assert list(tmp_path.iterdir()) == []               # removed at the end
    ref = PairwiseDecoder(K=K, ivf_subcode_levels=2).train(codes, x, centroids, progress=False)
    np.testing.assert_array_equal(dec.pairs_, ref.pairs_)
    np.testing.assert_allclose(dec.tables_, ref.tables_, rtol=1e-5, atol=1e-6)


def test_scratch_file_needs_space_and_is_removed_after_an_error(pair_data, tmp_path, monkeypatch):
    codes, x, centroids = pair_data
    real = shutil.disk_usage
    monkeypatch.setattr("qinco2.ivfsearch.pair_tables.shutil.disk_usage",
                        lambda p: real(p)._replace(free=1000))
    with pytest.raises(InputError, match=r"scratch file of .* GiB, but .* free; pass scratch_dir="):
        PairwiseDecoder(K=K).train(codes, x, centroids, progress=False, scratch_dir=tmp_path)
    monkeypatch.undo()

    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr("qinco2.ivfsearch.pair_tables._best_of_group", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        PairwiseDecoder(K=K).train(codes, x, centroids, progress=False, scratch_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
