"""Evaluation helpers on tiny data: MSE and code usage, prefixes, exhaustive search, the RQ
baseline and a shrunken demo run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qinco2 import InputError, QincoCodec
from qinco2.codec.evaluate import (
    compare_with_rq,
    evaluate_codec,
    evaluate_mse,
    evaluate_prefixes,
    evaluate_search,
    run_demo,
)
from qinco2.metrics import knn, mse

# de=None (= D): no random projections at initialisation, so every step starts as an RQ step
# and the prefix MSEs decrease.
TINY = dict(M=3, K=16, L=1, de=None, dh=16, A=4, B=4, batch=256, lr=3e-3, epochs=2,
            ramp_epochs=1, max_epochs=2, loop=2_000)


def _blobs(n: int, D: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (12, D))
    noise = rng.normal(0.0, 1.0, (n, D)) * np.linspace(2.0, 0.1, D)  # anisotropic: RQ steps help
    return (centres[rng.integers(0, 12, n)] + noise).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = _blobs(2900)
    return {"train": x[:2000], "val": x[2000:2300], "db": x[2300:2800], "queries": x[2800:]}


@pytest.fixture(scope="module")
def codec(data):
    return QincoCodec.from_preset("qinco2-S", **TINY).train(data["train"], data["val"],
                                                            progress=False)


def test_evaluate_mse_matches_encode_decode(codec, data):
    x = data["db"]
    r = evaluate_mse(codec, x, mse_scale=0.5, batch=64)
    expected = mse(x, codec.decode(codec.encode(x)), scale=0.5)
    assert r["n"] == len(x)
    assert r["mse"] == pytest.approx(expected, rel=1e-5)  # float32 sums in another order
    assert len(r["code_usage"]) == len(r["entropy_bits"]) == codec.n_codes
    assert all(0 < u <= 1 for u in r["code_usage"])
    assert all(0 <= h <= math.log2(16) + 1e-9 for h in r["entropy_bits"])


def test_evaluate_mse_does_not_depend_on_batch(codec, data):
    a = evaluate_mse(codec, data["db"], batch=37)
    b = evaluate_mse(codec, data["db"], batch=10_000)
    assert a["mse"] == pytest.approx(b["mse"], rel=1e-5)
    assert a["code_usage"] == b["code_usage"]


def test_prefixes_end_at_the_full_code_mse(codec, data):
    x = data["db"]
    prefixes = evaluate_prefixes(codec, x, mse_scale=2.0)
    full = evaluate_mse(codec, x, mse_scale=2.0, prefixes=True)
    assert len(prefixes) == codec.n_codes
    assert full["prefix_mse"] == pytest.approx(prefixes, rel=1e-6)
    assert prefixes[-1] == pytest.approx(full["mse"], rel=1e-6)
    assert prefixes[0] > prefixes[-1]  # one code of 16 cannot match three


def test_evaluate_search_recall(codec, data):
    db, queries = data["db"], data["queries"]
    gt = knn(queries, db, 1)
    r = evaluate_search(codec, db, queries, gt, ks=(1, 10, len(db)), batch=128)
    assert r["n_db"] == len(db) and r["n_queries"] == len(queries)
    assert 0 <= r["R@1"] <= r["R@10"] <= r[f"R@{len(db)}"] == 1.0


def _recall_ref(queries, xhat, gt, ks, metric):
    """Slow obvious R@k: numpy scores over the decoded vectors, best first (ties by lower id)."""
    q, x = queries.astype(np.float64), xhat.astype(np.float64)
    score = q @ x.T if metric == "ip" else -((q[:, None, :] - x[None]) ** 2).sum(-1)
    ids = np.argsort(-score, axis=1, kind="stable")
    return {f"R@{k}": float((ids[:, :k] == gt[:, :1]).any(1).mean()) for k in ks}


def test_evaluate_search_by_inner_product(codec, data):
    db, queries = data["db"], data["queries"]
    _, first = np.unique(codec.encode(db), axis=0, return_index=True)
    db = db[np.sort(first)]  # distinct codes: no tied decoded vectors, the ranking is unique
    xhat = codec.decode(codec.encode(db))
    assert np.ptp(np.linalg.norm(xhat, axis=1)) > 1.0  # decoded norms vary: ip and l2 differ
    gt = knn(queries, db, 1, metric="ip")  # true neighbours by inner product
    ks = (1, 5, 20)
    r_ip = evaluate_search(codec, db, queries, gt, ks=ks, metric="ip", batch=128)
    r_l2 = evaluate_search(codec, db, queries, gt, ks=ks, metric="l2", batch=128)
    assert (r_ip["metric"], r_l2["metric"]) == ("ip", "l2")
    for r, metric in ((r_ip, "ip"), (r_l2, "l2")):
        assert {k: r[k] for k in r if k.startswith("R@")} == _recall_ref(queries, xhat, gt, ks,
                                                                        metric)
    assert r_ip["R@1"] != r_l2["R@1"]
    with pytest.raises(InputError, match="'ip'"):
        evaluate_search(codec, db, queries, gt, metric="inner_product")


def test_evaluate_codec_is_mse_and_search_in_one_pass(codec, data):
    db, queries = data["db"], data["queries"]
    gt = knn(queries, db, 1)
    both = evaluate_codec(codec, db, 0.5, queries, gt, metric="ip", batch=64)
    mse_only = evaluate_mse(codec, db, 0.5, prefixes=True)
    search = evaluate_search(codec, db, queries, gt, metric="ip")
    assert both["mse"] == pytest.approx(mse_only["mse"], rel=1e-6)
    assert both["prefix_mse"] == pytest.approx(mse_only["prefix_mse"], rel=1e-6)
    assert {k: both[k] for k in search} == search
    assert "R@1" not in evaluate_codec(codec, db, 0.5)  # no queries: MSE fields only


def test_compare_with_rq(data):
    gt = knn(data["queries"], data["db"], 1)
    r = compare_with_rq(data["train"], data["db"], data["queries"], gt, M=2, K=16, mse_scale=1.0)
    assert r["mse"] > 0
    assert 0 <= r["R@1"] <= r["R@10"] <= r["R@100"] <= 1
    mean_only = mse(data["db"], np.broadcast_to(data["train"].mean(0), data["db"].shape))
    assert r["mse"] < 0.5 * mean_only
    with pytest.raises(InputError, match="power of two"):
        compare_with_rq(data["train"], data["db"], data["queries"], gt, M=2, K=10)


def test_run_demo_shrunk(tmp_path, monkeypatch):
    monkeypatch.setenv("QINCO2_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo.pt"
    r = run_demo(out, progress=False, M=2, K=16, L=1, de=8, dh=16, A=4, B=4, loop=1_000,
                 max_epochs=1, trainset=3_000, valset=500, db=1_000)
    assert (r["M"], r["K"], r["D"]) == (2, 16, 64)
    assert (r["n_train"], r["n_val"], r["n_db"], r["n_queries"]) == (3_000, 500, 1_000, 500)
    assert r["epochs_run"] == 1
    for result in (r["qinco2"], r["rq"]):
        assert result["mse"] > 0
        assert 0 <= result["R@1"] <= result["R@10"] <= result["R@100"] <= 1
    loaded = QincoCodec.load(out)
    assert loaded.n_codes == 2 and loaded.dim == 64
    from qinco2.cli.codec_tasks import demo_verdict

    line = demo_verdict(r)
    assert line.startswith("At 1 byte per vector")            # 2 steps x 4 bits
    assert f"{r['qinco2']['mse'] / r['rq']['mse']:.2f}x the squared error" in line
    gain = 100 * (r["qinco2"]["R@1"] - r["rq"]["R@1"])
    assert f"{abs(gain):.1f} points {'more' if gain >= 0 else 'less'} often" in line
