"""Tests of qinco2.ivfsearch.shortlist: the faiss IVF-AQ index built from QINCo2 codes (spec 8.4-8.5)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from qinco2.codec.codec import QincoCodec
from qinco2.errors import DatasetError, InputError
from qinco2.ivf import train_ivf_centroids
from qinco2.ivfsearch.aq import additive_decode
from qinco2.ivfsearch.shortlist import (
    add_codes,
    build_index,
    encode_norms,
    factory_string,
    fit_aq_tables,
    list_prefix,
    load_index,
    make_empty_index,
    reconstruction_norms,
    save_index,
    sidecar_path,
    standalone_codes,
)

C, D, M, K = 8, 8, 2, 256


@pytest.fixture(scope="module")
def ivf_setup(clustered):
    """A tiny IVF QINCo2 codec (K=256, as the RQ{M}x8 index needs), its codes and data."""
    x = clustered(2800, D=D, C=C, seed=3)
    x_train, x_val, x_db, x_q = x[:1800], x[1800:2000], x[2000:2400], x[2400:2440]
    centroids = train_ivf_centroids(x_train, C, progress=False)
    codec = QincoCodec.from_preset("qinco2-S", M=M, K=K, L=1, de=8, dh=16, A=8, B=4, batch=256, epochs=2,
                                   ramp_epochs=1, lr=3e-3, max_epochs=2, seed=0)
    codec.train(x_train, x_val, ivf_centroids=centroids, progress=False)
    return dict(codec=codec, centroids=centroids, x_train=x_train, train_codes=codec.encode(x_train),
                x_db=x_db, db_codes=codec.encode(x_db), queries=x_q)


@pytest.fixture(scope="module")
def built(ivf_setup):
    s = ivf_setup
    return build_index(s["centroids"], s["train_codes"], s["x_train"], s["db_codes"], progress=False)


def _invlists(index):
    """{list: (ids, codes (n, code_size))} of a faiss IVF index."""
    out = {}
    for li in range(index.nlist):
        n = index.invlists.list_size(li)
        ids = faiss.rev_swig_ptr(index.invlists.get_ids(li), n).copy() if n else np.zeros(0, np.int64)
        codes = (faiss.rev_swig_ptr(index.invlists.get_codes(li), n * index.code_size).copy()
                 if n else np.zeros(0, np.uint8))
        out[li] = (ids, codes.reshape(n, index.code_size))
    return out


def test_factory_string_gives_ivf_rq_with_hnsw_quantizer():
    index = faiss.index_factory(D, factory_string(C, M))
    assert factory_string(C, M) == "IVF8_HNSW32,RQ2x8_Nqint8"
    assert isinstance(index, faiss.IndexIVFResidualQuantizer) and index.by_residual
    assert isinstance(faiss.downcast_index(index.quantizer), faiss.IndexHNSW)
    assert index.nlist == C and index.code_size == M + 1 and index.coarse_code_size() == 1
    assert index.rq.search_type == faiss.AdditiveQuantizer.ST_norm_qint8 and index.rq.norm_bits == 8


def test_norm_bytes_match_faiss_encode_norm():
    rng = np.random.default_rng(0)
    index = make_empty_index(rng.normal(size=(C, D)).astype(np.float32),
                             rng.normal(size=(M, K, D)).astype(np.float32), 1.5, 40.0)
    edges = 1.5 + (40.0 - 1.5) * np.arange(257) / 256          # cell boundaries, and around them
    values = np.concatenate([np.linspace(-5, 50, 2001), edges, np.nextafter(edges.astype(np.float32), -np.inf),
                             np.nextafter(edges.astype(np.float32), np.inf)]).astype(np.float32)
    ours = encode_norms(values, index.rq.norm_min, index.rq.norm_max)
    theirs = np.array([index.rq.encode_norm(float(v)) for v in values])
    np.testing.assert_array_equal(ours, theirs)


def test_packer_reproduces_faiss_bytes_and_lists():
    """faiss encodes vectors with our tables (its own RQ beam search); given faiss' codes, our
    packer gives faiss' bytes, and adding them with ours fills identical inverted lists."""
    rng = np.random.default_rng(1)
    centroids = 3 * rng.normal(size=(C, D)).astype(np.float32)
    T_MKD = rng.normal(size=(M, K, D)).astype(np.float32)
    x = (centroids[rng.integers(0, C, 300)] + 1.5 * rng.normal(size=(300, D))).astype(np.float32)
    theirs = make_empty_index(centroids, T_MKD, 8.0, 25.0)    # range clips some norms, on purpose
    sa = theirs.sa_encode(x)
    list_nos, codes = sa[:, 0].astype(np.int64), sa[:, 1:1 + M].astype(np.int32)
    norm_bytes = encode_norms(reconstruction_norms(codes, T_MKD), 8.0, 25.0)
    assert {0, 255} <= set(norm_bytes.tolist())                # both clipped ends are exercised
    ours = standalone_codes(list_nos, codes, norm_bytes, 1)
    np.testing.assert_array_equal(ours, sa)
    theirs.add(x)
    mine = make_empty_index(centroids, T_MKD, 8.0, 25.0)
    add_codes(mine, T_MKD, np.concatenate([list_nos[:, None], codes], 1).astype(np.int32), progress=False)
    assert mine.ntotal == theirs.ntotal == len(x)
    a, b = _invlists(theirs), _invlists(mine)
    for li in range(C):
        np.testing.assert_array_equal(a[li][0], b[li][0])
        np.testing.assert_array_equal(a[li][1], b[li][1])


