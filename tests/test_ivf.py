"""IVF centroids (k-means, faiss and torch paths), nearest-centroid assignment, the CLI task."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest
import torch

from qinco2 import InputError, QincoCodec, open_vectors, write_vectors
from qinco2.cli.main import main
from qinco2.ivf import _sample, assign_to_centroids, train_ivf_centroids
from qinco2.metrics import mse

K = 16


@pytest.fixture(scope="module")
def gauss():
    """2000 x 8 standard normal: no cluster structure, so every k-means local minimum has
    about the same MSE and two k-means implementations can be compared on it."""
    return np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)


def _kmeans_mse(x, centroids) -> float:
    return mse(x, centroids[assign_to_centroids(x, centroids)])


def _brute_force_ids(x, c):
    d_NC = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    return d_NC.argmin(1), np.sort(d_NC, 1)


# ----------------------------------------------------------------------------- k-means

@pytest.mark.parametrize("seed", [0, 1])
def test_centroids_as_good_as_faiss_kmeans(gauss, seed):
    ours = train_ivf_centroids(gauss, K, niter=5, seed=seed, progress=False)
    km = faiss.Kmeans(8, K, niter=5, seed=seed, verbose=False, max_points_per_centroid=10_000)
    km.train(gauss)
    assert ours.shape == (K, 8) and ours.dtype == np.float32
    assert _kmeans_mse(gauss, ours) / _kmeans_mse(gauss, km.centroids) < 1.02  # no structure: ~same


def test_kmeans_is_seeded_and_improves_with_iterations(gauss):
    a = train_ivf_centroids(gauss, K, seed=1, progress=False)
    np.testing.assert_array_equal(a, train_ivf_centroids(gauss, K, seed=1, progress=False))
    assert not np.array_equal(a, train_ivf_centroids(gauss, K, seed=2, progress=False))
    one_iter = train_ivf_centroids(gauss, K, niter=1, seed=1, progress=False)
    assert _kmeans_mse(gauss, a) < _kmeans_mse(gauss, one_iter)


def test_kmeans_splits_empty_clusters():
    """16 distinct points, each repeated: a random start picks duplicates, whose clusters are
    empty; splitting the worst clusters finds all 16 (zero error)."""
    points = np.random.default_rng(5).normal(0, 10, (16, 4)).astype(np.float32)
    x = np.repeat(points, 50, axis=0)
    c = train_ivf_centroids(x, 16, niter=20, seed=0, progress=False)
    assert np.isfinite(c).all()
    assert len(np.unique(c, axis=0)) == 16 and _kmeans_mse(x, c) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_faiss_mse(gauss):
    faiss_mse = _kmeans_mse(gauss, train_ivf_centroids(gauss, K, progress=False))
    c = train_ivf_centroids(gauss, K, progress=False, device="cuda")
    assert abs(_kmeans_mse(gauss, c) / faiss_mse - 1) < 0.05


def test_uint8_memmap_input_gives_the_same_centroids(tmp_path):
    x_u8 = np.random.default_rng(1).integers(0, 256, (2000, 8), dtype=np.uint8)
    write_vectors(tmp_path / "x.npy", x_u8)
    x_mm = open_vectors(tmp_path / "x.npy")
    assert isinstance(x_mm, np.memmap)
    c = train_ivf_centroids(x_mm, K, niter=5, progress=False, max_points_per_centroid=50)
    c_ref = train_ivf_centroids(x_u8.astype(np.float32), K, niter=5, progress=False,
                                max_points_per_centroid=50)
    np.testing.assert_array_equal(c, c_ref)
    np.testing.assert_array_equal(assign_to_centroids(x_mm, c, batch=300),
                                  assign_to_centroids(x_u8.astype(np.float32), c))


def test_subsample_is_seeded_rows_of_x(gauss):
    s = _sample(gauss, 160, seed=4, progress=False)
    assert s.shape == (160, 8)
    np.testing.assert_array_equal(s, _sample(gauss, 160, seed=4, progress=False))
    rows = {r.tobytes() for r in gauss}
    assert all(r.tobytes() in rows for r in s) and len({r.tobytes() for r in s}) == 160
    np.testing.assert_array_equal(_sample(gauss, 5000, seed=4, progress=False), gauss)


def test_too_few_training_vectors(gauss, caplog):
    with pytest.raises(InputError, match="K=16 centroids needs at least 16"):
        train_ivf_centroids(gauss[:15], K, progress=False)
    with caplog.at_level(logging.WARNING, logger="qinco2.ivf"):
        train_ivf_centroids(gauss[:200], K, niter=2, progress=False)  # 200 < 39 * 16
    assert "fewer than 39 vectors per centroid" in caplog.text


# ----------------------------------------------------------------------------- assignment

def test_assignment_is_the_exact_nearest_centroid(gauss):
    c = train_ivf_centroids(gauss, K, progress=False)
    ids = assign_to_centroids(gauss, c, batch=300)  # 7 chunks, the last one short
    assert ids.dtype == np.int64 and ids.shape == (2000,)
    want, d_sorted = _brute_force_ids(gauss, c)
    clear = d_sorted[:, 1] - d_sorted[:, 0] > 1e-4  # float32 faiss vs float64: skip near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(ids[clear], want[clear])


def test_centroids_of_another_dimension_are_rejected(gauss, codec_data, tiny_codec_fields):
    c = np.zeros((K, 5), dtype=np.float32)
    for call in (lambda: assign_to_centroids(gauss, c),
                 lambda: QincoCodec.from_preset("qinco2-S", **tiny_codec_fields).train(
                     codec_data[0], codec_data[1], ivf_centroids=c, progress=False)):
        with pytest.raises(InputError) as info:
            call()
        msg = str(info.value)
        assert "dimension 5" in msg and "task=ivf_centroids" in msg
    assert "dimension 8" in str(pytest.raises(InputError, assign_to_centroids, gauss, c).value)


# ----------------------------------------------------------------------------- CLI

def _result(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])


def test_cli_ivf_centroids_and_train_with_wrong_dimension(gauss, tmp_path, capsys):
    write_vectors(tmp_path / "learn.fvecs", gauss)
    out = tmp_path / "new_dir" / "centroids.npy"  # the folder is created
    argv = ["task=ivf_centroids", f"ivf_K={K}", f"output={out}",
            f"trainset={tmp_path / 'learn.fvecs'}", "ds.valset=100", "cpu=true", "verbose=false"]
    assert main(argv) == 0
    result = _result(capsys.readouterr().out)
    c = np.load(out)
    assert c.shape == (K, 8) and c.dtype == np.float32
    assert result["n_train"] == 1900 and result["train_s"] >= 0
    np.testing.assert_allclose(result["mse"], _kmeans_mse(gauss[:1900], c), rtol=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["centroids.npy"]  # no temporary file

    write_vectors(tmp_path / "c5.npy", np.zeros((K, 5), dtype=np.float32))
    rc = main(["task=train", f"trainset={tmp_path / 'learn.fvecs'}", f"output={tmp_path / 'm.pt'}",
               f"ivf_centroids={tmp_path / 'c5.npy'}", "ds.valset=100", "cpu=true",
               "verbose=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "dimension 5" in err and "dimension 8" in err and "task=ivf_centroids" in err


def test_cli_ivf_centroids_checks_its_arguments_before_kmeans(capsys):
    assert main(["task=ivf_centroids", "output=c.npy", "cpu=true"]) == 2
    assert "ivf_K=" in capsys.readouterr().err
    assert main(["task=ivf_centroids", "ivf_K=16", "output=c.bvecs", "cpu=true"]) == 2
    assert ".npy" in capsys.readouterr().err
