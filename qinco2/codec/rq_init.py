"""Starting point of training: normalisation statistics and residual-quantisation (RQ)
codebooks fitted in raw space, mapped into the model. With the step networks starting as the
identity on their codeword, a fresh model encodes and decodes exactly as this RQ."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch

from ..errors import ConfigError
from ..kmeans import kmeans
from ..progress import progress_bar
from .batches import TRAIN_FIX, check_rows_finite, require_rows, row_source
from .model import QincoModel

log = logging.getLogger(__name__)


def initialize(model: QincoModel, cfg, x_train: np.ndarray) -> None:
    """Fresh-run initialisation from a :class:`~qinco2.codec.train.TrainConfig`: normalisation
    statistics, then RQ codebooks, from the first ``cfg.init_samples`` rows of ``x_train``,
    checked for NaN/Inf as they are read (after the cast to float32)."""
    require_rows(x_train, "x_train", TRAIN_FIX)
    with np.errstate(over="ignore"):                      # overflow gives Inf, caught below
        x_init = np.asarray(x_train[:cfg.init_samples], dtype=np.float32)
    check_rows_finite(x_init, "x_train", row_source(x_train))
    fit_normalization(model, x_init, cfg.normalization)
    if model.steps[0].frozen:
        ivf = model.steps[0].codebook
        ivf.copy_((ivf - model.mean) / model.scale)
    rq_initialize(model, x_init, cfg.init_noise, cfg.seed, refine=cfg.init_refine)


def fit_normalization(model: QincoModel, x_init: np.ndarray, how: str) -> None:
    """Set the model's mean/scale from (the first 100k rows of) the initialisation data."""
    x = torch.from_numpy(np.array(x_init[:100_000], dtype=np.float32))  # a copy: x_init may be read-only
    if how == "mean_std":
        model.mean.copy_(x.mean(0))
        model.scale.copy_(x.double().std(unbiased=False).float())
    else:
        model.mean.zero_()
        model.scale.copy_(x.abs().max().clamp_min(1e-12))


REFINE_ROWS = 100_000      # rows of each joint codebook refinement (its cost is linear in them)


def _residual_codebooks(r_ND: np.ndarray, n_steps: int, K: int, seed: int, refine: int = 0) -> list[np.ndarray]:
    """Codebooks ``(K, D)`` of an ``n_steps``-step residual quantiser of ``r_ND``.

    faiss' ResidualQuantizer (greedy, with its progressive-dimension k-means) when ``K`` is a
    power of two: on small training sets its codebooks generalise clearly better than plain
    stage-wise k-means (wordnet-minilm, 9k rows, 8x256: validation MSE 0.516 against 0.570).
    Then ``refine`` rounds of joint refinement on the first :data:`REFINE_ROWS` rows: encode
    (greedy), then all codebooks at once by least squares on those codes (faiss'
    ``retrain_AQ_codebook``), which takes the greedy codebooks towards those of a joint
    additive quantiser. Otherwise stage-wise :func:`qinco2.kmeans.kmeans` on the residuals
    (``refine`` needs a power-of-two ``K``)."""
    if K >= 2 and K & (K - 1) == 0:
        rq = faiss.ResidualQuantizer(r_ND.shape[1], n_steps, K.bit_length() - 1)
        rq.max_beam_size = 1
        rq.cp.seed = seed
        rq.cp.min_points_per_centroid = 1                  # small sets are reported by codec.sizing
        rq.train(r_ND)
        if refine:
            rows = np.ascontiguousarray(r_ND[:REFINE_ROWS])
            log.info("refining the RQ codebooks jointly: %d rounds on %d rows", refine, len(rows))
            for _ in progress_bar(range(refine), desc="codebook refinement", leave=False):
                rq.retrain_AQ_codebook(len(rows), faiss.swig_ptr(rows))
        books = faiss.vector_to_array(rq.codebooks).reshape(n_steps, K, r_ND.shape[1])
        return list(books)
    if refine:
        raise ConfigError(f"init_refine={refine} needs K to be a power of two (got K={K}); set init_refine=0")
    books, r = [], r_ND.copy()
    for s in range(n_steps):
        C_KD = kmeans(r, K, niter=10, seed=seed + s)
        r -= C_KD[faiss.knn(r, C_KD, 1)[1][:, 0]]
        books.append(C_KD)
    return books


@torch.no_grad()
def rq_initialize(model: QincoModel, x_init: np.ndarray, noise: float, seed: int, refine: int = 0) -> None:
    """Residual quantisation in raw space (after the frozen IVF step, if any), its codebooks
    refined jointly ``refine`` times, mapped into the model's normalised space, plus ``noise``
    times each codebook's spread."""
    gen = torch.Generator().manual_seed(seed)
    r = np.ascontiguousarray(x_init, dtype=np.float32).copy()
    mean, scale = model.mean.cpu(), model.scale.cpu()
    trained = [s for s, step in enumerate(model.steps) if not step.frozen]
    for step in model.steps[:trained[0]]:                  # the frozen IVF step
        raw = (step.codebook.cpu() * scale + mean).numpy()
        r -= raw[faiss.knn(r, raw, 1)[1][:, 0]]
    books = _residual_codebooks(r, len(trained), model.steps[trained[0]].K, seed, refine)
    for s, C_KD in zip(trained, books):
        step = model.steps[s]
        C = torch.from_numpy(np.ascontiguousarray(C_KD))
        C = (C - mean) / scale if s == 0 else C / scale
        C = C + torch.randn(C.shape, generator=gen) * C.std() * noise
        step.codebook.copy_(C)
        if step.preselector is not None:
            step.preselector.copy_(C)
