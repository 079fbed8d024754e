"""The IVF chain of the command line, end to end on tiny files: ivf_centroids -> train ->
encode -> train_pairwise_decoder -> build_index -> search, and its file-mismatch errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli as _run

from qinco2 import write_vectors
from qinco2.cli.main import parse_args, run
from qinco2.ivfsearch.shortlist import sidecar_path
from qinco2.metrics import knn

# K=256: the faiss index stores 8-bit codes. ds.valset=300 everywhere: the training split
# (2700 training + 300 validation rows) must be the same in every task.
COMMON = ["ds.valset=300", "cpu=true", "verbose=false"]
SEARCH_COMMON = COMMON[1:]      # search reads no training split
TINY_IVF = ["model_args=qinco2-S", "M=2", "K=256", "L=1", "de=8", "dh=16", "A=4", "B=4",
            "ds.loop=2_000", "max_epochs=1", "batch=256", "lr=3e-3", *COMMON]
GRID = ["nprobe=[1,8]", "quantizer_efSearch=16", "nshort=[10,50]", "nmid_short=[0,4]"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, clustered):
    """Data files, 8 IVF centroids, two IVF models (A, B) and a model without IVF, and the
    codes files: A's training split and database, B's database, A's first 400 database rows
    and the non-IVF model's database."""
    root = tmp_path_factory.mktemp("ivf")
    x = clustered(3520, D=8, C=8, seed=3)
    learn, base, queries = x[:3000], x[3000:3500], x[3500:]
    p = {name: root / f"{name}.fvecs" for name in ("learn", "base", "query")}
    for name, arr in zip(p, (learn, base, queries)):
        write_vectors(p[name], arr)
    p["gt"] = root / "gt.ivecs"
    write_vectors(p["gt"], knn(queries, base, 1).astype(np.int32))
    p = {k: str(v) for k, v in p.items()}
    data = [f"trainset={p['learn']}", *COMMON]
    p["centroids"] = str(root / "centroids.npy")
    run(["task=ivf_centroids", "ivf_K=8", f"output={p['centroids']}", *data])
    for name, extra in (("A", [f"ivf_centroids={p['centroids']}"]),
                        ("B", [f"ivf_centroids={p['centroids']}", "seed=1"]), ("flat", [])):
        p[name] = str(root / f"{name}.pt")
        run(["task=train", f"trainset={p['learn']}", f"output={p[name]}", *TINY_IVF, *extra])
    for name, model, extra in (("A_train", "A", ["encode_trainset=true", f"trainset={p['learn']}"]),
                               ("A_db", "A", []), ("B_db", "B", []), ("A_db400", "A", ["ds.db=400"]),
                               ("flat_db", "flat", [])):
        p[name] = str(root / f"{name}.npy")
        run(["task=encode", f"model={p[model]}", f"db={p['base']}", f"output={p[name]}",
             *extra, *COMMON])
    return p


def _pairwise_args(p, encoded):
    return ["task=train_pairwise_decoder", f"ivf_centroids={p['centroids']}",
            f"trainset={p['learn']}", f"encoded_trainset={encoded}", *COMMON]


def _index_args(p, train, db):
    return ["task=build_index", f"ivf_centroids={p['centroids']}", f"trainset={p['learn']}",
            f"encoded_trainset={train}", f"encoded_db={db}", *COMMON]


def _search_args(p, model, db, index):
    return ["task=search", f"model={model}", f"index={index}", f"encoded_db={db}",
            f"queries={p['query']}", f"queries_gt={p['gt']}", *GRID, *SEARCH_COMMON]


@pytest.fixture(scope="module")
def built(chain, tmp_path_factory):
    """A's pairwise decoder and index, built once by the CLI."""
    root = tmp_path_factory.mktemp("built")
    pairwise, index = str(root / "pairwise.pt"), str(root / "index.faissindex")
    pairwise_result = run([*_pairwise_args(chain, chain["A_train"]), f"output={pairwise}"])
    index_result = run([*_index_args(chain, chain["A_train"], chain["A_db"]), f"output={index}"])
    return {"pairwise": pairwise, "index": index, "root": root,
            "pairwise_result": pairwise_result, "index_result": index_result}


def test_grid_keys_take_one_value_or_a_list():
    args, _ = parse_args(["task=search", "nprobe=[1,4,16]", "nshort=8", "n_pairs_per_step=1"])
    assert args.nprobe == [1, 4, 16] and args.nshort == 8 and args.n_pairs_per_step == 1
    assert args.quantizer_efSearch is None and args.nmid_short is None


def test_pairwise_decoder_beats_additive_decoding(capsys, chain, built, tmp_path):
    r = built["pairwise_result"]
    assert Path(built["pairwise"]).is_file()
    assert (r["n_train"], r["M"], r["K"], r["ivf_K"]) == (3000, 2, 256, 8) and 1 <= r["n_tables"] <= 4
    # held-out rows: AQ tables, then pair tables that each lower the held-out MSE
    assert 0 < r["mse"] < r["additive_mse"] < r["centroids_mse"]
    rc, out, _, result = _run(capsys, *_pairwise_args(chain, chain["A_train"]),
                              f"output={tmp_path / 'p.pt'}", "n_pairs_per_step=1")
    assert rc == 0 and "plain additive (AQ)" in out and 1 <= result["n_tables"] <= 2


