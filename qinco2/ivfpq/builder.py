"""Build and extend an IVF-PQ :class:`~qinco2.ivfpq.index.Index` (files: :mod:`.files`)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import InputError
from ..kmeans import _distinct_rows, kmeans, kmeans_progress
from ..progress import progress_bar
from ..tensor_io import accepts_tensors
from .index import CHUNK_ROWS, Index, check_vectors, float_rows
from .params import IndexParams

log = logging.getLogger(__name__)

INT64_MAX = int(np.iinfo(np.int64).max)
SAMPLE_DTYPE_COSINE = np.float16      # the normalised k-means sample of a cosine index


def _device(device) -> torch.device:
    return torch.device("cpu" if device is None else device)


def random_rotation(dim: int, rot_dim: int, generator: torch.Generator) -> torch.Tensor:
    """``(rot_dim, dim)`` matrix with orthonormal columns (a random rotation, zero-padded)."""
    q, r = torch.linalg.qr(torch.randn(rot_dim, rot_dim, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))                 # Haar-distributed
    return q[:, :dim].float()


def _sample(dataset: np.ndarray, fraction: float, n_lists: int, gen: torch.Generator) -> np.ndarray:
    """The k-means training rows: every ``ratio``-th row from a random offset, with cuVS's
    ``ratio = N // max(fraction * N, n_lists)`` (``N // ratio`` rows); a view of ``dataset`` (a
    memory map stays one), nothing is read or copied. A systematic sample: as good as a random
    one unless the rows repeat a pattern every ``ratio`` rows (shuffle such data first)."""
    N = len(dataset)
    ratio = max(1, N // max(int(fraction * N), n_lists))
    offset = int(torch.randint(ratio, (1,), generator=gen))
    return dataset[offset::ratio][:N // ratio]


def _normalized(sample: np.ndarray) -> np.ndarray:
    """Cosine: the sample normalised for k-means, written ``CHUNK_ROWS`` rows at a time into a
    float16 array (half a float32 copy; unit vectors lose nothing that matters to k-means)."""
    out = np.empty(sample.shape, dtype=SAMPLE_DTYPE_COSINE)
    for i in range(0, len(sample), CHUNK_ROWS):
        out[i:i + CHUNK_ROWS] = float_rows(sample[i:i + CHUNK_ROWS], "cpu", True).numpy()
    return out


def _sample_ids(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``min(n, m)`` distinct random ids in ``[0, n)``, without an ``(n,)`` permutation when ``n``
    is large."""
    return torch.randperm(n, generator=gen)[:m] if 2 * m > n else _distinct_rows(n, m, gen)


def _residuals(index: Index, sample: np.ndarray, rows_u: torch.Tensor, list_no: int | None = None):
    """Rotated residuals ``(u, pq_dim, pq_len)`` of the sample rows ``rows_u`` (increasing),
    read and converted ``CHUNK_ROWS`` rows at a time; to the centre ``list_no``, or (None) to
    each row's own list."""
    S, L, normalize = index.pq_dim, index.pq_len, index.metric == "cosine"
    r_uSL = torch.empty(len(rows_u), S, L, device=index.device)
    for i in range(0, len(rows_u), CHUNK_ROWS):
        x_ND = float_rows(sample[rows_u[i:i + CHUNK_ROWS].numpy()], index.device, normalize)
        lists = index.assign(x_ND) if list_no is None else list_no
        r_uSL[i:i + len(x_ND)] = (index.rotate(x_ND) - index.centers_rot[lists]).view(len(x_ND), S, L)
    return r_uSL


def _subspace_books(index: Index, sample: np.ndarray, gen: torch.Generator, progress: bool) -> torch.Tensor:
    """One codebook per sub-space, trained on the residuals of at most ``2^pq_bits *
    max_train_points_per_pq_code`` random sample rows (only those rows are read)."""
    p, K = index.params, index.pq_book_size
    rows_u, inv_n = torch.unique(_sample_ids(len(sample), K * p.max_train_points_per_pq_code, gen),
                                 return_inverse=True)
    r_nSL = _residuals(index, sample, rows_u)[inv_n.to(index.device)]
    with kmeans_progress(p.kmeans_n_iters, "PQ codebooks", progress) as bar:
        return kmeans(r_nSL.transpose(0, 1).contiguous(), K, niter=p.kmeans_n_iters, seed=gen, progress=bar)


