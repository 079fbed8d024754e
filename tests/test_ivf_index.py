"""Tests of qinco2.ivfsearch.index: the IVFQincoIndex object against the file-based pipeline,
ids, files, metrics and errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import qinco2
from qinco2.codec.codec import QincoCodec
from qinco2.codec.codes_io import encode_to_file, load_encoded
from qinco2.errors import ConfigError, DatasetError, InputError, NotTrainedError
from qinco2.ivf import train_ivf_centroids
from qinco2.ivfsearch import IVFQincoIndex, PairwiseDecoder, SearchParams, multistage_search
from qinco2.ivfsearch.aq import additive_decode
from qinco2.ivfsearch.pipeline import search_index
from qinco2.ivfsearch.shortlist import aq_tables, build_index
from qinco2.metrics import knn

C, D, M, K = 8, 8, 2, 256
NB, NQ = 300, 20
FULL = dict(nprobe=C, quantizer_efSearch=16, nshort=NB)       # every vector reaches the exact re-rank
SETTINGS = [dict(nprobe=2, quantizer_efSearch=8, nshort=10), dict(nprobe=4, quantizer_efSearch=16, nshort=1),
            dict(nprobe=4, quantizer_efSearch=16, nshort=20, nmid_short=4), FULL]


def _codec(x_train, x_val, centroids, seed=0):
    codec = QincoCodec.from_preset("qinco2-S", M=M, K=K, L=1, de=8, dh=16, A=8, B=4, batch=256, epochs=2,
                                   ramp_epochs=1, lr=3e-3, max_epochs=2, seed=seed)
    return codec.train(x_train, x_val, ivf_centroids=centroids, progress=False)


@pytest.fixture(scope="module")
def env(clustered):
    """A tiny IVF QINCo2 codec (K=256), its data, and an l2 index of the database with a
    pairwise decoder (read-only: tests that add make their own index)."""
    x = clustered(2000 + NB + NQ, D=D, C=C, seed=5)
    x_train, x_val, x_db, x_q = x[:1800], x[1800:2000], x[2000:2000 + NB], x[2000 + NB:]
    centroids = train_ivf_centroids(x_train, C, progress=False)
    codec = _codec(x_train, x_val, centroids)
    index = IVFQincoIndex(codec).train(x_train, pairwise=PairwiseDecoder(K=K, ivf_subcode_levels=1),
                                       progress=False)
    index.add(x_db, progress=False)
    return dict(codec=codec, x_train=x_train, x_val=x_val, x_db=x_db, queries=x_q, index=index,
                centroids=centroids)


def _fresh(env, metric="l2", pairwise=False):
    return IVFQincoIndex(env["codec"], metric).train(env["x_train"], pairwise=pairwise, progress=False)


def _same_results(a, b, queries, settings=SETTINGS, k=10):
    for p in settings:
        da, ia = a.search(queries, k, SearchParams(**p))
        db, ib = b.search(queries, k, SearchParams(**p))
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


def test_search_equals_the_file_based_pipeline(env):
    codec, index = env["codec"], env["index"]
    train_codes, db_codes = codec.encode(env["x_train"]), codec.encode(env["x_db"])
    faiss_index = build_index(index.ivf_centroids, train_codes, env["x_train"], db_codes, progress=False)
    pairwise = PairwiseDecoder(K=K, ivf_subcode_levels=1).train(train_codes, env["x_train"], index.ivf_centroids,
                                                                 progress=False)
    np.testing.assert_array_equal(pairwise.tables_, index.pairwise_.tables_)
    np.testing.assert_array_equal(np.asarray(index.codes), db_codes)
    plain = _fresh(env)
    plain.add(env["x_db"], progress=False)
    for p in SETTINGS:
        for ix, dec in ((plain, None), (index, pairwise)):
            want, _ = multistage_search(faiss_index, codec, db_codes, env["queries"], SearchParams(**p),
                                        pairwise=dec, k=10)
            dist, ids = ix.search(env["queries"], 10, SearchParams(**p))
            np.testing.assert_array_equal(ids, want)
            assert dist.shape == ids.shape == (NQ, 10) and ids.dtype == np.int64
    # D: squared L2 distances to the decoded vectors, ascending (-1: +inf)
    dist, ids = index.search(env["queries"], 10, SearchParams(**FULL))
    xhat = codec.decode(db_codes)
    np.testing.assert_allclose(dist, ((env["queries"][:, None] - xhat[ids]) ** 2).sum(-1), rtol=1e-5, atol=1e-5)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_centroids_come_from_the_codec(env):
    # the codec holds them normalised: float32 round trip
    np.testing.assert_allclose(env["index"].ivf_centroids, env["centroids"], rtol=1e-5, atol=1e-5)
    quantizer = faiss.downcast_index(env["index"].shortlist_.quantizer)
    np.testing.assert_array_equal(quantizer.reconstruct_n(0, C), env["index"].ivf_centroids)


def test_add_equals_add_codes_in_every_form(env, tmp_path):
    codec, x_db = env["codec"], env["x_db"]
    added = _fresh(env)
    added.add(x_db, progress=False)
    encode_to_file(codec, x_db, tmp_path / "db.npy", progress=False)
    forms = [codec.encode(x_db, packed=True), codec.encode(x_db), load_encoded(tmp_path / "db.npy"),
             load_encoded(tmp_path / "db.npy")["codes"]]
    for codes in forms:
        other = _fresh(env)
        other.add_codes(codes, progress=False)
        assert other.ntotal == added.ntotal == NB
        np.testing.assert_array_equal(np.asarray(other.codes), np.asarray(added.codes))
        _same_results(added, other, env["queries"])


def test_adding_in_chunks_and_batches_changes_nothing(env, monkeypatch):
    import qinco2.ivfsearch.index as index_mod

    whole = _fresh(env)
    whole.add(env["x_db"], progress=False)
    monkeypatch.setattr(index_mod, "CHUNK_ROWS", 64)
    parts = _fresh(env)
    parts.add(env["x_db"][:100], progress=False)
    parts.add_codes(env["codec"].encode(env["x_db"][100:], packed=True), progress=False)
    assert parts.ntotal == NB
    _same_results(whole, parts, env["queries"])


def test_custom_ids_are_returned(env):
    plain = _fresh(env)
    plain.add(env["x_db"], progress=False)
    ids = 10_000 + np.random.default_rng(0).permutation(NB).astype(np.int64) * 7
    mapped = _fresh(env)
    mapped.add(env["x_db"][:100], progress=False)                   # default ids: rows 0..99
    mapped.add(env["x_db"][100:], ids=ids[100:], progress=False)
    np.testing.assert_array_equal(mapped.ids, np.concatenate([np.arange(100), ids[100:]]))
    for p in SETTINGS:
        d0, i0 = plain.search(env["queries"], 10, SearchParams(**p))
        d1, i1 = mapped.search(env["queries"], 10, SearchParams(**p))
        np.testing.assert_array_equal(d0, d1)
        np.testing.assert_array_equal(i1, np.where(i0 >= 0, mapped.ids[np.maximum(i0, 0)], -1))
    params = SearchParams(nprobe=1, quantizer_efSearch=16, nshort=NB)     # one list: fewer than NB results
    (d0, i0), (d1, i1) = plain.search(env["queries"], NB, params), mapped.search(env["queries"], NB, params)
    assert (i0 == -1).any() and ((i0 == -1) == (i1 == -1)).all() and np.isinf(d1[i1 == -1]).all()
    np.testing.assert_array_equal(i1, np.where(i0 >= 0, mapped.ids[np.maximum(i0, 0)], -1))


def test_save_load_round_trip(env, tmp_path):
    index = _fresh(env, pairwise=PairwiseDecoder(K=K, ivf_subcode_levels=1, n_pairs_per_step=1))
    index.add(env["x_db"][:200], ids=np.arange(200) * 3, progress=False)
    path = tmp_path / "ix"
    index.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["codes.npy", "ids.npy", "index.json", "model.pt",
                                                      "pairwise.pt", "shortlist.faissindex",
                                                      "shortlist.faissindex.json"]
    for loaded in (IVFQincoIndex.load(path), IVFQincoIndex.load(path, env["codec"])):
        assert (loaded.ntotal, loaded.metric, repr(loaded)) == (200, "l2", repr(index))
        _same_results(index, loaded, env["queries"], SETTINGS + [dict(FULL, nshort=20, nmid_short=4)])
    # adding after loading (the memory-mapped codes are copied) equals adding before saving
    loaded = IVFQincoIndex.load(path)
    for ix in (index, loaded):
        ix.add(env["x_db"][200:], progress=False)
    _same_results(index, loaded, env["queries"])
    np.testing.assert_array_equal(loaded.ids, np.concatenate([np.arange(200) * 3, np.arange(200, NB)]))
    loaded.save(path)                                    # over its own memory-mapped files
    _same_results(index, IVFQincoIndex.load(path), env["queries"])


def test_another_model_is_refused(env, tmp_path):
    other = _codec(env["x_train"], env["x_val"], env["centroids"], seed=1)
    path = tmp_path / "ix"
    env["index"].save(path)
    with pytest.raises(InputError, match="built with model .* codec given is model"):
        IVFQincoIndex.load(path, other)
    encode_to_file(other, env["x_db"][:20], tmp_path / "other.npy", progress=False)
    with pytest.raises(InputError, match="come from model"):
        _fresh(env).add_codes(load_encoded(tmp_path / "other.npy"), progress=False)
    with pytest.raises(InputError, match="come from model"):
        _fresh(env).train(env["x_train"][:20], train_codes=load_encoded(tmp_path / "other.npy"), progress=False)


def test_ntotal_reset_and_empty_search(env):
    index = _fresh(env)
    assert index.ntotal == 0 and index.is_trained
    dist, ids = index.search(env["queries"], 5)
    assert (ids == -1).all() and np.isinf(dist).all()
    index.add(env["x_db"][:50], progress=False)
    assert index.ntotal == 50 and index.shortlist_.ntotal == 50
    with pytest.raises(InputError, match="reset"):
        index.train(env["x_train"], progress=False)
    index.reset()
    assert index.ntotal == 0 == index.shortlist_.ntotal


def _reference(q_QD, xhat_ND, metric):
    """Similarities of every query to every decoded vector, one pair at a time (slow, obvious)."""
    out = np.empty((len(q_QD), len(xhat_ND)))
    for i, q in enumerate(q_QD):
        for j, x in enumerate(xhat_ND):
            dot = float(np.dot(q.astype(np.float64), x.astype(np.float64)))
            out[i, j] = dot if metric == "ip" else dot / (np.linalg.norm(q) * np.linalg.norm(x))
    return out


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_ip_and_cosine_rank_as_brute_force_over_decoded_vectors(env, metric):
    index = _fresh(env, metric)
    index.add(env["x_db"], progress=False)
    x_db, q = env["x_db"], env["queries"]
    if metric == "cosine":
        x_db = x_db / np.linalg.norm(x_db, axis=1, keepdims=True)
    xhat = env["codec"].decode(env["codec"].encode(x_db))
    sim = _reference(q, xhat, metric)
    dist, ids = index.search(q, 10, SearchParams(**FULL))
    np.testing.assert_allclose(dist, np.take_along_axis(sim, ids, 1), rtol=1e-5, atol=1e-5)   # float32 sums
    # the ids reach the 10 best similarities in order: the brute-force ranking, up to ties (rows
    # with equal codes decode to equal vectors)
    np.testing.assert_allclose(dist, -np.sort(-sim, 1)[:, :10], rtol=1e-5, atol=1e-5)
    assert len(set(ids.ravel().tolist())) > 10 and (ids >= 0).all()
    assert index.shortlist_.metric_type == (faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2)


def test_ip_shortlist_scores_additive_reconstructions(env):
    """nshort=1 decodes nothing: D is faiss' inner product with c + sum_m T_m[i_m]."""
    index = _fresh(env, "ip")
    index.add(env["x_db"], progress=False)
    dist, ids = index.search(env["queries"], 1, SearchParams(nprobe=C, quantizer_efSearch=16, nshort=1))
    codes = np.asarray(index.codes)
    approx = index.ivf_centroids[codes[:, 0]] + additive_decode(codes[:, 1:], aq_tables(index.shortlist_))
    scores = env["queries"] @ approx.T
    np.testing.assert_allclose(dist[:, 0], scores.max(1), rtol=1e-4, atol=1e-4)   # float32 LUT sums


