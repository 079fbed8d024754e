"""IVF coarse quantizer: k-means centroids in raw space and exact nearest-centroid assignment
(spec section 8.1).

The centroids ``(C, D)`` float32 are the frozen first step of an IVF model
(``QincoCodec.train(..., ivf_centroids=...)``). Inputs may be uint8 or float, in memory or
memory-mapped: they are read ``_READ_ROWS`` rows at a time and converted to float32 per chunk.

k-means is :func:`qinco2.kmeans.kmeans` (faiss assignment on the CPU, torch on a CUDA device,
as faiss is often built without GPU support).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from .errors import InputError
from .kmeans import kmeans, kmeans_progress
from .progress import progress_bar
from .tensor_io import accepts_tensors
from .validation import check_finite, check_vectors

log = logging.getLogger(__name__)

IVF_NITER = 100  # Lloyd iterations of the IVF k-means, as the QINCo2 release (it stops early at a fixed point)
MIN_POINTS_PER_CENTROID = 39  # below this many training vectors per centroid, warn (as faiss)
_READ_ROWS = 65_536  # rows converted to float32 at a time


def check_centroids(centroids, D: int) -> np.ndarray:
    """``centroids`` as a C-contiguous float32 ``(C, D)`` array, or :class:`InputError`."""
    C = len(centroids) if getattr(centroids, "ndim", 0) >= 1 else "<C>"
    fix = (f"produce centroids of this data with `qinco2 task=ivf_centroids ivf_K={C} "
           "trainset=<training vectors> output=centroids.npy`")
    c_CD = check_vectors(centroids, "ivf_centroids", D, dim_owner=f"the data have dimension {D}",
                         finite=False, fix=fix)
    if len(c_CD) == 0:
        raise InputError("ivf_centroids is empty; the IVF centroid table needs at least one row")
    c_CD = np.ascontiguousarray(c_CD, dtype=np.float32)
    check_finite(c_CD, "ivf_centroids")           # after the cast: float64 overflow is caught too
    return c_CD


def _blocks(x: np.ndarray, rows: int = _READ_ROWS, progress: bool = False, desc: str = ""):
    """``(start, float32 block)`` over the rows of ``x``, each checked for NaN/Inf as it is read."""
    for i in progress_bar(range(0, len(x), rows), desc=desc, disable=not progress, leave=False):
        block = np.ascontiguousarray(x[i:i + rows], dtype=np.float32)
        check_finite(block, "x", first_row=i)
        yield i, block


def _sample(x: np.ndarray, n: int, seed: int, progress: bool) -> np.ndarray:
    """``n`` rows of ``x`` drawn without replacement (all rows when ``n >= N``), float32; only
    the rows read are checked for NaN/Inf (the error names their row in ``x``)."""
    ids = None
    if n < len(x):
        ids = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    n = min(n, len(x))
    out_ND = np.empty((n, x.shape[1]), dtype=np.float32)
    for i in progress_bar(range(0, n, _READ_ROWS), desc="read", disable=not progress, leave=False):
        out_ND[i:i + _READ_ROWS] = x[i:i + _READ_ROWS] if ids is None else x[ids[i:i + _READ_ROWS]]
    check_finite(out_ND, "x", row_ids=ids)
    return out_ND


@accepts_tensors
def train_ivf_centroids(x: np.ndarray, K: int, *, niter: int = IVF_NITER, seed: int = 0,
                        max_points_per_centroid: int = 256, progress: bool = True,
                        device=None) -> np.ndarray:
    """k-means centroids ``(K, D)`` float32 of the rows of ``x``.

    At most ``max_points_per_centroid * K`` rows, drawn with ``seed``, are clustered.
    ``device``: where :func:`qinco2.kmeans.kmeans` assigns the points (default CPU).
    """
    x = check_vectors(x, "x", finite=False)      # finiteness: of the rows read, as they are read
    if int(K) != K or K < 1 or niter < 1 or max_points_per_centroid < 1:
        raise InputError(f"need K >= 1, niter >= 1, max_points_per_centroid >= 1; got K={K}, "
                         f"niter={niter}, max_points_per_centroid={max_points_per_centroid}")
    K, N = int(K), len(x)
    if N < K:
        raise InputError(f"k-means with K={K} centroids needs at least {K} training vectors, got "
                         f"{N}; lower ivf_K or use more training vectors")
    if N < MIN_POINTS_PER_CENTROID * K:
        log.warning("k-means of %d vectors into K=%d centroids: fewer than %d vectors per "
                    "centroid, the centroids may be poor", N, K, MIN_POINTS_PER_CENTROID)
    x_ND = _sample(x, min(N, max_points_per_centroid * K), seed, progress)
    log.info("k-means: %d of %d vectors (D=%d) into K=%d centroids, %d iterations",
             len(x_ND), N, x.shape[1], K, niter)
    with kmeans_progress(niter, "k-means", progress) as bar:
        return kmeans(x_ND, K, niter=niter, seed=seed, device=device, progress=bar)


@accepts_tensors
def assign_to_centroids(x: np.ndarray, centroids: np.ndarray, *, batch: int = 65_536,
                        progress: bool = False) -> np.ndarray:
    """Id ``(N,)`` int64 of the exact L2-nearest centroid of each row (faiss brute force)."""
    x = check_vectors(x, "x", finite=False)      # finiteness: block by block in _blocks
    c_CD = check_centroids(centroids, x.shape[1])
    ids_N = np.empty(len(x), dtype=np.int64)
    for i, x_ND in _blocks(x, batch, progress, "assign"):
        ids_N[i:i + len(x_ND)] = faiss.knn(x_ND, c_CD, 1)[1][:, 0]
    return ids_N
