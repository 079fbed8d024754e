"""Lloyd k-means in torch, batched over independent groups, on any device.

One implementation serves the IVF centroids on CUDA (:mod:`qinco2.ivf`), the coarse centres
and the product-quantizer codebooks of :mod:`qinco2.ivfpq` (one group per sub-space). The
points may stay on the host: distances are computed block by block on ``device`` so that one
``(G, rows, K)`` float32 block stays under ``max_bytes``.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

KMEANS_MAX_BYTES = 1 << 28  # bytes of one (G, rows, K) distance block


def nearest(x_GND: torch.Tensor, centroids_GKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared L2 distance ``(G, N)`` to, and id ``(G, N)`` of, the nearest centroid per group."""
    c_sq_GK = (centroids_GKD ** 2).sum(-1)
    d_GNK = torch.baddbmm(c_sq_GK[:, None, :], x_GND, centroids_GKD.transpose(1, 2), alpha=-2)
    d_GN, ids_GN = d_GNK.min(-1)
    return (d_GN + (x_GND ** 2).sum(-1)).clamp_min(0), ids_GN


def kmeans(x_GND: torch.Tensor, K: int, *, niter: int = 20, generator: torch.Generator | None = None,
           device=None, max_bytes: int = KMEANS_MAX_BYTES, progress: bool = False,
           desc: str = "k-means") -> torch.Tensor:
    """Centroids ``(G, K, D)`` float32 on ``device`` (default: that of ``x_GND``) of each of
    the ``G`` groups of ``N`` points. Initial centroids are random distinct points (drawn with
    replacement when ``N < K``); an empty cluster restarts from a random point of its group."""
    G, N, D = x_GND.shape
    if N == 0 or K < 1:
        raise ValueError(f"k-means needs points and K >= 1, got N={N}, K={K}")
    device = x_GND.device if device is None else torch.device(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    rows = max(1, max_bytes // (4 * K * G))
    init_GK = (torch.randperm(N, generator=gen)[:K] if N >= K else torch.randint(N, (K,), generator=gen))
    centroids_GKD = x_GND[:, init_GK.to(x_GND.device)].to(device, torch.float32)
    bar = tqdm(range(niter), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        sums_GKD = torch.zeros(G, K, D, device=device)
        counts_GK = torch.zeros(G, K, device=device)
        sq_err = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(0, N, rows):
            x_GRD = x_GND[:, i:i + rows].to(device, torch.float32, non_blocking=True)
            d_GR, ids_GR = nearest(x_GRD, centroids_GKD)
            sq_err += d_GR.sum(dtype=torch.float64)
            sums_GKD.scatter_add_(1, ids_GR[..., None].expand(-1, -1, D), x_GRD)
            counts_GK.scatter_add_(1, ids_GR, torch.ones_like(d_GR))
        centroids_GKD = sums_GKD / counts_GK.clamp_min(1)[..., None]
        empty_GK = counts_GK == 0
        n_empty = int(empty_GK.sum())
        if n_empty:
            g, _ = empty_GK.nonzero(as_tuple=True)
            restart = torch.randint(N, (n_empty,), generator=gen)
            centroids_GKD[empty_GK] = x_GND[g.to(x_GND.device), restart.to(x_GND.device)].to(device, torch.float32)
        bar.set_postfix(mse=f"{float(sq_err) / (G * N):.4g}", empty=n_empty)
    return centroids_GKD