def test_errors_say_how_to_fix(env, make_codec, tmp_path):
    index = IVFQincoIndex(env["codec"])
    with pytest.raises(NotTrainedError, match="index.train"):
        index.search(env["queries"], 5)
    with pytest.raises(NotTrainedError, match="index.train"):
        index.add(env["x_db"])
    with pytest.raises(NotTrainedError, match="index.train"):
        index.save("unused")
    with pytest.raises(InputError, match="dimension 4 but the codec was trained on D=8"):
        index.train(env["x_train"][:, :4])
    trained = env["index"]
    with pytest.raises(InputError, match="queries has dimension 4 but the index has d=8"):
        trained.search(env["queries"][:, :4], 5)
    with pytest.raises(InputError, match="x has dimension 4"):
        _fresh(env).add(env["x_db"][:, :4])
    with pytest.raises(InputError, match="code_size=3 bytes per vector"):
        _fresh(env).add_codes(np.zeros((3, 7), np.uint8))
    bad = env["codec"].encode(env["x_db"][:5])
    bad[2, 0] = C
    with pytest.raises(InputError, match="values must lie in"):
        _fresh(env).add_codes(bad)
    with pytest.raises(InputError, match="one id per vector"):
        _fresh(env).add(env["x_db"][:5], ids=np.arange(4))
    with pytest.raises(InputError, match="-1 marks a missing result"):
        _fresh(env).add(env["x_db"][:5], ids=-np.ones(5, np.int64))
    with pytest.raises(InputError, match="ivf_centroids"):
        IVFQincoIndex(make_codec(K=256))                   # a codec without IVF
    with pytest.raises(ConfigError, match="metric"):
        IVFQincoIndex(env["codec"], metric="hamming")
    with pytest.raises(InputError, match="k must be"):
        trained.search(env["queries"], 0)
    with pytest.raises(DatasetError, match="not a saved IVFQincoIndex"):
        IVFQincoIndex.load(tmp_path)