def test_list_prefix_is_little_endian_listno():
    index = faiss.index_factory(D, factory_string(300, M))
    assert index.coarse_code_size() == 2
    np.testing.assert_array_equal(list_prefix(np.array([0, 1, 258, 299]), 2),
                                  [[0, 0], [1, 0], [2, 1], [43, 1]])


def test_index_holds_centroids_tables_and_our_codes(ivf_setup, built):
    s = ivf_setup
    quantizer = faiss.downcast_index(built.quantizer)
    assert quantizer.ntotal == C and quantizer.hnsw.efConstruction == 20
    np.testing.assert_array_equal(quantizer.reconstruct_n(0, C), s["centroids"])
    T_MKD, norms = fit_aq_tables(s["centroids"], s["train_codes"], s["x_train"])
    assert built.rq.norm_min == pytest.approx(norms.min()) and built.rq.norm_max == pytest.approx(norms.max())
    np.testing.assert_array_equal(faiss.vector_to_array(built.rq.codebooks), T_MKD.ravel())
    db = s["db_codes"]
    assert built.ntotal == len(db)
    expected = s["centroids"][db[:, 0]] + additive_decode(db[:, 1:], T_MKD)
    seen = np.zeros(len(db), bool)
    out = np.empty(D, np.float32)
    for li, (ids, codes) in _invlists(built).items():
        assert (db[ids, 0] == li).all() and (np.diff(ids) > 0).all()   # ids are db rows, in order
        np.testing.assert_array_equal(codes[:, :M], db[ids, 1:])
        for offset, i in enumerate(ids):
            built.reconstruct_from_offset(li, offset, faiss.swig_ptr(out))
            np.testing.assert_allclose(out, expected[i], rtol=1e-5, atol=1e-5)   # float32 sums
        seen[ids] = True
    assert seen.all()


def test_full_probe_search_matches_brute_force_on_aq_reconstructions(ivf_setup, built):
    s = ivf_setup
    db, q = s["db_codes"], s["queries"]
    T_MKD, _ = fit_aq_tables(s["centroids"], s["train_codes"], s["x_train"])
    c_ND, r_ND = s["centroids"][db[:, 0]], additive_decode(db[:, 1:], T_MKD)
    params = faiss.SearchParametersIVF(nprobe=C, quantizer_params=faiss.SearchParametersHNSW(efSearch=16))
    dist, ids = built.search(q, len(db), params=params)
    assert (ids >= 0).all() and (np.sort(ids, 1) == np.arange(len(db))).all()
    # faiss' distance: ||q - c||^2 - 2 <q - c, r> + (norm byte decoded at its cell centre)
    rq = built.rq
    cell = (rq.norm_max - rq.norm_min) / 256
    norm_bytes = encode_norms(reconstruction_norms(db[:, 1:], T_MKD), rq.norm_min, rq.norm_max)
    deq = (norm_bytes + 0.5) * cell + rq.norm_min
    qc = q[:, None] - c_ND[None]
    model = (qc ** 2).sum(-1) - 2 * (qc * r_ND[None]).sum(-1) + deq[None]
    np.testing.assert_allclose(dist, np.take_along_axis(model, ids, 1), rtol=1e-4, atol=1e-3)  # float32
    assert (ids[:, 0] == model.argmin(1)).all()
    # against the exact AQ reconstructions, the top-1 is off by at most the norm quantisation
    exact = ((q[:, None] - (c_ND + r_ND)[None]) ** 2).sum(-1)
    top1 = exact[np.arange(len(q)), ids[:, 0]]
    assert (top1 <= exact.min(1) + cell + 1e-3).all()
    clear = np.sort(exact, 1)[:, 1] - exact.min(1) > cell + 1e-3      # no near-tie: same top-1
    assert clear.sum() >= len(q) // 4 and (ids[clear, 0] == exact[clear].argmin(1)).all()


def test_save_load_checks_model_and_database(tmp_path, ivf_setup, built):
    path = tmp_path / "sub" / "ix.faissindex"
    save_index(built, path, model_sha="abc123")
    assert path.is_file() and sidecar_path(path).is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["ix.faissindex", "ix.faissindex.json"]
    loaded = load_index(path, model_sha="abc123", n_db=len(ivf_setup["db_codes"]))
    q = ivf_setup["queries"]
    params = faiss.SearchParametersIVF(nprobe=C)
    np.testing.assert_array_equal(loaded.search(q, 5, params=params)[1], built.search(q, 5, params=params)[1])
    with pytest.raises(InputError, match="task=build_index"):
        load_index(path, model_sha="other")
    with pytest.raises(InputError, match="database has 7"):
        load_index(path, n_db=7)
    with pytest.raises(DatasetError, match="does not exist"):
        load_index(tmp_path / "missing.faissindex")
    (tmp_path / "junk.faissindex").write_bytes(b"not an index")
    with pytest.raises(DatasetError, match="cannot read"):
        load_index(tmp_path / "junk.faissindex")


def test_build_index_rejects_bad_inputs(ivf_setup):
    s = ivf_setup
    args = (s["centroids"], s["train_codes"], s["x_train"], s["db_codes"])
    with pytest.raises(InputError, match="K must be 256"):
        build_index(*args, K=16, progress=False)
    bad = s["db_codes"].copy()
    bad[0, 0] = C
    with pytest.raises(InputError, match="IVF ids"):
        build_index(*args[:3], bad, progress=False)
    with pytest.raises(InputError, match="1\\+M columns"):
        build_index(*args[:3], s["db_codes"][:, :2], progress=False)
    with pytest.raises(InputError, match="x_train_raw"):
        build_index(s["centroids"], s["train_codes"], s["x_train"][:10], s["db_codes"], progress=False)
