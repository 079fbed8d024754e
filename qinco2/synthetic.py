"""The embedded synthetic data set: a SIFT-like generator and its on-disk cache.

:func:`synthetic_vectors` draws the learn / base / query matrices from a seed;
:func:`stream_synthetic` / :func:`write_synthetic` draw any number of rows of the same
distribution block by block (the scale benchmark's files of 10^7 rows and more);
:func:`synthetic_files` writes them once (with exact ground truth) into
:func:`synthetic_cache_dir` and returns the file paths. The named data set built
on these files is :func:`qinco2.datasets.make_synthetic`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from qinco2.atomic import atomic_path
from qinco2.errors import InputError
from qinco2.formats import write_vectors

SYNTHETIC_VERSION = 1
SYNTHETIC_FILES = ("learn.fvecs", "base.fvecs", "query.fvecs", "groundtruth.ivecs")

_SYNTH_D = 64
_SYNTH_CLUSTERS = 50
_SYNTH_ROWS = {"learn": 60_000, "base": 20_000, "query": 500}
_SYNTH_K = 100


def synthetic_cache_dir(root: str | Path | None = None, *, seed: int = 0) -> Path:
    """``<root, or $QINCO2_CACHE, or ~/.cache/qinco2>/synthetic-v<version>-s<seed>``."""
    if root is None:
        env = os.environ.get("QINCO2_CACHE")
        root = Path(env) if env else Path.home() / ".cache" / "qinco2"
    return Path(root).expanduser() / f"synthetic-v{SYNTHETIC_VERSION}-s{seed}"


def synthetic_vectors(seed: int = 0) -> dict[str, np.ndarray]:
    """Draw the synthetic learn / base / query matrices (float32, integer-valued, 0..255).

    A mixture of 50 clusters of unequal weight. Each cluster has a sparse
    non-negative centre and an anisotropic spread (a random rotation times
    per-axis scales decaying like ``i**-0.4``); the noise is multivariate
    Student-t (4 degrees of freedom), so a few vectors lie far out. Negative
    values are set to 0 and the rest rounded, as SIFT descriptors are.
    Learn, base and query are successive draws from the same generator.
    The statistics are close to SIFT's (mean ~27, std ~34, ~30% zeros, median
    nearest-neighbour distance ~0.4 of the median norm): clustered, but not so
    much that the clusters alone describe the data.
    """
    rng = np.random.default_rng(seed)
    draw = _mixture(rng)
    return {split: draw(n, rng) for split, n in _SYNTH_ROWS.items()}


def _mixture(rng: np.random.Generator):
    """Draw the mixture's parameters from ``rng``; returns ``draw(n, rng)`` of ``(n, D)`` rows."""
    D, C, dof = _SYNTH_D, _SYNTH_CLUSTERS, 4.0
    weights_C = rng.lognormal(0.0, 1.0, C)
    weights_C /= weights_C.sum()
    centres_CD = rng.gamma(0.5, 20.0, (C, D))
    rotations_CDD = np.stack([np.linalg.qr(rng.standard_normal((D, D)))[0] for _ in range(C)])
    scales_CD = rng.uniform(25.0, 45.0, (C, 1)) * np.arange(1, D + 1) ** -0.4

    def draw(n: int, rng: np.random.Generator) -> np.ndarray:
        labels_N = rng.choice(C, n, p=weights_C)
        z_ND = rng.standard_normal((n, D)) * np.sqrt(dof / rng.chisquare(dof, n))[:, None]
        x_ND = np.empty((n, D))
        for c in range(C):
            rows = np.flatnonzero(labels_N == c)
            x_ND[rows] = centres_CD[c] + (z_ND[rows] * scales_CD[c]) @ rotations_CDD[c].T
        return np.rint(np.clip(2.0 * x_ND, 0.0, 255.0)).astype(np.float32)

    return draw


def stream_synthetic(n: int, *, seed: int = 0, stream: int = 1, chunk_rows: int = 1 << 18):
    """Yield ``n`` rows of the synthetic distribution (the embedded set's mixture for ``seed``)
    as uint8 ``(<= chunk_rows, 64)`` blocks; ``stream`` picks an independent sequence of rows
    (streams 1, 2, ...: a database and its queries); the same rows for the same ``seed``,
    ``stream`` and ``chunk_rows``. Memory: one block."""
    draw = _mixture(np.random.default_rng(seed))
    rng = np.random.default_rng([seed, stream])
    for start in range(0, n, chunk_rows):
        yield draw(min(chunk_rows, n - start), rng).astype(np.uint8)


def write_synthetic(path, n: int, *, seed: int = 0, stream: int = 1, chunk_rows: int = 1 << 18) -> Path:
    """Stream ``n`` synthetic rows (uint8, D=64) to the ``.npy`` file ``path`` (written to a
    temporary name, then renamed), block by block: files far larger than RAM."""
    path = Path(path)
    if path.suffix != ".npy":
        raise InputError(f"write_synthetic writes .npy files, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        out_ND = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, _SYNTH_D))
        start = 0
        for block in stream_synthetic(n, seed=seed, stream=stream, chunk_rows=chunk_rows):
            out_ND[start:start + len(block)] = block
            start += len(block)
        out_ND.flush()
        del out_ND
    return path


def synthetic_files(root: str | Path | None = None, *, seed: int = 0) -> list[Path]:
    """Paths of the synthetic set's files, generated on first use into :func:`synthetic_cache_dir`.

    ``learn.fvecs`` (60,000 x 64), ``base.fvecs`` (20,000 x 64), ``query.fvecs``
    (500 x 64) and ``groundtruth.ivecs`` (exact L2 top-100 over base), in that
    order; bit-identical for a given seed. The folder is written to a temporary
    sibling and renamed, so a reader never sees a half-written set.
    """
    folder = synthetic_cache_dir(root, seed=seed)
    files = [folder / name for name in SYNTHETIC_FILES]
    if not folder.is_dir():
        _write_synthetic(folder, files, seed)
    return files


def _write_synthetic(folder: Path, files: list[Path], seed: int) -> None:
    """Generate the set into a temporary sibling of ``folder``, then rename it to ``folder``."""
    import faiss  # here, so that importing qinco2.synthetic does not load faiss

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        x = synthetic_vectors(seed)
        index = faiss.IndexFlatL2(_SYNTH_D)  # exact: the values are small integers
        index.add(x["base"])
        x["groundtruth"] = index.search(x["query"], _SYNTH_K)[1].astype(np.int32)
        for split, path in zip(("learn", "base", "query", "groundtruth"), files, strict=True):
            write_vectors(tmp / path.name, x[split])
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
