"""Lloyd k-means: the one implementation behind every k-means of qinco2.

:func:`kmeans` serves the IVF centroids (:mod:`qinco2.ivf`), the coarse centres and the
product-quantizer codebooks of :mod:`qinco2.ivfpq` (one group per sub-space), the residual
quantisation that initialises the codec (:mod:`qinco2.codec.rq_init`) and the weighted k-means
of the IVF sub-codes (:mod:`qinco2.ivfsearch.pairwise`).

* Points: numpy (possibly memory-mapped, of any numeric dtype) or torch, ``(N, D)`` or
  ``G`` independent groups ``(G, N, D)``. They are read block by block and converted to
  float32 per block, so the data never exist as one float32 copy; one block of rows and its
  ``(G, rows, K)`` distances stay under ``max_bytes``. On a GPU, points whose float32 copy
  fits in ``max_bytes`` move there once instead of once per iteration.
* Assignment: faiss brute force (BLAS) on the CPU, :func:`nearest` (torch ``baddbmm``) on
  other devices. The loop, the sums (float64), the counts (int64; float64 weight sums with
  ``weights``) and the empty-cluster handling are ours, so every caller gets the same
  behaviour and a ``progress(iteration, niter, mse)`` callback once per iteration.
* Initialisation: ``K`` distinct random rows (drawn with probability proportional to their
  weight with ``weights``; all rows plus random repeats when ``N < K``), or ``init``.
* Empty clusters (no point, or no weight): faiss-style split. The cluster with the largest
  squared error is copied and both copies are moved apart by a small symmetric random
  perturbation (``SPLIT_EPS`` times the cluster's RMS radius), so the next assignment divides
  its points by a hyperplane through its mean.
* Randomness comes only from ``seed`` (an int, or a ``torch.Generator`` that is advanced). On
  the CPU the result is bit-for-bit reproducible; on CUDA the float64 scatter-adds may sum in
  another order (last-bit differences).
* The loop stops early at a fixed point (centroids unchanged, nothing split): further
  iterations would return the same centroids; ``progress`` then reports ``niter`` at once.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import faiss
import numpy as np
import torch

from .errors import InputError
from .progress import progress_bar

KMEANS_MAX_BYTES = 1 << 28  # bytes of one block: its float32/float64 rows and (G, rows, K) distances
SPLIT_EPS = 1 / 1024  # perturbation of a split cluster, relative to its RMS radius

Progress = Callable[[int, int, float], None]
_TORCH_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def nearest(x_GND: torch.Tensor, centroids_GKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distance ``(G, N)`` to, and id ``(G, N)`` of, the nearest centroid per group."""
    c_sq_GK = (centroids_GKD ** 2).sum(-1)
    d_GNK = torch.baddbmm(c_sq_GK[:, None, :], x_GND, centroids_GKD.transpose(1, 2), alpha=-2)
    d_GN, ids_GN = d_GNK.min(-1)
    return (d_GN + (x_GND ** 2).sum(-1)).clamp_min(0), ids_GN


