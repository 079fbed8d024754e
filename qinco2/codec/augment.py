"""Augmentations of the training rows, against overfitting on small training sets.

Both act on the normalised rows of a training batch, after they are read and before the beam
search picks their codes; validation and encoding never see them.

- ``train_noise``: Gaussian noise of a given share of the rows' spread, the same in every
  direction (:func:`add_noise`).
- ``neighbour_mix``: each row moved a random part of the way towards one of its nearest
  training rows (:func:`mix_with_neighbours`), so the new rows stay near the data rather than
  spreading into directions the data never takes. The neighbours are found once per run
  (:func:`training_neighbours`) within blocks of a random permutation, so the cost grows
  linearly with the number of rows and the search is exact up to ``block_rows`` rows.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..errors import InputError
from ..metrics import knn
from .batches import check_rows_finite, row_source

log = logging.getLogger(__name__)

NEIGHBOUR_BLOCK = 65_536    # rows searched together: exact neighbours up to this many training rows


def augment_generator(seed: int, epoch: int, rank: int, device) -> torch.Generator:
    """The generator of an epoch's augmentation draws on process ``rank``, seeded from the seed,
    the epoch and the rank (a resumed run draws the same, the processes of a launched run each
    their own, and the batches are those of a run without augmentation)."""
    state = int(np.random.default_rng([seed, epoch, 1, rank]).integers(2**62))
    return torch.Generator(device=device).manual_seed(state)


def add_noise(u_ND: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """``u + std * rms(u) * e``, ``e`` standard normal: noise ``std`` times the rows' spread
    (the root mean square of the batch's coordinates), whatever the normalisation."""
    spread = u_ND.pow(2).mean().sqrt()
    e_ND = torch.randn(u_ND.shape, generator=generator, device=u_ND.device, dtype=u_ND.dtype)
    return u_ND + (std * spread) * e_ND


def training_neighbours(x_train, k: int, *, normalize, seed: int,
                        block_rows: int = NEIGHBOUR_BLOCK) -> np.ndarray:
    """``(N, k)`` row numbers: for each row of ``x_train``, its ``k`` nearest other rows by the L2
    distance of the normalised rows (``normalize``: float32 rows in, a tensor out).

    The rows are cut, in one random order seeded by ``seed``, into blocks of at most
    ``block_rows`` (of equal sizes), and each block searched exhaustively by faiss: exact
    neighbours when ``N <= block_rows``, neighbours within a random block otherwise; work
    ``N * block_rows * D`` and memory ``block_rows * D`` floats (one block at a time), whatever
    ``N``. With fewer than ``k + 1`` rows in a block the remaining columns repeat the row itself.
    The rows are checked for NaN/Inf as they are read (:class:`InputError` naming the row)."""
    n = len(x_train)
    if k < 1 or block_rows <= k:
        raise InputError(f"neighbours: k={k} must be >= 1 and block_rows={block_rows} > k")
    dtype = np.int32 if n < 2**31 else np.int64
    out_Nk = np.repeat(np.arange(n, dtype=dtype)[:, None], k, axis=1)
    order = np.random.default_rng([seed, 2]).permutation(n)
    n_blocks = -(-n // block_rows)
    bounds = np.linspace(0, n, n_blocks + 1).round().astype(np.int64)
    start, source = time.monotonic(), row_source(x_train)
    for a, b in zip(bounds[:-1], bounds[1:]):
        ids = np.sort(order[a:b])                          # read the file in increasing row order
        kk = min(k, len(ids) - 1)
        if kk < 1:
            continue
        rows = np.asarray(x_train[ids], dtype=np.float32)
        check_rows_finite(rows, "x_train", source, row_ids=ids)
        rows = normalize(rows).cpu().numpy()
        found = knn(rows, rows, kk + 1)
        is_self = found == np.arange(len(ids))[:, None]
        keep = ~is_self
        keep[~is_self.any(axis=1), -1] = False             # a duplicate row came first: drop the farthest
        out_Nk[ids, :kk] = ids[found[keep].reshape(len(ids), kk)]
    log.info("neighbours of the %d training rows (%d per row, blocks of %d): %.1f s", n, k,
             int(bounds[1] - bounds[0]) if n else 0, time.monotonic() - start)
    return out_Nk


def mix_with_neighbours(u_ND: torch.Tensor, v_ND: torch.Tensor, alpha: float,
                        generator: torch.Generator) -> torch.Tensor:
    """``u + lam * (v - u)``, ``lam`` drawn uniformly in ``[0, alpha)`` for each row: each row
    moved a random part of the way towards ``v``, its neighbour."""
    lam_N1 = torch.rand(len(u_ND), 1, generator=generator, device=u_ND.device, dtype=u_ND.dtype) * alpha
    return u_ND + lam_N1 * (v_ND - u_ND)


def pick_neighbours(ids_n: np.ndarray, neighbours_Nk: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """One of the ``k`` neighbours of each row ``ids_n``, drawn uniformly."""
    k = neighbours_Nk.shape[1]
    col_n = torch.randint(k, (len(ids_n),), generator=generator, device=generator.device).cpu().numpy()
    return neighbours_Nk[ids_n, col_n]
