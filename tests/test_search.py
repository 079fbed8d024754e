"""Tests of qinco2.ivfsearch.multistage: the multi-stage pipeline, the pruned sweep, its log, Pareto fronts."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qinco2.ivfsearch.multistage as search_mod
from qinco2.codec.codec import QincoCodec
from qinco2.errors import ConfigError, InputError
from qinco2.ivf import train_ivf_centroids
from qinco2.ivfsearch.multistage import (
    SearchParams,
    is_pruned,
    log2_distance,
    multistage_search,
    order_points,
    pareto_front,
    plot_pareto,
    sweep,
)
from qinco2.ivfsearch.pairwise import PairwiseDecoder
from qinco2.ivfsearch.shortlist import build_index
from qinco2.metrics import knn, recall_at

C, D, M, K = 8, 8, 2, 256
NB, NQ = 400, 30


@pytest.fixture(scope="module")
def env(clustered):
    """Tiny IVF QINCo2 codec (K=256), its faiss index, a pairwise decoder and queries whose
    ground truth is the nearest *decoded* database vector (so that re-ranking a longer
    shortlist can never lose it)."""
    x = clustered(2830, D=D, C=C, seed=4)
    x_train, x_val, x_db, x_q = x[:1800], x[1800:2000], x[2000:2000 + NB], x[2000 + NB:2000 + NB + NQ]
    centroids = train_ivf_centroids(x_train, C, progress=False)
    codec = QincoCodec.from_preset("qinco2-S", M=M, K=K, L=1, de=8, dh=16, A=8, B=4, batch=256, epochs=2,
                                   ramp_epochs=1, lr=3e-3, max_epochs=2, seed=0)
    codec.train(x_train, x_val, ivf_centroids=centroids, progress=False)
    train_codes, db_codes = codec.encode(x_train), codec.encode(x_db)
    index = build_index(centroids, train_codes, x_train, db_codes, progress=False)
    pairwise = PairwiseDecoder(K=K, ivf_subcode_levels=1).train(train_codes, x_train, centroids, progress=False)
    decoded = codec.decode(db_codes)
    return dict(codec=codec, index=index, db_codes=db_codes, queries=x_q, pairwise=pairwise,
                decoded=decoded, gt=knn(x_q, decoded, 1)[:, 0])


def _search(env, pairwise=False, **params):
    return multistage_search(env["index"], env["codec"], env["db_codes"], env["queries"],
                             SearchParams(**params), pairwise=env["pairwise"] if pairwise else None,
                             gt=env["gt"])


def test_search_params_validation_and_n1():
    assert SearchParams(nshort=10, nmid_short=0).n1 == 10
    assert SearchParams(nshort=10, nmid_short=4).n1 == 40
    assert SearchParams(nshort=3000, nmid_short=4).n1 == 8000
    for bad in (dict(nprobe=0), dict(nshort=0), dict(nmid_short=-1), dict(quantizer_efSearch=1.5)):
        with pytest.raises(ConfigError):
            SearchParams(**bad).validated()


@pytest.mark.parametrize("pairwise", [False, True])
def test_full_probe_long_shortlist_equals_exhaustive_decoded_search(env, pairwise):
    ids, stats = _search(env, pairwise, nprobe=C, quantizer_efSearch=16, nshort=NB, nmid_short=2)
    assert ids.shape == (NQ, 100) and ids.dtype == np.int64
    # the same neighbours as exhaustive search, compared by distance: database rows with equal
    # codes decode to equal vectors, and such ties may come in either order
    q, dec = env["queries"], env["decoded"]
    dist = lambda ids_QS: ((dec[ids_QS] - q[:, None]) ** 2).sum(-1)  # noqa: E731
    np.testing.assert_allclose(dist(ids[:, :1])[:, 0], dist(env["gt"][:, None])[:, 0], rtol=1e-6)
    np.testing.assert_allclose(dist(ids[:, :10]), dist(knn(q, dec, 10)), rtol=1e-6)
    assert stats["t_mid_rerank"] > 0 if pairwise else stats["t_mid_rerank"] == 0
    assert stats["t_total"] == pytest.approx(sum(stats[t] for t in search_mod.TIMERS))


def test_shortlist_stage_runs_the_table_scan_with_faiss_results(env, monkeypatch):
    """The first stage is the per-query-table scan (one call per search), and the pipeline's
    results equal those with faiss's own scan of the index."""
    from qinco2.ivfsearch import shortlist_scan
    calls = []
    for cls in (shortlist_scan.NativeScan, shortlist_scan.ShortlistScan):   # whichever this machine builds
        monkeypatch.setattr(cls, "search",
                            lambda self, *a, real=cls.search, **kw: calls.append(1) or real(self, *a, **kw))
    fast = [_search(env, pairwise, nprobe=2, quantizer_efSearch=16, nshort=10, nmid_short=2)[0]
            for pairwise in (False, True)]
    assert len(calls) == 2
    monkeypatch.setattr(shortlist_scan, "scanner", lambda index: None)
    slow = [_search(env, pairwise, nprobe=2, quantizer_efSearch=16, nshort=10, nmid_short=2)[0]
            for pairwise in (False, True)]
    assert len(calls) == 2
    for a, b in zip(fast, slow):
        assert (a == b).mean() > 0.99          # float32 sums grouped differently: rare swaps of near-ties


