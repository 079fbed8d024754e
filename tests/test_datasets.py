"""Tests of qinco2.datasets: named sets, splits and limits, the synthetic default, epoch windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qinco2 import datasets
from qinco2.codec.batches import epoch_batches, epoch_length
from qinco2.datasets import (
    DATASETS,
    DataLimits,
    Dataset,
    dataset_names,
    make_synthetic,
    resolve_dataset,
)
from qinco2.errors import DatasetError, InputError
from qinco2.formats import open_vectors, read_vectors, write_vectors
from qinco2.metrics import knn
from qinco2.synthetic import synthetic_vectors

SHARED_DATA = Path(datasets.__file__).resolve().parents[2] / "shared" / "data"
LOCAL_SETS = ["sift-photos", "siftsmall", "fmnistsmall", "sigmod2024_yfcc_clip100"]


def local_set(name: str) -> Dataset:
    if not (SHARED_DATA / DATASETS[name].folder).is_dir():
        pytest.skip(f"{name} is not under {SHARED_DATA}")
    return resolve_dataset(name, data_root=SHARED_DATA)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return make_synthetic(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty working directory and no QINCO2_DATA, so only explicit roots count."""
    monkeypatch.delenv("QINCO2_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------
# Named sets, splits and limits


@pytest.mark.parametrize("name", LOCAL_SETS)
def test_local_sets_resolve_with_consistent_shapes(name: str) -> None:
    ds = local_set(name)
    n_db = len(ds.database())
    train, val = ds.train_val(DataLimits(valset=min(10_000, n_db // 4)))
    queries_QD, gt_QK = ds.query_vectors(), ds.ground_truth()
    assert train.shape[1] == val.shape[1] == queries_QD.shape[1] == ds.dim
    assert queries_QD.dtype == np.float32 and gt_QK.dtype == np.int64
    assert gt_QK.shape[0] == queries_QD.shape[0]
    assert 0 <= gt_QK.min() and gt_QK.max() < n_db


def test_sift_photos_split_is_memory_mapped_uint8() -> None:
    ds = local_set("sift-photos")
    assert ds.mse_scale == 1e-4
    train, val = ds.train_val()
    assert (len(train), len(val)) == (490_000, 10_000)
    assert train.dtype == val.dtype == np.uint8
    assert isinstance(train, np.memmap) and not train.flags.owndata
    # independent read of the file: 132-byte records, the vector after the 4-byte header
    raw = np.fromfile(ds.trainset, dtype=np.uint8).reshape(-1, 132)
    np.testing.assert_array_equal(val, raw[-10_000:, 4:])
    np.testing.assert_array_equal(train[:5], raw[:5, 4:])
    np.testing.assert_array_equal(train[-1], raw[489_999, 4:])


def test_sets_without_learn_file_train_on_base() -> None:
    ds = local_set("siftsmall")
    assert ds.trainset == ds.db
    train, val = ds.train_val(DataLimits(valset=1_000))
    assert (len(train), len(val)) == (9_000, 1_000)


def test_limits_cut_train_and_database() -> None:
    ds = local_set("sift-photos")
    train, val = ds.train_val(DataLimits(trainset=1_234, valset=500))
    assert (len(train), len(val)) == (1_234, 500)
    np.testing.assert_array_equal(train, read_vectors(ds.trainset, 0, 1_234))
    np.testing.assert_array_equal(val, read_vectors(ds.trainset, 499_500))
    assert len(ds.database(DataLimits(db=777))) == 777
    capped = Dataset(ds.name, ds.trainset, ds.db, None, None, db_limit=100)
    assert len(capped.database(DataLimits(db=500))) == 100
    assert len(capped.database(DataLimits(db=50))) == 50
    assert len(capped.database()) == 100


def test_wordnet_minilm_is_inner_product_with_a_float16_learn_file() -> None:
    ds = local_set("wordnet-minilm")
    assert ds.metric == "ip" and ds.dim == 384
    train, val = ds.train_val()  # 85,033 float16 rows: the last 10,000 validate
    assert (len(train), len(val)) == (75_033, 10_000)
    assert train.dtype == np.float16 and isinstance(train, np.memmap)
    rows_ND = read_vectors(ds.trainset, 0, 512, dtype=np.float32)  # converted per block
    np.testing.assert_array_equal(rows_ND, np.asarray(train[:512], dtype=np.float32))
    batch = next(epoch_batches(train, 0, loop=2_048, batch_size=256,
                               rng=np.random.default_rng(0)))
    x_ND = np.asarray(batch, dtype=np.float32)  # what training does with each batch
    assert x_ND.shape == (256, 384) and np.isfinite(x_ND).all()
    # unit norm up to float16 rounding (relative error 2**-11 per value)
    np.testing.assert_allclose(np.linalg.norm(x_ND, axis=1), 1.0, atol=2e-3)
    queries_QD, gt_QK = ds.query_vectors(), ds.ground_truth()
    assert ds.database().dtype == queries_QD.dtype == np.float32 and gt_QK.shape == (1_000, 100)
    # unit-norm vectors: the stored (L2) ground truth is also the inner-product ranking
    np.testing.assert_array_equal(knn(queries_QD[:20], ds.database(), 1, metric="ip")[:, 0],
                                  gt_QK[:20, 0])


def test_metric_of_named_and_path_sets(tmp_path: Path) -> None:
    assert DATASETS["contriever1M"].metric == DATASETS["wordnet-minilm"].metric == "ip"
    assert all(DATASETS[name].metric == "l2" for name in ("bigann1M", "deep1M", "sift-photos"))
    path = tmp_path / "base.fvecs"
    write_vectors(path, np.zeros((4, 3), np.float32))
    assert resolve_dataset(path).metric == "l2"  # a file path: L2 unless metric= says otherwise


@pytest.mark.parametrize("limits", [DataLimits(valset=250_001), DataLimits(valset=-1),
                                    DataLimits(trainset=0)])
def test_bad_limits_raise(limits: DataLimits) -> None:
    ds = local_set("sift-photos")
    with pytest.raises(DatasetError, match="ds\\."):
        ds.train_val(limits)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError) as info:
        resolve_dataset("bigann2M")
    for name in dataset_names():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name, command",
    [("bigann1M", "bash scripts/download/bigann.sh -small"),
     ("bigann1B", "bash scripts/download/bigann.sh "),
     ("deep1M", "bash scripts/download/deep1b.sh -small"),
     ("contriever1M", "bash scripts/download/contriever.sh"),
     ("FB_ssnpp1M", "bash scripts/download/fb_ssnpp.sh")],
)
def test_missing_paper_set_names_download_command(no_data_env: Path, name: str, command: str):
    with pytest.raises(DatasetError) as info:
        resolve_dataset(name, data_root=no_data_env / "mydata")
    message = str(info.value)
    assert command in message and str(no_data_env / "mydata") in message


@pytest.mark.parametrize("how", ["data_root", "env", "cwd"])
def test_data_root_search_and_layout(no_data_env: Path, monkeypatch: pytest.MonkeyPatch, how: str):
    """A paper set laid out as the download scripts write it is found in each kind of root."""
    root = no_data_env / ("data" if how == "cwd" else "root")
    folder = root / "fb_ssnpp"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(folder / "training_set10010k.npy", rng.integers(0, 256, (40, 8)).astype(np.uint8))
    np.save(folder / "database1M.npy", rng.integers(0, 256, (30, 8)).astype(np.uint8))
    np.save(folder / "queries.npy", rng.integers(0, 256, (5, 8)).astype(np.uint8))
    np.save(folder / "ground_truth1M.npy", np.arange(5, dtype=np.int64))  # 1-D: one id per query
    if how == "env":
        monkeypatch.setenv("QINCO2_DATA", str(root))
    ds = resolve_dataset("FB_ssnpp1M", data_root=root if how == "data_root" else None)
    assert ds.db == (Path("data") if how == "cwd" else root) / "fb_ssnpp" / "database1M.npy"
    assert ds.mse_scale == 1e-4 and ds.dim == 8
    assert ds.train_val(DataLimits(valset=10))[0].dtype == np.uint8
    np.testing.assert_array_equal(ds.ground_truth(), np.arange(5)[:, None])


def test_explicit_paths_override_and_complete(tmp_path: Path) -> None:
    ds = local_set("sift-photos")
    custom = resolve_dataset(str(ds.db), trainset=ds.trainset, queries=ds.queries)
    assert (custom.name, custom.db, custom.trainset) == ("base", ds.db, ds.trainset)
    assert custom.groundtruth is None and custom.mse_scale == 1.0
    gt_path = tmp_path / "gt.ibin"
    write_vectors(gt_path, np.arange(1_000, dtype=np.int32)[:, None])
    named = resolve_dataset("sift-photos", data_root=SHARED_DATA, queries_gt=gt_path)
    assert named.groundtruth == gt_path and named.trainset == ds.trainset
    np.testing.assert_array_equal(named.ground_truth()[:, 0], np.arange(1_000))


def test_dimension_mismatch_names_both_files() -> None:
    sift, fmnist = local_set("sift-photos"), local_set("fmnistsmall")
    with pytest.raises(DatasetError) as info:
        resolve_dataset(str(sift.db), queries=fmnist.queries)
    assert str(sift.db) in str(info.value) and str(fmnist.queries) in str(info.value)


def test_missing_explicit_file_raises(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset(str(tmp_path / "nothing.fvecs"))
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset("synthetic", trainset=tmp_path / "nothing.bvecs")


def test_no_training_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "db.fvecs"
    write_vectors(path, np.zeros((10, 4), np.float32))
    with pytest.raises(DatasetError, match="trainset"):
        resolve_dataset(path).train_val()


# ---------------------------------------------------------------------------
# The synthetic default


def test_synthetic_shapes_and_statistics(synthetic: Dataset) -> None:
    train, val = synthetic.train_val()
    assert (train.shape, val.shape) == ((50_000, 64), (10_000, 64))
    base_ND = read_vectors(synthetic.db)
    query_QD = synthetic.query_vectors()
    assert base_ND.shape == (20_000, 64) and query_QD.shape == (500, 64)
    assert base_ND.dtype == np.float32 and train.dtype == np.float32
    assert base_ND.min() >= 0 and np.all(base_ND == np.rint(base_ND))
    assert 0.05 < np.mean(base_ND == 0) < 0.5  # sparse-ish, like SIFT
    assert 20 < base_ND.mean() < 35 and 25 < base_ND.std() < 45  # SIFT: about 26 and 36
    # heavy tails: per-dimension kurtosis well above the Gaussian 3 (SIFT: about 5.7)
    z_ND = (base_ND - base_ND.mean(0)) / base_ND.std(0)
    assert np.mean(z_ND**4) > 5


def test_synthetic_ground_truth_is_exact(synthetic: Dataset) -> None:
    base_ND = read_vectors(synthetic.db).astype(np.float64)
    query_QD = synthetic.query_vectors()[:25].astype(np.float64)
    gt_QK = synthetic.ground_truth()
    assert gt_QK.shape == (500, 100)
    dists_QN = ((query_QD[:, None, :] - base_ND[None, :, :]) ** 2).sum(-1)
    # integer-valued data: the distances are exact, compare them (ties may swap ids)
    np.testing.assert_array_equal(dists_QN[np.arange(25), gt_QK[:25, 0]], dists_QN.min(1))
    top10 = np.sort(dists_QN, axis=1)[:, :10]
    np.testing.assert_array_equal(np.take_along_axis(dists_QN, gt_QK[:25, :10], 1), top10)


def test_synthetic_is_bit_identical(synthetic: Dataset, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path)
    for a, b in [(synthetic.trainset, again.trainset), (synthetic.db, again.db),
                 (synthetic.queries, again.queries), (synthetic.groundtruth, again.groundtruth)]:
        assert a != b and a.read_bytes() == b.read_bytes()
    other = synthetic_vectors(seed=1)["query"]
    assert not np.array_equal(other, synthetic.query_vectors())


def test_synthetic_is_cached_and_default(synthetic: Dataset, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("QINCO2_CACHE", str(synthetic.db.parents[1]))
    mtime = synthetic.db.stat().st_mtime_ns
    assert resolve_dataset() == synthetic == resolve_dataset("synthetic")
    assert synthetic.db.stat().st_mtime_ns == mtime
    assert synthetic.db.parent.name == "synthetic-v1-s0"
    assert not [p for p in synthetic.db.parents[1].iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------
# Epoch windows


def ids_matrix(n: int) -> np.ndarray:
    """A training set whose single column is the row index."""
    return np.arange(n, dtype=np.int64)[:, None]


def collect(train: np.ndarray, epoch: int, seed: int = 0, **kw) -> list[np.ndarray]:
    return list(epoch_batches(train, epoch, rng=np.random.default_rng(seed), **kw))


def test_windows_walk_through_the_file() -> None:
    n, loop = 1_000, 300
    train = ids_matrix(n)
    seen = []
    for epoch in range(5):
        batches = collect(train, epoch, loop=loop, batch_size=64, block_rows=128)
        assert [len(b) for b in batches] == [64] * 4 + [44]  # the short last batch is kept
        rows = np.concatenate(batches)[:, 0]
        expected = (epoch * loop + np.arange(loop)) % n
        np.testing.assert_array_equal(np.sort(rows), np.sort(expected))  # each row once
        seen.append(rows)
    assert set(np.concatenate(seen[:4])) == set(range(n))  # 4 windows wrap around the file


def test_shuffling_stays_inside_blocks() -> None:
    n, loop, block = 1_000, 450, 100
    batches = collect(ids_matrix(n), 2, loop=loop, batch_size=32, block_rows=block)
    rows = np.concatenate(batches)[:, 0]
    window = (2 * loop + np.arange(loop)) % n  # starts at 900, wraps inside the second block
    for start in range(0, loop, block):
        got, want = rows[start : start + block], window[start : start + block]
        np.testing.assert_array_equal(np.sort(got), np.sort(want))
        assert not np.array_equal(got, want)  # but the block was shuffled


@pytest.mark.parametrize("full_pass", [False, True])
def test_batches_with_ids_name_their_rows(full_pass) -> None:
    """with_ids gives the same batches, each with the row numbers of its rows (windows that wrap
    around the file and full permutations, batches spanning two blocks, several processes)."""
    train = ids_matrix(1_000) * 10
    for rank in (0, 1):
        kw = dict(loop=700, batch_size=48, block_rows=100, full_pass=full_pass, rank=rank, world_size=2)
        plain = collect(train, 1, **kw)
        pairs = collect(train, 1, with_ids=True, **kw)
        assert len(pairs) == len(plain) > 0
        for rows, (rows_too, ids) in zip(plain, pairs):
            np.testing.assert_array_equal(rows, rows_too)
            np.testing.assert_array_equal(rows[:, 0], ids * 10)


def test_ranks_partition_the_batches() -> None:
    train, kw = ids_matrix(1_000), dict(loop=700, batch_size=64, block_rows=256)
    single = collect(train, 1, **kw)  # 11 batches, the last one 60 rows
    per_rank = [collect(train, 1, rank=r, world_size=3, **kw) for r in range(3)]
    assert [len(b) for b in per_rank] == [3, 3, 3]  # 11 // 3 rounds: every rank steps equally
    for i in range(9):
        np.testing.assert_array_equal(per_rank[i % 3][i // 3], single[i])


def test_full_pass_is_a_permutation() -> None:
    train = ids_matrix(500)
    for kw in (dict(loop=10_000), dict(loop=100, full_pass=True)):
        rows = np.concatenate(collect(train, 3, batch_size=64, **kw))[:, 0]
        assert len(rows) == 500 and set(rows) == set(range(500))
        assert not np.array_equal(rows, np.arange(500))


def test_batches_keep_dtype_and_do_not_alias_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.bvecs"
    write_vectors(path, np.random.default_rng(0).integers(0, 256, (3_000, 16), dtype=np.uint8))
    train = open_vectors(path)[:2_500]
    for kw in (dict(loop=1_000), dict(loop=5_000)):
        for batch in collect(train, 0, batch_size=100, block_rows=300, **kw):
            assert batch.dtype == np.uint8 and batch.shape[1] == 16
            assert not np.shares_memory(batch, train)


def test_same_seed_same_epoch() -> None:
    train, kw = ids_matrix(1_000), dict(loop=300, batch_size=50, block_rows=100)
    a, b = collect(train, 4, seed=9, **kw), collect(train, 4, seed=9, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kw", [dict(batch_size=0), dict(rank=2, world_size=2), dict(loop=0)])
def test_bad_epoch_arguments_raise(kw: dict) -> None:
    args = dict(loop=10, batch_size=4) | kw
    with pytest.raises(InputError):
        collect(ids_matrix(20), 0, **args)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), loop=st.integers(1, 400), batch=st.integers(1, 70),
       block=st.integers(1, 120), world=st.integers(1, 4), epoch=st.integers(0, 6),
       full=st.booleans())
def test_epoch_length_counts_the_batches(n, loop, batch, block, world, epoch, full) -> None:
    train = ids_matrix(n)
    per_rank = [collect(train, epoch, loop=loop, batch_size=batch, block_rows=block,
                        rank=r, world_size=world, full_pass=full) for r in range(world)]
    expected = epoch_length(n, loop, batch, world_size=world, full_pass=full)
    assert all(len(b) == expected for b in per_rank)
    rows = np.concatenate([np.concatenate(b) for b in per_rank if b] or [np.empty((0, 1))])[:, 0]
    assert len(rows) == len(set(rows.tolist()))  # no row twice in one epoch
    if world == 1:
        assert len(rows) == (n if full or n <= loop else loop)
