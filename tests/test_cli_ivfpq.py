"""The IVF-PQ tasks of the command line: build, search over n_probes, refinement (raw and
QINCo2 codes), and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli

from qinco2 import encode_to_file, write_vectors
from qinco2.metrics import knn

COMMON = ["cpu=true", "verbose=false"]
SMALL = ["n_lists=16", "pq_dim=8", "pq_bits=4", "kmeans_n_iters=3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, clustered):
    root = tmp_path_factory.mktemp("ivfpq")
    x = clustered(3050, D=16, seed=7)
    base, queries = x[:3000], x[3000:]
    paths = {"base": root / "base.fvecs", "query": root / "query.fvecs", "gt": root / "gt.ivecs"}
    write_vectors(paths["base"], base)
    write_vectors(paths["query"], queries)
    write_vectors(paths["gt"], knn(queries, base, 10).astype(np.int32))
    data = [f"db={paths['base']}", f"queries={paths['query']}", f"queries_gt={paths['gt']}"]
    return root, data, base


def test_build_then_search_over_n_probes_and_refine(files, capsys):
    root, data, _ = files
    index = root / "a.ivfpq"
    rc, out, err, r = run_cli(capsys, "task=ivfpq_build", *data, *SMALL, f"output={index}",
                              "conservative_memory_allocation=true", *COMMON)
    assert rc == 0, err
    assert r["n"] == 3000 and r["pq_dim"] == 8 and index.is_file()
    assert abs(r["index_bytes"] - r["index_bytes_estimate"]) <= 0.02 * r["index_bytes"]
    log = root / "search.json"
    rc, out, err, r = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "n_probes=[1,4,16]",
                              "k=10", f"output={log}", *COMMON)
    assert rc == 0, err
    recalls = [run["10-recall@10"] for run in r["runs"]]
    assert [run["n_probes"] for run in r["runs"]] == [1, 4, 16] and recalls == sorted(recalls)
    assert json.loads(log.read_text())["runs"] == r["runs"]
    rc, _, err, refined = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "n_probes=16",
                                  "refine=raw", "refine_ratio=4", "lut_dtype=uint8", *COMMON)
    assert rc == 0, err
    assert refined["runs"][0]["10-recall@10"] > recalls[-1]


def test_refine_with_qinco2_codes(files, capsys, trained_codec, tmp_path):
    root, data, base = files
    index = root / "b.ivfpq"
    assert run_cli(capsys, "task=ivfpq_build", *data, *SMALL, f"output={index}", *COMMON)[0] == 0
    model, codes = tmp_path / "m.pt", tmp_path / "codes.npy"
    trained_codec.save(model)
    encode_to_file(trained_codec, base, codes, progress=False)
    rc, _, err, r = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "n_probes=16", "refine=codec",
                            "refine_ratio=4", f"model={model}", f"encoded_db={codes}", *COMMON)
    assert rc == 0, err
    assert r["refine"] == "codec" and 0 < r["runs"][0]["R@1"] <= 1
    encode_to_file(trained_codec, base[:100], tmp_path / "short.npy", progress=False)
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "refine=codec", "refine_ratio=4",
                            f"model={model}", f"encoded_db={tmp_path / 'short.npy'}", *COMMON)
    assert rc == 2 and "holds 100 codes but the index holds 3000" in err


@pytest.mark.parametrize("args, message", [
    (["pq_bits=9"], "pq_bits must be an integer from 4 to 8"),
    (["pq_dim=6", "pq_bits=5"], "multiple of 8"),
    (["n_lists=5000"], "n_lists=5000 is larger than the 3000 training vectors"),
])
def test_build_errors(files, capsys, tmp_path, args, message):
    _, data, _ = files
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_build", *data, *SMALL, *args, f"output={tmp_path / 'x.ivfpq'}",
                            *COMMON)
    assert rc == 2 and message in err


def test_search_errors(files, capsys, tmp_path):
    root, data, _ = files
    index = root / "c.ivfpq"
    assert run_cli(capsys, "task=ivfpq_build", *data, *SMALL, f"output={index}", *COMMON)[0] == 0
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "refine_ratio=3", *COMMON)
    assert rc == 2 and "needs refine=raw" in err
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "refine=codec",
                            "refine_ratio=2", *COMMON)
    assert rc == 2 and "refine=codec needs model=" in err
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_search", *data, f"index={index}", "k=5000", *COMMON)
    assert rc == 2 and "k=5000 is larger than the 3000 vectors" in err
    rc, _, err, _ = run_cli(capsys, "task=ivfpq_search", *data, f"index={tmp_path / 'none.ivfpq'}", *COMMON)
    assert rc == 2 and "does not exist" in err and "task=ivfpq_build" in err
