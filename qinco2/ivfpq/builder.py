"""Build, extend, save and load an IVF-PQ :class:`~qinco2.ivfpq.index.Index`."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_torch_save, load_tagged
from ..errors import InputError
from ..kmeans import kmeans, progress_bar
from .index import CHUNK_ROWS, Index, check_vectors, float_rows
from .params import IndexParams

log = logging.getLogger(__name__)

FORMAT_TAG, FORMAT_VERSION = "qinco2-ivfpq", 1


def _device(device) -> torch.device:
    return torch.device("cpu" if device is None else device)


def random_rotation(dim: int, rot_dim: int, generator: torch.Generator) -> torch.Tensor:
    """``(rot_dim, dim)`` matrix with orthonormal columns (a random rotation, zero-padded)."""
    q, r = torch.linalg.qr(torch.randn(rot_dim, rot_dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))                 # Haar-distributed
    return q[:, :dim].float()


def _train_rows(n: int, fraction: float, n_lists: int, gen: torch.Generator) -> np.ndarray:
    n_train = min(n, max(n_lists, int(round(n * fraction))))
    return np.sort(torch.randperm(n, generator=gen)[:n_train].numpy())


def _train_codebooks(index: Index, x_ND: torch.Tensor, gen: torch.Generator, progress: bool) -> torch.Tensor:
    """PQ codebooks fitted on the rotated residuals of the training rows."""
    p, K = index.params, index.pq_book_size
    list_nos = index.assign(x_ND)
    r_NSL = (index.rotate(x_ND) - index.centers_rot[list_nos]).view(len(x_ND), index.pq_dim, index.pq_len)
    cap = K * p.max_train_points_per_pq_code
    niter = p.kmeans_n_iters
    if p.codebook_kind == "subspace":
        rows = torch.randperm(len(x_ND), generator=gen)[:cap].to(x_ND.device)
        with progress_bar(niter, "PQ codebooks", progress) as bar:
            return kmeans(r_NSL[rows].transpose(0, 1).contiguous(), K, niter=niter, seed=gen, progress=bar)
    books = torch.empty(index.n_lists, K, index.pq_len, device=x_ND.device)
    for l in tqdm(range(index.n_lists), desc="PQ codebooks per list", disable=not progress, leave=False):
        sub_NL = r_NSL[list_nos == l].reshape(-1, index.pq_len)
        if len(sub_NL) == 0:                  # an empty list: codebook of its centre's neighbourhood
            sub_NL = r_NSL.reshape(-1, index.pq_len)
        sub_NL = sub_NL[torch.randperm(len(sub_NL), generator=gen)[:cap].to(x_ND.device)]
        books[l] = kmeans(sub_NL, K, niter=niter, seed=gen)
    return books


def build(params: IndexParams, dataset, *, device=None, progress: bool = False) -> Index:
    """Train an index on ``dataset`` ``(N, dim)`` (float32/float16/int8/uint8 numpy, may be
    memory-mapped) and, with ``params.add_data_on_build``, add it with ids ``0..N-1``."""
    dataset = check_vectors(dataset, "dataset")
    N, dim = dataset.shape
    params = params.validated(dim)
    if params.n_lists > N:
        raise InputError(f"n_lists={params.n_lists} is larger than the {N} training vectors; use at most "
                         f"{N} lists (about sqrt(N) = {max(1, int(N ** 0.5))} is a good start)")
    device = _device(device)
    gen = torch.Generator().manual_seed(params.seed)
    normalize = params.metric == "cosine"
    rows = _train_rows(N, params.kmeans_trainset_fraction, params.n_lists, gen)
    x_train = float_rows(dataset[rows], device, normalize)
    log.info("IVF-PQ build: k-means of %d of %d vectors into %d lists", len(rows), N, params.n_lists)
    with progress_bar(params.kmeans_n_iters, "IVF k-means", progress) as bar:
        centers = kmeans(x_train, params.n_lists, niter=params.kmeans_n_iters, seed=gen, progress=bar)
    rot_dim = params.pq_dim * -(-dim // params.pq_dim)
    if rot_dim != dim or params.force_random_rotation:
        rotation = random_rotation(dim, rot_dim, gen)
    else:
        rotation = torch.eye(dim)
    book_shape = ((params.pq_dim if params.codebook_kind == "subspace" else params.n_lists),
                  1 << params.pq_bits, rot_dim // params.pq_dim)
    index = Index(params, dim, centers, rotation, torch.zeros(book_shape), device)
    index.pq_centers = _train_codebooks(index, x_train, gen, progress)
    del x_train
    if params.add_data_on_build:
        extend(index, dataset, np.arange(N, dtype=np.int64), progress=progress)
        if not params.conservative_memory_allocation:
            index.lists.shrink_to_fit()       # the bulk load grew lists by doubling
    return index


def extend(index: Index, vectors, ids=None, *, progress: bool = False) -> Index:
    """Add ``vectors`` with int64 ``ids`` (default: continuing ``0, 1, ...`` after the
    current size) to their lists; returns ``index`` (updated in place)."""
    vectors = check_vectors(vectors, "vectors", index.dim)
    if ids is None:
        ids = np.arange(index.size, index.size + len(vectors), dtype=np.int64)
    ids = np.asarray(ids)
    if ids.shape != (len(vectors),) or ids.dtype.kind not in "iu":
        raise InputError(f"ids must be {len(vectors)} integers (one per vector), got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    normalize = index.metric == "cosine"
    with index.lists.bulk_add():
        for i in tqdm(range(0, len(vectors), CHUNK_ROWS), desc="IVF-PQ add", disable=not progress, leave=False):
            x_ND = float_rows(vectors[i:i + CHUNK_ROWS], index.device, normalize)
            list_nos = index.assign(x_ND)
            index.lists.add(list_nos, index.encode(x_ND, list_nos),
                            torch.from_numpy(ids[i:i + CHUNK_ROWS].astype(np.int64)))
    return index


def save(filename, index: Index) -> None:
    """Write ``index`` to one file (format tag and version inside; atomic)."""
    atomic_torch_save({"format": FORMAT_TAG, "version": FORMAT_VERSION,
                       "params": dataclasses.asdict(index.params), "dim": index.dim,
                       "centers": index.centers.cpu(), "rotation_matrix": index.rotation_matrix.cpu(),
                       "pq_centers": index.pq_centers.cpu(), "lists": index.lists.state_dict()}, filename)


def load(filename, *, device=None) -> Index:
    """An index written by :func:`save`, on ``device`` (default CPU)."""
    payload = load_tagged(filename, FORMAT_TAG, FORMAT_VERSION, "IVF-PQ index",
                          "build one with `qinco2 task=ivfpq_build db=<vectors> output=<index file>`")
    index = Index(IndexParams(**payload["params"]), payload["dim"], payload["centers"],
                  payload["rotation_matrix"], payload["pq_centers"], _device(device))
    index.lists.load_state_dict(payload["lists"])
    return index