def test_build_index_and_search_with_resume(capsys, chain, built):
    assert built["index_result"]["n_db"] == 500 and sidecar_path(built["index"]).is_file()
    log = built["root"] / "search.json"
    argv = [*_search_args(chain, chain["A"], chain["A_db"], built["index"]),
            f"pairwise_decoder={built['pairwise']}", f"output={log}", "threads=1"]
    rc, out, err, r = _run(capsys, *argv)
    assert rc == 0, err
    assert (r["n_db"], r["n_queries"]) == (500, 20) and 1 <= r["n_runs"] == r["n_new_runs"] <= 16
    assert "nmid_short" in out and Path(r["plot"]) == log.with_suffix(".png")
    assert log.with_suffix(".png").stat().st_size > 0
    assert len(json.loads(log.read_text())["runs"]) == r["n_runs"]
    for p in r["pareto"]:
        assert 0 <= p["R@1"] <= p["R@10"] <= p["R@100"] <= 1
    assert max(p["R@10"] for p in r["pareto"]) > 0.5  # all lists, 50 re-ranked: near-exhaustive
    rc, _, err, again = _run(capsys, *argv, "resume=true")
    assert rc == 0, err
    assert again["n_new_runs"] == 0 and again["n_runs"] == r["n_runs"]


def test_search_precision_reaches_the_rerank_decoding(capsys, chain, built, tmp_path, monkeypatch):
    from qinco2.codec.codec import QincoCodec
    seen, real = [], QincoCodec.decode
    monkeypatch.setattr(QincoCodec, "decode", lambda self, codes, **kw: seen.append(kw.get("precision")) or
                        real(self, codes, **kw))
    argv = [*_search_args(chain, chain["A"], chain["A_db"], built["index"]), "nprobe=2", "nshort=5",
            f"output={tmp_path / 's.json'}", "threads=1", "precision=bf16"]
    rc, _, err, r = _run(capsys, *argv)
    assert rc == 0, err
    assert seen and set(seen) == {"bf16"}


@pytest.mark.parametrize("case, words", [
    ("index_of_another_model", ["was built from codes of model", "task=build_index"]),
    ("index_of_another_database", ["holds 500 database vectors", "has 400"]),
    ("db_codes_of_another_model", ["A_db.npy", "come from model", "task=encode"]),
    ("search_flat_codes", ["without IVF", "ivf_centroids="]),
    ("search_without_encoded_db", ["encoded_db=", "task=encode"]),
    ("index_from_two_models", ["A_train.npy", "B_db.npy", "different models"]),
    ("index_missing_codes", ["missing.npy", "does not exist", "task=encode"]),
    ("pairwise_flat_codes", ["without IVF"]),
    ("pairwise_row_mismatch", ["3000 encoded rows", "1300", "encode_trainset=true"]),
])
def test_mismatched_files_are_refused(capsys, chain, built, tmp_path, case, words):
    p, index = chain, built["index"]
    out, missing = f"output={tmp_path / 'out'}", str(tmp_path / "missing.npy")
    argv = {
        "index_of_another_model": _search_args(p, p["B"], p["B_db"], index),
        "index_of_another_database": _search_args(p, p["A"], p["A_db400"], index),
        "db_codes_of_another_model": _search_args(p, p["B"], p["A_db"], index),
        "search_flat_codes": _search_args(p, p["A"], p["flat_db"], index),
        "search_without_encoded_db": _search_args(p, p["A"], p["A_db"], index)[:3] + SEARCH_COMMON,
        "index_from_two_models": _index_args(p, p["A_train"], p["B_db"]) + [out],
        "index_missing_codes": _index_args(p, p["A_train"], missing) + [out],
        "pairwise_flat_codes": _pairwise_args(p, p["flat_db"]) + [out],
        "pairwise_row_mismatch": _pairwise_args(p, p["A_train"]) + ["ds.trainset=1000", out],
    }[case]
    rc, _, err, result = _run(capsys, *argv)
    assert rc == 2 and result is None and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_ivf_centroids_niter_reaches_kmeans(tmp_path, capsys, clustered, monkeypatch):
    """`niter=` sets the IVF k-means iterations (default 100, as the QINCo2 release)."""
    import qinco2.ivf as ivf_module

    seen = []
    real = ivf_module.kmeans

    def spy(x, K, *, niter, **kw):
        seen.append(niter)
        return real(x, K, niter=niter, **kw)

    monkeypatch.setattr(ivf_module, "kmeans", spy)
    learn = tmp_path / "learn.fvecs"
    write_vectors(learn, clustered(600, D=8, C=8, seed=1))
    for extra, expected in (([], 100), (["niter=3"], 3)):
        rc, _, err, result = _run(capsys, "task=ivf_centroids", "ivf_K=8", f"trainset={learn}", *COMMON,
                                  f"output={tmp_path / 'c.npy'}", *extra)
        assert rc == 0, err
        assert seen[-1] == expected and result["niter"] == expected
    rc, _, err, _ = _run(capsys, "task=ivf_centroids", "ivf_K=8", f"trainset={learn}", *COMMON,
                         f"output={tmp_path / 'c.npy'}", "niter=0")
    assert rc == 2 and "niter=0" in err
