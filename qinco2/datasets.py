"""Named data sets, their splits and size limits, and the synthetic default.

A :class:`Dataset` is a set of file paths (training file, database, queries,
ground truth) plus the MSE scale used to report errors and the metric its
queries are searched by (``"l2"``; ``"ip"``, inner product, for ``contriever1M`` and
``wordnet-minilm``, whose vectors have unit norm). Files are opened
memory-mapped in their native dtype (uint8 ``.bvecs`` stay uint8, float16
``.npy`` stay float16); callers convert batch by batch.

Splits (training file of ``n`` rows, limits in :class:`DataLimits`):

* validation = the last ``valset`` rows of the training file (``valset <= n / 2``);
* training = the rows before it, truncated to the first ``trainset`` rows if set;
* test = the database, truncated to its first ``min(db_limit, db)`` rows.

Names are looked up in :data:`DATASETS` under a data root (see :func:`data_roots`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qinco2.errors import DatasetError
from qinco2.formats import count_vectors, open_vectors, read_vectors
from qinco2.synthetic import synthetic_files

SYNTHETIC = "synthetic"


@dataclass(frozen=True)
class DataLimits:
    """Row limits: the CLI's ``ds.valset``, ``ds.trainset``, ``ds.db`` and ``ds.loop``."""

    valset: int = 10_000
    trainset: int | None = None
    db: int | None = None
    loop: int = 10_000_000


@dataclass(frozen=True)
class DatasetEntry:
    """Where a named data set lives: file names relative to ``<data root>/<folder>``."""

    folder: str
    trainset: str
    db: str
    queries: str
    groundtruth: str
    mse_scale: float = 1.0
    db_limit: int | None = None
    script: str | None = None  # download script in scripts/download/, None for local sets
    small: bool = False  # the script's -small variant is enough for this set
    metric: str = "l2"  # how the set is searched: "l2" distance or "ip" (inner product)


_BIGANN = ("bigann", "bigann_learn.bvecs", "bigann_base.bvecs", "bigann_query.bvecs")
_DEEP = ("deep1b", "learn.fvecs", "base.fvecs", "deep1B_queries.fvecs")
_NPY = ("database1M.npy", "queries.npy", "ground_truth1M.npy")

DATASETS: dict[str, DatasetEntry] = {
    # The paper's sets, laid out as scripts/download/*.sh write them.
    "bigann1M": DatasetEntry(*_BIGANN, "gnd/idx_1M.ivecs", 1e-4, 1_000_000, "bigann.sh", True),
    "bigann1B": DatasetEntry(*_BIGANN, "gnd/idx_1000M.ivecs", 1e-4, None, "bigann.sh"),
    "deep1M": DatasetEntry(*_DEEP, "deep1M_groundtruth.ivecs", 1.0, 1_000_000, "deep1b.sh", True),
    "deep1B": DatasetEntry(*_DEEP, "deep1B_groundtruth.ivecs", 1.0, None, "deep1b.sh"),
    # Contriever embeddings are searched by inner product (metric "ip").
    "contriever1M": DatasetEntry("contriever", "training_set.npy", *_NPY, script="contriever.sh",
                                 metric="ip"),
    "FB_ssnpp1M": DatasetEntry("fb_ssnpp", "training_set10010k.npy", *_NPY, 1e-4,
                               script="fb_ssnpp.sh"),
    # Local real sets (shared/data). sift-photos is SIFT like BigANN, hence the same scale.
    "sift-photos": DatasetEntry("sift-photos", "learn.bvecs", "base.bvecs", "query.bvecs",
                                "groundtruth.ivecs", 1e-4),
    # These three have no learn file: the base file doubles as the training file.
    "siftsmall": DatasetEntry("siftsmall", "siftsmall_base.fvecs", "siftsmall_base.fvecs",
                              "siftsmall_query.fvecs", "siftsmall_groundtruth.ivecs", 1e-4),
    "fmnistsmall": DatasetEntry("fmnistsmall", "fmnistsmall_base.fvecs", "fmnistsmall_base.fvecs",
                                "fmnistsmall_query.fvecs", "fmnistsmall_groundtruth.ivecs"),
    "sigmod2024_yfcc_clip100": DatasetEntry("sigmod2024_yfcc_clip100", "base.fvecs", "base.fvecs",
                                            "query.fvecs", "groundtruth.ivecs"),
    # Unit-norm sentence embeddings (all-MiniLM-L6-v2, D=384), searched by inner product; the
    # training file is float16 (read and converted batch by batch); the ground truth is the
    # exact L2 top-100, the same ranking as inner product for unit-norm vectors.
    "wordnet-minilm": DatasetEntry("wordnet-minilm", "learn.npy", "base.npy", "query.npy",
                                   "groundtruth.npy", metric="ip"),
}