def test_cli_search_takes_a_saved_index_folder(env, tmp_path):
    path = tmp_path / "ix"
    env["index"].save(path)
    gt = knn(env["queries"], env["codec"].decode(np.asarray(env["index"].codes)), 1)
    grid = {"nprobe": [2, 64], "quantizer_efSearch": [16], "nshort": [10, 50], "nmid_short": [0, 4]}
    r = search_index(env["codec"], path, None, env["queries"], gt, grid=grid, progress=False)
    assert r["n_db"] == NB and r["metric"] == "l2" and r["n_runs"] >= 1
    assert max(p["R@1"] for p in r["pareto"]) == 1.0      # all lists, 50 re-ranked: the decoded nearest


def test_cli_search_with_a_saved_index_folder(env, tmp_path, capsys):
    from conftest import run_cli

    path = tmp_path / "ix"
    env["index"].save(path)
    files = {"q": tmp_path / "q.fvecs", "gt": tmp_path / "gt.ivecs"}
    qinco2.write_vectors(files["q"], env["queries"])
    qinco2.write_vectors(files["gt"], knn(env["queries"], env["x_db"], 1).astype(np.int32))
    argv = ["task=search", f"model={path / 'model.pt'}", f"index={path}", f"queries={files['q']}",
            f"queries_gt={files['gt']}", "nprobe=[2,8]", "quantizer_efSearch=16", "nshort=[10,50]",
            "cpu=true", "verbose=false"]
    rc, out, err, r = run_cli(capsys, *argv)
    assert rc == 0, err
    assert (r["n_db"], r["n_queries"], r["metric"]) == (NB, NQ, "l2") and "R@1" in out
    rc, _, err, _ = run_cli(capsys, *argv, "metric=ip")
    assert rc == 2 and "ranks by l2" in err and "IVFQincoIndex(codec, metric='ip')" in err


def test_exported_from_the_package():
    assert qinco2.IVFQincoIndex is IVFQincoIndex and "IVFQincoIndex" in qinco2.__all__


def test_torch_tensors_in_and_out(env):
    """Tensors wherever arrays are accepted; search answers with tensors."""
    x_db = env["x_db"]
    from_tensors = _fresh(env)
    from_tensors.add(torch.from_numpy(x_db), ids=torch.arange(len(x_db)) + 7, progress=False)
    from_arrays = _fresh(env)
    from_arrays.add(x_db, ids=np.arange(len(x_db)) + 7, progress=False)
    d_t, i_t = from_tensors.search(torch.from_numpy(env["queries"]), 5)
    d, i = from_arrays.search(env["queries"], 5)
    assert isinstance(i_t, torch.Tensor) and isinstance(d_t, torch.Tensor)
    np.testing.assert_array_equal(i_t.numpy(), i)
    np.testing.assert_array_equal(d_t.numpy(), d)
