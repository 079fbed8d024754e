"""IVF coarse quantizer: k-means centroids in raw space and exact nearest-centroid assignment
(spec section 8.1).

The centroids ``(C, D)`` float32 are the frozen first step of an IVF model
(``QincoCodec.train(..., ivf_centroids=...)``). Inputs may be uint8 or float, in memory or
memory-mapped: they are read ``_READ_ROWS`` rows at a time and converted to float32 per chunk.

k-means runs with faiss on the CPU; on a CUDA device a torch k-means (chunked distances under
a byte budget) runs instead, as faiss is often built without GPU support.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import InputError
from .kmeans import kmeans

log = logging.getLogger(__name__)

MIN_POINTS_PER_CENTROID = 39  # below this many training vectors per centroid, warn (as faiss)
_READ_ROWS = 65_536  # rows converted to float32 at a time
_KMEANS_MAX_BYTES = 1 << 30  # torch k-means: bytes of one (rows, C) distance block


def _check_x(x, what: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise InputError(f"{what} must be a 2-D numpy array (N, D), got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype.kind not in "iuf":
        raise InputError(f"{what} must hold integers or floats, got dtype {x.dtype}")
    return x


def check_centroids(centroids, D: int) -> np.ndarray:
    """``centroids`` as a C-contiguous float32 ``(C, D)`` array, or :class:`InputError`."""
    c_CD = _check_x(centroids, "IVF centroids")
    if len(c_CD) == 0:
        raise InputError("the IVF centroid table is empty; it needs at least one row")
    if c_CD.shape[1] != D:
        raise InputError(
            f"the IVF centroids have dimension {c_CD.shape[1]} but the data have dimension {D}; "
            f"produce centroids of this data with `qinco2 task=ivf_centroids ivf_K={len(c_CD)} "
            "trainset=<training vectors> output=centroids.npy`")
    c_CD = np.ascontiguousarray(c_CD, dtype=np.float32)
    if not np.isfinite(c_CD).all():
        raise InputError("the IVF centroids contain NaN or Inf values")
    return c_CD


def _blocks(x: np.ndarray, rows: int = _READ_ROWS, progress: bool = False, desc: str = ""):
    """``(start, float32 block)`` over the rows of ``x``."""
    for i in tqdm(range(0, len(x), rows), desc=desc, disable=not progress, leave=False):
        yield i, np.ascontiguousarray(x[i:i + rows], dtype=np.float32)


def _sample(x: np.ndarray, n: int, seed: int, progress: bool) -> np.ndarray:
    """``n`` rows of ``x`` drawn without replacement (all rows when ``n >= N``), float32."""
    ids = None
    if n < len(x):
        ids = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    n = min(n, len(x))
    out_ND = np.empty((n, x.shape[1]), dtype=np.float32)
    for i in tqdm(range(0, n, _READ_ROWS), desc="read", disable=not progress, leave=False):
        out_ND[i:i + _READ_ROWS] = x[i:i + _READ_ROWS] if ids is None else x[ids[i:i + _READ_ROWS]]
    return out_ND


def train_ivf_centroids(x: np.ndarray, K: int, *, niter: int = 20, seed: int = 0,
                        max_points_per_centroid: int = 256, progress: bool = True,
                        device=None) -> np.ndarray:
    """k-means centroids ``(K, D)`` float32 of the rows of ``x``.

    At most ``max_points_per_centroid * K`` rows, drawn with ``seed``, are clustered.
    ``device`` None or a CPU device: faiss k-means; a CUDA device: torch k-means there.
    """
    x = _check_x(x)
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
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return _faiss_kmeans(x_ND, K, niter=niter, seed=seed, progress=progress)
    return _torch_kmeans(x_ND, K, niter=niter, seed=seed, device=device, progress=progress)


def _faiss_kmeans(x_ND: np.ndarray, K: int, *, niter: int, seed: int, progress: bool) -> np.ndarray:
    """faiss k-means, one iteration per ``train`` call so that the bar follows the iterations
    (the same result as one call with ``niter``: each call continues from the centroids)."""
    centroids_KD = None
    bar = tqdm(range(niter), desc="k-means", disable=not progress, leave=False)
    for _ in bar:
        km = faiss.Kmeans(x_ND.shape[1], K, niter=1, seed=seed, verbose=False,
                          max_points_per_centroid=-(-len(x_ND) // K),  # the sample is already drawn
                          min_points_per_centroid=1)  # we warn ourselves
        km.train(x_ND, init_centroids=centroids_KD)
        centroids_KD = km.centroids
        bar.set_postfix(mse=f"{km.obj[-1] / len(x_ND):.4g}")
    return np.ascontiguousarray(centroids_KD, dtype=np.float32)


def _torch_kmeans(x_ND: np.ndarray, K: int, *, niter: int, seed: int, device, progress: bool,
                  max_bytes: int = _KMEANS_MAX_BYTES) -> np.ndarray:
    """:func:`qinco2.kmeans.kmeans` on ``device``; the data move there when they fit
    ``max_bytes``, else block by block."""
    x = torch.from_numpy(np.ascontiguousarray(x_ND, dtype=np.float32))
    if x.nbytes <= max_bytes:
        x = x.to(device)
    gen = torch.Generator().manual_seed(seed)
    centroids_1KD = kmeans(x[None], K, niter=niter, generator=gen, device=device,
                           max_bytes=max_bytes, progress=progress)
    return centroids_1KD[0].cpu().numpy()


def assign_to_centroids(x: np.ndarray, centroids: np.ndarray, *, batch: int = 65_536,
                        progress: bool = False) -> np.ndarray:
    """Id ``(N,)`` int64 of the exact L2-nearest centroid of each row (faiss brute force)."""
    x = _check_x(x)
    c_CD = check_centroids(centroids, x.shape[1])
    ids_N = np.empty(len(x), dtype=np.int64)
    for i, x_ND in _blocks(x, batch, progress, "assign"):
        ids_N[i:i + len(x_ND)] = faiss.knn(x_ND, c_CD, 1)[1][:, 0]
    return ids_N