def _sample_lists(index: Index, sample: np.ndarray) -> list[torch.Tensor]:
    """The sample rows of each list (increasing): the sample is assigned ``CHUNK_ROWS`` rows at
    a time, then grouped by list once (one sort of the labels)."""
    normalize = index.metric == "cosine"
    labels_N = torch.cat([index.assign(float_rows(sample[i:i + CHUNK_ROWS], index.device, normalize)).int().cpu()
                          for i in range(0, len(sample), CHUNK_ROWS)])
    order_N = torch.argsort(labels_N, stable=True)
    return list(torch.split(order_N, torch.bincount(labels_N, minlength=index.n_lists).tolist()))


def _cluster_books(index: Index, sample: np.ndarray, gen: torch.Generator, progress: bool) -> torch.Tensor:
    """One codebook per list, shared by its sub-spaces, trained on at most ``2^pq_bits *
    max_train_points_per_pq_code`` random sub-vectors of the list's residuals (only the rows
    holding them are read); an empty list draws them from the whole sample."""
    p, K, S = index.params, index.pq_book_size, index.pq_dim
    cap = K * p.max_train_points_per_pq_code
    books = torch.empty(index.n_lists, K, index.pq_len, device=index.device)
    rows_of = _sample_lists(index, sample)
    for li in progress_bar(range(index.n_lists), desc="PQ codebooks per list", disable=not progress, leave=False):
        rows_l = rows_of[li] if len(rows_of[li]) else None        # None: the whole sample
        n_l = len(sample) if rows_l is None else len(rows_l)
        ids = _sample_ids(n_l * S, cap, gen)                     # sub-vector = row * S + sub-space
        rows = ids // S if rows_l is None else rows_l[ids // S]
        rows_u, inv = torch.unique(rows, return_inverse=True)
        r_uSL = _residuals(index, sample, rows_u, None if rows_l is None else li)
        books[li] = kmeans(r_uSL[inv.to(index.device), (ids % S).to(index.device)], K, niter=p.kmeans_n_iters,
                          seed=gen)
    return books