def test_recall_never_drops_as_nshort_grows(env):
    curves = []
    for nshort in (1, 2, 4, 10, 50, 200):
        ids, stats = _search(env, nprobe=C, quantizer_efSearch=16, nshort=nshort)
        curves.append([recall_at(ids, env["gt"])[k] for k in (1, 10, 100)])
        assert min(stats[t] for t in search_mod.TIMERS) >= 0
    curves = np.array(curves)
    assert (np.diff(curves, axis=0) >= 0).all()
    assert curves[-1, 0] == 1.0 and curves[0, 0] < 1.0


def test_nshort_one_skips_decoding_and_pads(env):
    ids, stats = _search(env, nprobe=2, quantizer_efSearch=4, nshort=1)
    assert stats["t_decode"] == stats["t_rerank"] == 0
    assert (ids[:, 1:] == -1).all() and (ids[:, 0] >= 0).all()
    assert stats["recalls_before_rerank"]["1"] == recall_at(ids, env["gt"])[1]


def test_missing_candidates_come_back_as_minus_one(env):
    ids, _ = _search(env, nprobe=1, quantizer_efSearch=16, nshort=NB)   # one list < NB vectors
    valid = ids >= 0
    assert not valid.all() and valid[:, 0].all()
    assert (valid[:, :-1] >= valid[:, 1:]).all()          # the valid ids come first
    assert all(len(set(row[row >= 0])) == (row >= 0).sum() for row in ids)


def test_search_rejects_mismatched_inputs(env):
    with pytest.raises(InputError, match="db_codes has"):
        multistage_search(env["index"], env["codec"], env["db_codes"][:-1], env["queries"], SearchParams())
    with pytest.raises(InputError, match="queries"):
        multistage_search(env["index"], env["codec"], env["db_codes"], env["queries"][:, :4], SearchParams())


def _run(p, recall, t):
    names = ("nprobe", "quantizer_efSearch", "nshort", "nmid_short")
    return {"parameters": dict(zip(names, p)), "recalls": {"1": recall, "10": recall, "100": recall},
            "t_total": t, "n_queries": 10, "qps": 10 / t}


def test_pruning_bounds():
    runs = [_run((1, 1, 1, 0), 0.5, 1.0), _run((4, 1, 1, 0), 0.9, 2.0)]
    assert not is_pruned((2, 1, 1, 0), runs)        # could reach 0.9 faster than 2.0
    runs = [_run((1, 1, 1, 0), 0.5, 1.0), _run((4, 1, 1, 0), 0.5, 2.0)]
    assert is_pruned((2, 1, 1, 0), runs)            # at most 0.5, at least 1.0 s: no better than (1,1,1,0)
    assert not is_pruned((8, 1, 1, 0), runs)        # nothing dominates it: its recall is unbounded
    runs = [_run((1, 1, 1, 0), 1.0, 1.0)]
    assert is_pruned((8, 1, 1, 0), runs)            # recall saturated by a faster setting


