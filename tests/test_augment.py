"""Tests of qinco2.codec.augment: the training rows' neighbours (against a brute-force
reference) and the neighbour mixing inside training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qinco2.codec.train as train_module
from qinco2.codec.augment import augment_generator, mix_with_neighbours, training_neighbours
from qinco2.codec.codec import QincoCodec
from qinco2.codec.train import TrainConfig
from qinco2.errors import ConfigError, InputError

FAST = dict(M=2, K=16, L=1, de=None, dh=32, A=4, B=4, batch=256, epochs=6, ramp_epochs=1, lr=3e-3, seed=0)


def identity(x_nD: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_nD)


def brute_neighbours(x_ND: np.ndarray, k: int) -> np.ndarray:
    """The slow, obvious reference: all pairwise distances, self excluded."""
    d_NN = ((x_ND[:, None, :].astype(np.float64) - x_ND[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d_NN, np.inf)
    return np.argsort(d_NN, axis=1, kind="stable")[:, :k]


def test_neighbours_are_exact_within_one_block():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    got = training_neighbours(x, 5, normalize=identity, seed=0)
    want = brute_neighbours(x, 5)
    assert got.shape == (300, 5) and got.dtype == np.int32
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))


def test_neighbours_stay_inside_blocks_of_a_seeded_order():
    """Above block_rows the rows are cut into equal random blocks, each searched exactly: the
    neighbours are the brute-force ones of the row's block, the same for the same seed."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((250, 6)).astype(np.float32)
    got = training_neighbours(x, 3, normalize=identity, seed=7, block_rows=100)
    assert np.array_equal(got, training_neighbours(x, 3, normalize=identity, seed=7, block_rows=100))
    order = np.random.default_rng([7, 2]).permutation(250)
    for a, b in ((0, 83), (83, 167), (167, 250)):                      # 3 blocks of equal size
        ids = np.sort(order[a:b])
        np.testing.assert_array_equal(np.sort(got[ids], axis=1), np.sort(ids[brute_neighbours(x[ids], 3)], axis=1))


def test_neighbours_of_duplicates_tiny_sets_and_bad_rows():
    x = np.zeros((4, 3), dtype=np.float32)                          # all rows equal: never the row itself
    got = training_neighbours(x, 3, normalize=identity, seed=0)
    assert all(i not in got[i] for i in range(4)) and all(len(set(r)) == 3 for r in got)
    two = training_neighbours(np.eye(2, 3, dtype=np.float32), 3, normalize=identity, seed=0)
    np.testing.assert_array_equal(two, [[1, 0, 0], [0, 1, 1]])         # short of rows: the row itself
    np.testing.assert_array_equal(training_neighbours(x[:1], 2, normalize=identity, seed=0), [[0, 0]])
    bad = np.ones((50, 3), dtype=np.float32)
    bad[37, 1] = np.nan
    with pytest.raises(InputError, match="row 37"):
        training_neighbours(bad, 2, normalize=identity, seed=0)
    with pytest.raises(InputError, match="block_rows"):
        training_neighbours(x, 4, normalize=identity, seed=0, block_rows=4)


def test_mix_moves_each_row_part_of_the_way():
    u, v = torch.zeros(2000, 4), torch.ones(2000, 4)
    mixed = mix_with_neighbours(u, v, 0.5, augment_generator(0, 0, 0, "cpu"))
    lam = mixed[:, 0]
    assert torch.equal(mixed, lam[:, None].expand(-1, 4))              # on the segment from u to v
    assert 0 <= float(lam.min()) < 0.01 and 0.49 < float(lam.max()) < 0.5
    assert float(lam.mean()) == pytest.approx(0.25, abs=0.01)


def test_training_mixes_each_row_with_one_of_its_neighbours(clustered, monkeypatch):
    """neighbour_mix: each training batch row moves, by less than neighbour_mix of the way, towards
    one of its neighbour_k nearest training rows; validation rows are never mixed; seeded."""
    x = clustered(1500, seed=0)
    x_train, x_val = x[:1200], x[1200:]
    seen, tables = {}, []
    real_encode, real_neighbours = train_module.encode, train_module.training_neighbours

    def spy(model, u, **kwargs):
        seen.setdefault(key, []).append((model, u.clone()))
        return real_encode(model, u, **kwargs)

    def spy_neighbours(*args, **kwargs):
        tables.append(real_neighbours(*args, **kwargs))
        return tables[-1]
    monkeypatch.setattr(train_module, "encode", spy)
    monkeypatch.setattr(train_module, "training_neighbours", spy_neighbours)
    runs = {}
    for key, mix in (("clean", 0.0), ("mixed", 0.4), ("again", 0.4)):
        codec = QincoCodec.from_preset("qinco2-S", **{**FAST, "max_epochs": 2, "neighbour_mix": mix, "neighbour_k": 3})
        runs[key] = codec.train(x_train, x_val, progress=False)
    assert len(tables) == 2 and tables[0].shape == (1200, 3)          # found once per run
    assert np.array_equal(tables[0], tables[1])                        # seeded: a resumed run finds the same
    assert len(seen["clean"]) == len(seen["mixed"]) == 10             # 5 batches x 2 epochs
    model = seen["mixed"][0][0]
    with torch.no_grad():
        u_all = model.normalize(torch.from_numpy(x_train))
    for (_, clean), (_, mixed), (_, again) in zip(seen["clean"], seen["mixed"], seen["again"]):
        assert torch.equal(mixed, again)                               # seeded
        rows = [int(torch.nonzero((u_all == c).all(1))[0]) for c in clean[:20]]
        for c, m, i in zip(clean[:20], mixed[:20], rows):
            lams = [float((m - c) @ (u_all[j] - c) / (u_all[j] - c).pow(2).sum()) for j in tables[0][i]]
            on_segment = [j for j, lam in zip(tables[0][i], lams)
                          if 0 <= lam < 0.4 and torch.allclose(c + lam * (u_all[j] - c), m, atol=1e-5)]
            assert on_segment, "a mixed row is off every segment to its neighbours"
    assert runs["mixed"].train_state_.init_mse == runs["clean"].train_state_.init_mse   # clean validation
    for bad in (dict(neighbour_mix=-0.1), dict(neighbour_k=0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad).validated()