@accepts_tensors
def build(params: IndexParams, dataset, *, device=None, progress: bool = False) -> Index:
    """Train an index on ``dataset`` ``(N, dim)`` (float32/float16/int8/uint8 numpy, may be
    memory-mapped) and, with ``params.add_data_on_build``, add it with ids ``0..N-1``.

    Memory: the k-means sample is a strided view of ``dataset`` that k-means reads and
    converts block by block (cosine: one float16 normalised copy); PQ codebooks read only
    the rows they train on; nothing holds a float32 copy of more than ``CHUNK_ROWS`` rows of
    ``dataset`` besides the at most ``2^pq_bits * max_train_points_per_pq_code`` residuals of
    a codebook's training set."""
    dataset = check_vectors(dataset, "dataset")
    N, dim = dataset.shape
    params = params.validated(dim)
    if params.n_lists > N:
        raise InputError(f"n_lists={params.n_lists} is larger than the {N} training vectors; use at most "
                         f"{N} lists (about sqrt(N) = {max(1, int(N ** 0.5))} is a good start)")
    device = _device(device)
    gen = torch.Generator().manual_seed(params.seed)
    sample = _sample(dataset, params.kmeans_trainset_fraction, params.n_lists, gen)
    points = _normalized(sample) if params.metric == "cosine" else sample
    log.info("IVF-PQ build: k-means of %d of %d vectors into %d lists", len(sample), N, params.n_lists)
    with kmeans_progress(params.kmeans_n_iters, "IVF k-means", progress) as bar:
        centers = kmeans(points, params.n_lists, niter=params.kmeans_n_iters, seed=gen, device=device,
                         progress=bar)
    del points
    rot_dim = params.pq_dim * -(-dim // params.pq_dim)
    if rot_dim != dim or params.force_random_rotation:
        rotation = random_rotation(dim, rot_dim, gen)
    else:
        rotation = torch.eye(dim)
    book_shape = ((params.pq_dim if params.codebook_kind == "subspace" else params.n_lists),
                  1 << params.pq_bits, rot_dim // params.pq_dim)
    index = Index(params, dim, torch.from_numpy(centers), rotation, torch.zeros(book_shape), device)
    train_books = _subspace_books if params.codebook_kind == "subspace" else _cluster_books
    index.pq_centers = train_books(index, sample, gen, progress)
    if params.add_data_on_build:
        extend(index, dataset, np.arange(N, dtype=np.int64), progress=progress)
        if not params.conservative_memory_allocation:
            index.lists.shrink_to_fit()       # the bulk load grew lists by doubling
    return index


def _check_ids(ids, n: int) -> np.ndarray:
    """``ids`` as an array of ``n`` integers in ``[0, 2**63)``; InputError naming the first bad
    one (a negative id would come back as a hit colliding with the -1 "no result" marker, one
    above 2**63 - 1 would wrap around in the int64 lists)."""
    ids = np.asarray(ids)
    if ids.shape != (n,) or ids.dtype.kind not in "iu":
        raise InputError(f"ids must be {n} integers (one per vector), got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    if not n:
        return ids
    if ids.dtype.kind == "i" and ids.min() < 0:
        bad = int(np.flatnonzero(ids < 0)[0])
    elif ids.dtype.kind == "u" and ids.max() > INT64_MAX:
        bad = int(np.flatnonzero(ids > INT64_MAX)[0])
    else:
        return ids
    raise InputError(f"ids must be in [0, 2**63) (-1 marks 'no result' in search results, and ids are stored "
                     f"as int64); ids[{bad}] = {ids[bad]}; renumber the vectors with non-negative ids")


def _list_counts(index: Index, vectors, progress: bool) -> torch.Tensor:
    """Vectors per list ``(n_lists,)`` of ``vectors``, assigned ``CHUNK_ROWS`` at a time (a pass
    of coarse assignment only, about a sixth of the cost of adding)."""
    counts_L = torch.zeros(index.n_lists, dtype=torch.int64)
    normalize = index.metric == "cosine"
    for i in progress_bar(range(0, len(vectors), CHUNK_ROWS), desc="IVF-PQ list sizes", enabled=progress,
                          leave=False):
        list_nos = index.assign(float_rows(vectors[i:i + CHUNK_ROWS], index.device, normalize))
        counts_L += torch.bincount(list_nos.cpu(), minlength=index.n_lists)
    return counts_L


@accepts_tensors
def extend(index: Index, vectors, ids=None, *, progress: bool = False) -> Index:
    """Add ``vectors`` with ``ids`` (integers in ``[0, 2**63)``; default: continuing ``0, 1,
    ...`` after the current size) to their lists; returns ``index`` (updated in place). Ids
    are not checked for uniqueness: an id added twice is stored twice, and both vectors can
    be found (the same id may then appear twice in a result). The index's data fingerprint
    (:mod:`.fingerprint`) records the added rows for :func:`~qinco2.ivfpq.search_and_refine`."""
    vectors = check_vectors(vectors, "vectors", index.dim)
    if ids is None:
        ids = np.arange(index.size, index.size + len(vectors), dtype=np.int64)
    ids = _check_ids(ids, len(vectors))
    normalize = index.metric == "cosine"
    if len(vectors) > CHUNK_ROWS:                 # a bulk load: size the lists once, then fill them
        index.lists.reserve(_list_counts(index, vectors, progress))
    with index.lists.bulk_add():
        for i in progress_bar(range(0, len(vectors), CHUNK_ROWS), desc="IVF-PQ add", disable=not progress, leave=False):
            x_ND = float_rows(vectors[i:i + CHUNK_ROWS], index.device, normalize)
            list_nos = index.assign(x_ND)
            ids_n = ids[i:i + CHUNK_ROWS].astype(np.int64)
            index.lists.add(list_nos, index.encode(x_ND, list_nos), torch.from_numpy(ids_n))
            if index.fingerprint is not None:
                index.fingerprint.update(vectors[i:i + CHUNK_ROWS], ids_n)
    return index