def test_order_points_starts_near_known_good():
    points = [(4096, 1, 1, 0), (16, 64, 50, 4), (1, 4096, 2000, 16)]
    assert order_points(points)[0] == (16, 64, 50, 4)
    assert log2_distance((0, 1, 4, 8), (1, 1, 1, 1)) == 5


def test_sweep_logs_and_resumes(env, tmp_path, monkeypatch):
    grid = {"nprobe": [1, 2, 8], "quantizer_efSearch": [16], "nshort": [1, 10, 100], "nmid_short": [0, 2]}
    log_path = tmp_path / "logs" / "search.json"
    args = (env["index"], env["codec"], env["db_codes"], env["queries"], env["gt"], grid)
    runs = sweep(*args, pairwise=env["pairwise"], log_path=log_path, progress=False, threads=1)
    content = json.loads(log_path.read_text())
    assert content["runs"] == json.loads(json.dumps(runs)) and 1 <= len(runs) <= 18
    assert not [p for p in log_path.parent.iterdir() if p.name != "search.json"]   # no temp files
    for run in runs:
        assert set(run["recalls"]) == set(run["recalls_before_rerank"]) == {"1", "10", "100"}
        assert run["t_total"] == pytest.approx(sum(run[t] for t in search_mod.TIMERS))
        assert run["n_queries"] == NQ and run["qps"] > 0
    keys = [tuple(r["parameters"].values()) for r in runs]
    assert len(set(keys)) == len(keys)
    calls = []
    real = search_mod.multistage_search
    monkeypatch.setattr(search_mod, "multistage_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = sweep(*args, pairwise=env["pairwise"], log_path=log_path, resume=True, progress=False)
    assert calls == [] and again == content["runs"]
    # without a pairwise decoder the middle stage is never explored
    plain = sweep(*args, progress=False)
    assert {r["parameters"]["nmid_short"] for r in plain} == {0} and calls


def test_sweep_rejects_unknown_grid_names(env):
    with pytest.raises(ConfigError, match="unknown search parameter"):
        sweep(env["index"], env["codec"], env["db_codes"], env["queries"], env["gt"], {"nlist": [1]},
              progress=False)


def test_pareto_front_is_non_dominated():
    rng = np.random.default_rng(0)
    runs = [_run((i, 1, 1, 0), float(rng.uniform()), float(rng.uniform(0.1, 2))) for i in range(1, 60)]
    front = pareto_front(runs)

    def dominates(a, b):
        return (a["recalls"]["1"] >= b["recalls"]["1"] and a["qps"] >= b["qps"]
                and (a["recalls"]["1"] > b["recalls"]["1"] or a["qps"] > b["qps"]))

    assert front and all(not dominates(r, f) for f in front for r in runs)
    assert all(any(dominates(f, r) for f in front) for r in runs if r not in front)
    assert [f["recalls"]["1"] for f in front] == sorted(f["recalls"]["1"] for f in front)


def test_plot_pareto_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    ours = [_run((1, 1, 1, 0), 0.3, 0.1), _run((2, 1, 1, 0), 0.6, 0.3)]
    baseline = [{"recalls": {"1": 0.4}, "t_total": 0.2, "n_queries": 10}]
    path = tmp_path / "pareto.png"
    plot_pareto({"IVF-QINCo2": ours, "faiss IVF-PQ": baseline}, path, title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]


def test_bf16_decoding_in_the_rerank(env, monkeypatch):
    """``decode_precision`` reaches the codec's decoder; bf16 re-ranks to (nearly) the same ids."""
    seen = []
    real = env["codec"].decode
    monkeypatch.setattr(env["codec"], "decode", lambda codes, **kw: seen.append(kw) or real(codes, **kw))
    params = SearchParams(nprobe=C, quantizer_efSearch=16, nshort=50)
    fp32, _ = multistage_search(env["index"], env["codec"], env["db_codes"], env["queries"], params)
    bf16, _ = multistage_search(env["index"], env["codec"], env["db_codes"], env["queries"], params,
                                decode_precision="bf16")
    assert [kw["precision"] for kw in seen] == ["fp32", "bf16"]
    assert (fp32[:, :10] == bf16[:, :10]).mean() > 0.9       # near-ties may swap