def _nearest_block(x_GRD: torch.Tensor, c_GKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest`, computed by faiss (BLAS) when the tensors are on the CPU."""
    if c_GKD.device.type != "cpu":
        return nearest(x_GRD, c_GKD)
    x, c = x_GRD.numpy(), c_GKD.numpy()
    found = [faiss.knn(x[g], c[g], 1) for g in range(len(c))]
    d_GR = torch.from_numpy(np.stack([d[:, 0] for d, _ in found]))
    ids_GR = torch.from_numpy(np.stack([i[:, 0] for _, i in found]))
    return d_GR.clamp_min_(0), ids_GR


@contextlib.contextmanager
def kmeans_progress(niter: int, desc: str = "k-means", enabled: bool = True) -> Iterator[Progress | None]:
    """A ``progress`` callback that drives a tqdm bar over the iterations (None if not enabled).

    >>> with kmeans_progress(20, "IVF k-means") as bar:              # doctest: +SKIP
    ...     centroids_KD = kmeans(x_ND, 1024, progress=bar)
    """
    if not enabled:
        yield None
        return
    with progress_bar(total=niter, desc=desc, leave=False) as bar:
        def update(iteration: int, niter: int, mse: float) -> None:
            bar.update(iteration - bar.n)
            bar.set_postfix(mse=f"{mse:.4g}", refresh=False)
        yield update


class _Points:
    """The ``(G, N, D)`` points, read as float32 blocks on ``device``."""

    def __init__(self, x, device, max_bytes: int):
        if not isinstance(x, (np.ndarray, torch.Tensor)) or x.ndim not in (2, 3):
            raise InputError(f"k-means points must be a numpy array or torch tensor of shape (N, D) or "
                             f"(G, N, D), got {getattr(x, 'shape', type(x).__name__)}")
        numeric = (x.dtype.kind in "iuf" if isinstance(x, np.ndarray)
                   else x.is_floating_point() or x.dtype in _TORCH_INTS)
        if not numeric:
            raise InputError(f"k-means points must hold integers or floats, got dtype {x.dtype}")
        self.numpy_in = self.is_numpy = isinstance(x, np.ndarray)
        self.grouped = x.ndim == 3
        self.x = x if self.grouped else x[None]
        self.G, self.N, self.D = self.x.shape
        if self.N == 0 or self.D == 0:
            raise InputError(f"k-means needs at least one point of dimension >= 1, got shape {tuple(x.shape)}")
        self.device = torch.device(("cpu" if self.is_numpy else x.device) if device is None else device)
        if self.device.type != "cpu" and 4 * self.G * self.N * self.D <= max_bytes:
            self.x, self.is_numpy = self.convert(self.x), False      # small: move once, not per iteration

    def convert(self, x_block) -> torch.Tensor:
        if isinstance(x_block, np.ndarray):
            x_block = torch.from_numpy(np.ascontiguousarray(x_block, dtype=np.float32))
        return x_block.detach().to(self.device, torch.float32).contiguous()

    def rows(self, ids_R: np.ndarray) -> torch.Tensor:
        """``(G, R, D)`` float32 rows ``ids_R`` of every group."""
        if not self.is_numpy:
            return self.convert(self.x[:, torch.from_numpy(ids_R).to(self.x.device)])
        order = np.argsort(ids_R, kind="stable")                    # sorted reads of a memmap
        picked = np.empty((self.G, len(ids_R), self.D), dtype=np.float32)
        picked[:, order] = self.x[:, ids_R[order]]
        return self.convert(picked)

    def blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for i in range(0, self.N, rows):
            yield i, self.convert(self.x[:, i:i + rows])

    def output(self, c_GKD: torch.Tensor):
        c_GKD = c_GKD if self.grouped else c_GKD[0]
        return c_GKD.cpu().numpy() if self.numpy_in else c_GKD


def _check_weights(weights, N: int) -> torch.Tensor | None:
    """The weights as a CPU float64 tensor ``(N,)``, or :class:`InputError`."""
    if weights is None:
        return None
    w_N = torch.as_tensor(np.asarray(weights) if not isinstance(weights, torch.Tensor) else weights)
    w_N = w_N.detach().cpu().to(torch.float64)
    if w_N.shape != (N,):
        raise InputError(f"k-means weights must have shape ({N},), one per point, got {tuple(w_N.shape)}")
    if not (torch.isfinite(w_N).all() and (w_N >= 0).all() and w_N.sum() > 0):
        raise InputError("k-means weights must be finite and >= 0, with a positive sum")
    return w_N


def _distinct_rows(N: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """``K <= N / 2`` distinct random row ids in ``[0, N)``, without an ``(N,)`` permutation."""
    ids = torch.empty(0, dtype=torch.int64)
    while len(ids) < K:
        draws = torch.cat([ids, torch.randint(N, (2 * K,), generator=gen)])
        _, first = np.unique(draws.numpy(), return_index=True)
        ids = draws[np.sort(first)]                                 # first occurrences, in draw order
    return ids[:K]


def _initial_rows(N: int, K: int, w_N: torch.Tensor | None, gen: torch.Generator) -> np.ndarray:
    """``K`` row ids: distinct random rows (with ``w_N``: drawn with probability proportional
    to the weight, by exponential keys), then random repeats when ``N < K``."""
    if w_N is not None:
        keys_N = torch.empty(N, dtype=torch.float64).exponential_(generator=gen) / w_N  # weight 0: inf
        ids = torch.sort(keys_N, stable=True).indices[:K]
    elif 2 * K > N:
        ids = torch.randperm(N, generator=gen)[:K]
    else:
        ids = _distinct_rows(N, K, gen)
    if len(ids) < K:
        ids = torch.cat([ids, torch.randint(N, (K - len(ids),), generator=gen)])
    return ids.numpy()


def _initial_centroids(points: _Points, K: int, init, w_N, gen) -> torch.Tensor:
    if init is None:
        return points.rows(_initial_rows(points.N, K, w_N, gen))
    init = torch.as_tensor(np.asarray(init) if not isinstance(init, torch.Tensor) else init)
    c_GKD = init.detach().to(points.device, torch.float32)
    c_GKD = c_GKD.clone() if points.grouped else c_GKD[None].clone()
    if c_GKD.shape != (points.G, K, points.D) or not torch.isfinite(c_GKD).all():
        shape = (points.G, K, points.D) if points.grouped else (K, points.D)
        raise InputError(f"k-means init must be finite centroids of shape {shape}, got {tuple(init.shape)}")
    return c_GKD


def _assign_and_sum(points: _Points, c_GKD: torch.Tensor, w_N: torch.Tensor | None, rows: int):
    """Assign every point to its nearest centroid. Returns per cluster the float64 sums
    ``(G, K, D)`` of its (weighted) points, its mass ``(G, K)`` (int64 counts, or float64
    weight sums) and its float64 (weighted) squared error ``(G, K)``."""
    G, K, D = c_GKD.shape
    dev = c_GKD.device
    sums = torch.zeros(G * K, D, dtype=torch.float64, device=dev)
    sse = torch.zeros(G * K, dtype=torch.float64, device=dev)
    mass = torch.zeros(G * K, dtype=torch.int64 if w_N is None else torch.float64, device=dev)
    offsets_G1 = torch.arange(G, device=dev)[:, None] * K
    for i, x_GRD in points.blocks(rows):
        d_GR, ids_GR = _nearest_block(x_GRD, c_GKD)
        flat = (ids_GR.to(dev) + offsets_G1).reshape(-1)
        x_flat, d_flat = x_GRD.reshape(-1, D).double(), d_GR.to(dev).reshape(-1).double()
        if w_N is None:
            mass += torch.bincount(flat, minlength=G * K)
        else:
            w_flat = w_N[i:i + x_GRD.shape[1]].repeat(G)             # the same weights in every group
            mass.index_add_(0, flat, w_flat)
            x_flat, d_flat = x_flat * w_flat[:, None], d_flat * w_flat
        sums.index_add_(0, flat, x_flat)
        sse.index_add_(0, flat, d_flat)
    return sums.view(G, K, D), mass.view(G, K), sse.view(G, K)


def _split_empty(c_GKD: torch.Tensor, mass_GK: torch.Tensor, sse_GK: torch.Tensor,
                 gen: torch.Generator) -> int:
    """Give every empty cluster half of the cluster with the largest squared error (in place):
    both take its centroid, moved apart by a symmetric random perturbation. Returns how many
    clusters were split; groups whose clusters all have zero error keep their empty ones."""
    empty = (mass_GK == 0).nonzero().tolist()
    if not empty:
        return 0
    c, mass, sse = c_GKD.cpu(), mass_GK.double().cpu(), sse_GK.cpu().clone()
    n_split = 0
    for g, k in empty:
        j = int(sse[g].argmax())
        if sse[g, j] <= 0:
            continue
        u_D = torch.randn(c.shape[2], generator=gen, dtype=torch.float64)
        u_D *= SPLIT_EPS * float(sse[g, j] / mass[g, j]) ** 0.5 / u_D.norm()
        c_D = c[g, j].double()
        c[g, k], c[g, j] = c_D + u_D, c_D - u_D
        mass[g, j] /= 2
        sse[g, j] /= 2
        mass[g, k], sse[g, k] = mass[g, j], sse[g, j]                 # estimates for the next split
        n_split += 1
    if c is not c_GKD:
        c_GKD.copy_(c)
    return n_split


def kmeans(x, K: int, *, niter: int = 20, weights=None, init=None, seed: int | torch.Generator = 0,
           device=None, progress: Progress | None = None, max_bytes: int = KMEANS_MAX_BYTES):
    """k-means centroids of ``x`` by ``niter`` Lloyd iterations.

    ``x``: ``(N, D)`` or ``G`` independent groups ``(G, N, D)``, numpy (may be memory-mapped,
    any numeric dtype) or torch. ``weights``: optional ``(N,)`` non-negative weight per point
    (the same in every group); centroids are weighted means. ``init``: optional initial
    centroids ``(K, D)`` / ``(G, K, D)``, else ``K`` random rows. ``seed``: an int, or a
    ``torch.Generator`` to draw from. ``device``: where the assignment runs (default: CPU for
    numpy, the tensor's device for torch); faiss on the CPU, torch elsewhere. ``progress``:
    called as ``progress(iteration, niter, mse)`` after each iteration (``mse``: the mean
    (weighted) squared distance to the centroids of that iteration's assignment). ``max_bytes``
    bounds the memory of one block of rows.

    Returns float32 centroids ``(K, D)`` / ``(G, K, D)``: numpy for numpy ``x``, else a tensor
    on ``device``. See the module docstring for initialisation, empty clusters, determinism.
    """
    points = _Points(x, device, max_bytes)
    if int(K) != K or K < 1 or int(niter) != niter or niter < 0 or max_bytes < 1:
        raise InputError(f"k-means needs an integer K >= 1, niter >= 0 and max_bytes >= 1; got K={K}, "
                         f"niter={niter}, max_bytes={max_bytes}")
    K, niter, (G, N, D) = int(K), int(niter), (points.G, points.N, points.D)
    w_N = _check_weights(weights, N)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    c_GKD = _initial_centroids(points, K, init, w_N, gen)
    dist_cells = 0 if points.device.type == "cpu" else K   # faiss blocks its distances itself
    rows = max(1, max_bytes // (4 * G * (dist_cells + 5 * D + 6)))  # f32 distances, f32/f64 rows, ids
    total = G * (N if w_N is None else float(w_N.sum()))
    w_N = None if w_N is None else w_N.to(points.device)
    for iteration in range(1, niter + 1):
        sums_GKD, mass_GK, sse_GK = _assign_and_sum(points, c_GKD, w_N, rows)
        filled_GK = mass_GK > 0
        means_GKD = sums_GKD / torch.where(filled_GK, mass_GK, 1).to(torch.float64)[..., None]
        new_GKD = torch.where(filled_GK[..., None], means_GKD.float(), c_GKD)
        n_split = _split_empty(new_GKD, mass_GK, sse_GK, gen)
        fixed_point = n_split == 0 and torch.equal(new_GKD, c_GKD)
        c_GKD = new_GKD
        if progress is not None:
            progress(niter if fixed_point else iteration, niter, float(sse_GK.sum()) / total)
        if fixed_point:                      # the remaining iterations would change nothing
            break
    return points.output(c_GKD)