def dataset_names() -> list[str]:
    """All names accepted by :func:`resolve_dataset`."""
    return [SYNTHETIC, *DATASETS]


@dataclass(frozen=True)
class Dataset:
    """Paths of one data set's files, with its MSE scale, forced database limit and search
    metric (``"l2"``, or ``"ip"`` for inner-product data such as text embeddings)."""

    name: str
    trainset: Path | None
    db: Path | None
    queries: Path | None
    groundtruth: Path | None
    mse_scale: float = 1.0
    db_limit: int | None = None
    metric: str = "l2"

    @property
    def dim(self) -> int:
        """Data dimension D (of the first vector file present)."""
        for path in (self.trainset, self.db, self.queries):
            if path is not None:
                return count_vectors(path)[1]
        raise DatasetError(f"data set {self.name!r} has no vector file, so it has no dimension")

    def train_val(self, limits: DataLimits = DataLimits()) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped (training, validation) views of the training file, native dtype.

        Validation is the last ``limits.valset`` rows; training is the rows before
        them, cut to the first ``limits.trainset`` rows when that is set.
        """
        x_ND = open_vectors(self._require(self.trainset, "training", "trainset"))
        n = len(x_ND)
        if limits.valset < 0 or 2 * limits.valset > n:
            raise DatasetError(
                f"ds.valset={limits.valset}: the validation rows are taken from the end of "
                f"{self.trainset} ({n} rows) and may be at most half of it; use 0 <= "
                f"ds.valset <= {n // 2}"
            )
        _check_limit("ds.trainset", limits.trainset)
        train = x_ND[: n - limits.valset]
        if limits.trainset is not None:
            train = train[: limits.trainset]
        return train, x_ND[n - limits.valset :]

    def database(self, limits: DataLimits = DataLimits()) -> np.ndarray:
        """Memory-mapped view of the first ``min(db_limit, limits.db)`` database rows."""
        _check_limit("ds.db", limits.db)
        x_ND = open_vectors(self._require(self.db, "database", "db"))
        caps = [c for c in (self.db_limit, limits.db) if c is not None]
        return x_ND[: min(caps)] if caps else x_ND

    def query_vectors(self) -> np.ndarray:
        """The queries as an in-memory float32 (Q, D) array."""
        return read_vectors(self._require(self.queries, "query", "queries"), dtype=np.float32)

    def ground_truth(self) -> np.ndarray:
        """Ids of the true neighbours of each query, int64 (Q, k), nearest first (k may be 1)."""
        path = self._require(self.groundtruth, "ground-truth", "queries_gt")
        # a small file read whole: read_vectors checks every record header of a *vecs file
        gt = _open_ground_truth(path) if path.suffix.lower() == ".npy" else read_vectors(path)
        gt_QK = np.array(gt, dtype=np.int64).reshape(len(gt), -1)
        if len(gt_QK) and gt_QK.min() < 0:
            raise DatasetError(f"ground truth {self.groundtruth} holds negative ids")
        return gt_QK

    def _require(self, path: Path | None, what: str, argument: str) -> Path:
        if path is None:
            raise DatasetError(f"data set {self.name!r} has no {what} file; pass {argument}=<path>")
        return path


def _open_ground_truth(path: Path) -> np.ndarray:
    """Memory-map a ground-truth file; a 1-D ``.npy`` (one id per query) is accepted too."""
    if path.suffix.lower() == ".npy":
        try:
            ids = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot be read as a .npy ground-truth file ({e})") from e
        if ids.ndim == 1:
            return ids[:, None]
    return open_vectors(path)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise DatasetError(f"{name}={value}: expected a positive number of rows or None")


# ---------------------------------------------------------------------------
# Resolving names and paths


def data_roots(data_root: str | Path | None = None) -> list[Path]:
    """Folders searched for named data sets, in order.

    ``data_root`` if given, ``$QINCO2_DATA``, ``./data``, ``../shared/data`` (both
    relative to the working directory) and ``shared/data`` next to the repository.
    """
    repo_parent = Path(__file__).resolve().parents[2]  # the repository sits next to shared/
    candidates = [data_root, os.environ.get("QINCO2_DATA") or None, "data",
                  Path("..", "shared", "data"), repo_parent / "shared" / "data"]
    return list(dict.fromkeys(Path(c) for c in candidates if c is not None))


def _download_hint(entry: DatasetEntry, root: Path) -> str:
    if entry.script is None:
        return f"put its folder {entry.folder}/ in one of these places, or set QINCO2_DATA"
    if entry.small:
        return (f"download it with: bash scripts/download/{entry.script} -small {root} "
                "(or without -small for the full files)")
    return f"download it with: bash scripts/download/{entry.script} {root}"


def _find_named(name: str, data_root: str | Path | None) -> Dataset:
    entry = DATASETS[name]
    roots = data_roots(data_root)
    missing_per_root = []
    for root in roots:
        keys = ("trainset", "db", "queries", "groundtruth")
        paths = {key: root / entry.folder / getattr(entry, key) for key in keys}
        missing = [p for p in paths.values() if not p.is_file()]
        if not missing:
            return Dataset(name, **paths, mse_scale=entry.mse_scale, db_limit=entry.db_limit,
                           metric=entry.metric)
        missing_per_root.append(missing)
    looked = ", ".join(str((r / entry.folder).absolute()) for r in roots)
    closest = ", ".join(str(p.absolute()) for p in min(missing_per_root, key=len))
    raise DatasetError(
        f"data set {name!r} not found: looked in {looked} (the closest one lacks {closest}). "
        f"{_download_hint(entry, roots[0])}"
    )


def _as_file(path: str | Path, role: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise DatasetError(f"{role} file {p} is a directory, not a vector file; give the path of a file in it")
    if not p.is_file():
        raise DatasetError(f"{role} file {p} does not exist (expected a vector file path)")
    return p


def _check_dims(ds: Dataset) -> None:
    """All vector files share one dimension; ground truth has one row per query."""
    dims = [(p, count_vectors(p)[1]) for p in (ds.trainset, ds.db, ds.queries) if p is not None]
    for path, d in dims[1:]:
        if d != dims[0][1]:
            raise DatasetError(
                f"dimension mismatch: {dims[0][0]} has D={dims[0][1]} but {path} has D={d}; "
                "all vector files of a data set must have the same dimension"
            )
    if ds.queries is not None and ds.groundtruth is not None:
        n_q, n_gt = count_vectors(ds.queries)[0], len(_open_ground_truth(ds.groundtruth))
        if n_q != n_gt:
            raise DatasetError(
                f"{ds.queries} holds {n_q} queries but ground truth {ds.groundtruth} has "
                f"{n_gt} rows; they must match"
            )


def resolve_dataset(
    db: str | Path | None = None,
    *,
    trainset: str | Path | None = None,
    queries: str | Path | None = None,
    queries_gt: str | Path | None = None,
    data_root: str | Path | None = None,
) -> Dataset:
    """Turn a data-set name or file paths into a checked :class:`Dataset`.

    ``db`` is a name from :func:`dataset_names` or the path of a database file.
    ``trainset``, ``queries`` and ``queries_gt`` paths replace or complete the
    files of a named set. With no argument at all, the synthetic default is used.
    """
    if db is None and trainset is None and queries is None and queries_gt is None:
        db = SYNTHETIC
    if db is None:
        name = Path(trainset or queries or queries_gt).stem  # type: ignore[arg-type]
        ds = Dataset(name, None, None, None, None)  # completed by the paths below
    elif str(db) == SYNTHETIC:
        ds = make_synthetic()
    elif str(db) in DATASETS:
        ds = _find_named(str(db), data_root)
    elif Path(db).expanduser().is_file():
        path = Path(db).expanduser()
        ds = Dataset(path.stem, None, path, None, None)
    elif Path(db).expanduser().is_dir():
        raise DatasetError(f"database file {db} is a directory, not a vector file; give the path of a file in it")
    elif os.sep in str(db) or Path(db).suffix:
        raise DatasetError(f"database file {db} does not exist")
    else:
        raise DatasetError(
            f"unknown data set {str(db)!r}; valid names: {', '.join(dataset_names())} "
            "(or give the path of a vector file)"
        )
    given = {"trainset": trainset, "queries": queries, "groundtruth": queries_gt}
    overrides = {key: _as_file(value, key) for key, value in given.items() if value is not None}
    ds = dataclasses.replace(ds, **overrides)
    _check_dims(ds)
    return ds


# ---------------------------------------------------------------------------
# The embedded synthetic default


def make_synthetic(root: str | Path | None = None, *, seed: int = 0) -> Dataset:
    """The embedded default data set, generated once into a cache folder and reused.

    ``learn.fvecs`` (60,000 x 64: 50,000 training rows then 10,000 validation
    rows), ``base.fvecs`` (20,000 x 64), ``query.fvecs`` (500 x 64) and
    ``groundtruth.ivecs`` (exact L2 top-100 over base). See
    :func:`qinco2.synthetic.synthetic_vectors` for the distribution; the files are
    bit-identical for a given seed. SIFT-like values, so the MSE scale is SIFT's (1e-4).
    The folder is :func:`qinco2.synthetic.synthetic_cache_dir`; it is written to a
    temporary sibling and renamed, so a reader never sees a half-written set.
    """
    files = synthetic_files(root, seed=seed)
    return Dataset(f"{SYNTHETIC}-s{seed}" if seed else SYNTHETIC, *files, mse_scale=1e-4)
