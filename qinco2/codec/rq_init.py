"""Starting point of training: normalisation statistics and residual-quantisation (RQ)
codebooks fitted stage by stage by k-means in raw space, mapped into the model."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from ..kmeans import kmeans
from .model import QincoModel


def fit_normalization(model: QincoModel, x_init: np.ndarray, how: str) -> None:
    """Set the model's mean/scale from (the first 100k rows of) the initialisation data."""
    x = torch.from_numpy(np.array(x_init[:100_000], dtype=np.float32))  # a copy: x_init may be read-only
    if how == "mean_std":
        model.mean.copy_(x.mean(0))
        model.scale.copy_(x.double().std(unbiased=False).float())
    else:
        model.mean.zero_()
        model.scale.copy_(x.abs().max().clamp_min(1e-12))


@torch.no_grad()
def rq_initialize(model: QincoModel, x_init: np.ndarray, noise: float, seed: int) -> None:
    """Stage-wise k-means residual quantisation in raw space, mapped into the model + noise."""
    gen = torch.Generator().manual_seed(seed)
    r = np.ascontiguousarray(x_init, dtype=np.float32).copy()
    mean, scale = model.mean.cpu(), model.scale.cpu()
    for s, step in enumerate(model.steps):
        if step.frozen:
            raw = (step.codebook.cpu() * scale + mean).numpy()
            _, assign = faiss.knn(r, raw, 1)
            r -= raw[assign[:, 0]]
            continue
        C_KD = kmeans(r, step.K, niter=10, seed=seed + s)
        _, assign = faiss.knn(r, C_KD, 1)
        r -= C_KD[assign[:, 0]]
        C = torch.from_numpy(C_KD)
        C = (C - mean) / scale if s == 0 else C / scale
        C = C + torch.randn(C.shape, generator=gen) * C.std() * noise
        step.codebook.copy_(C)
        if step.preselector is not None:
            step.preselector.copy_(C)
