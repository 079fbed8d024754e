"""IVF-PQ search on the CPU by faiss's IVF-PQ scan, over the index's own lists (no copy).

A CPU index with one PQ codebook per sub-space keeps its lists in a faiss ``ArrayInvertedLists``
(:mod:`.faiss_lists`). :class:`FaissScan` wraps them in a ``faiss.IndexIVFPQ`` that shares
them (``own_invlists=False``) and holds our tables: the rotated centres in its coarse
quantizer, ``pq_centers`` as ``pq.centroids`` (the same ``(pq_dim, 2^pq_bits, pq_len)``
layout), ``by_residual=True``, in the rotated space. :func:`search_batch` keeps the coarse
step ours (the probes of :meth:`Index.coarse_scores`: a torch matrix product, faster than
faiss's coarse search on few threads, then the best lists by faiss's heaps or ``torch.topk``)
and hands the probed lists to faiss's ``search_preassigned``, parallel over queries. torch and
faiss take turns on every batch, so they should share one OpenMP runtime (:mod:`qinco2.openmp`:
import torch before faiss); with two, this scan ran at 0.60-1.12x faiss's ``IndexIVFPQ`` speed
on 2 cores instead of 1.03-1.49x.

Memory: the ``FaissScan`` is built at the first search and kept in ``index.lists.view`` (it
is rebuilt when the centres, the codebooks or the lists' storage change). It holds a copy of
the rotated centres (``4 * n_lists * rot_dim`` bytes), of the codebooks, and for
``sqeuclidean`` faiss's precomputed table of the query-independent terms ``|r|^2 + 2 <c, r>``
per (list, sub-space, code), ``4 * n_lists * pq_dim * 2^pq_bits`` bytes, which ``IndexIVFPQ``
also builds by default (left out above ``PRECOMPUTED_TABLE_MAX_BYTES``, faiss's limit, and for
sub-vectors of 1 or 2 dimensions, where it is slower: :func:`precomputed_table_bytes`; the
scan then builds each (query, list) table from the residual). :meth:`Index.nbytes` counts
it once built; :func:`~qinco2.ivfpq.estimate_memory` gives it as ``cpu_scan_bytes``.

Precision: faiss's tables and sums are float32, whatever ``lut_dtype`` and
``internal_distance_dtype`` ask for (those trade precision for speed in the torch and GPU
scans; here the results are those of float32 tables, within those settings' tolerance).
Threads: faiss's OpenMP threads are ``torch.get_num_threads()`` for the call (set for the
calling thread, restored after). Metrics: ``sqeuclidean`` (L2), ``inner_product`` (inner
products), ``cosine`` (inner products of normalised queries, returned as ``1 - <q, x>``).
"""

from __future__ import annotations

import contextlib

import faiss
import numpy as np
import torch

from .faiss_lists import FaissInvertedLists
from .index import Index
from .params import SearchParams

PRECOMPUTED_TABLE_MAX_BYTES = 2 << 30          # faiss's precomputed_table_max_bytes
PRECOMPUTED_TABLE_MIN_PQ_LEN = 3               # shorter sub-vectors: tables from the residual are faster
HEAP_MAX_PROBES = 32       # probes selected by faiss's heaps up to this many, by torch.topk above


def supported(index: Index) -> bool:
    """Whether faiss's scan can search ``index``: its lists are held by faiss (a CPU index
    with ``codebook_kind="subspace"``)."""
    return isinstance(index.lists, FaissInvertedLists)


def precomputed_table_bytes(n_lists: int, rot_dim: int, pq_dim: int, pq_bits: int, metric: str) -> int:
    """Bytes of faiss's precomputed L2 table, ``4 * n_lists * pq_dim * 2^pq_bits``; 0 (no table)
    for inner products, above faiss's limit, or for sub-vectors of fewer than
    ``PRECOMPUTED_TABLE_MIN_PQ_LEN`` dimensions: the scan then computes each probed list's table
    from the residual, ``rot_dim * 2^pq_bits`` multiply-adds, which beats reading the
    ``pq_dim * 2^pq_bits`` precomputed entries once they are that many (sift-photos, PQ64 of
    128 dimensions: 1.2 to 1.4x faster without the table, PQ32 1.1 to 1.4x slower)."""
    size = 4 * n_lists * pq_dim * (1 << pq_bits)
    wanted = metric == "sqeuclidean" and rot_dim // pq_dim >= PRECOMPUTED_TABLE_MIN_PQ_LEN
    return size if wanted and size <= PRECOMPUTED_TABLE_MAX_BYTES else 0


def scan_bytes(n_lists: int, rot_dim: int, pq_dim: int, pq_bits: int, metric: str) -> int:
    """Bytes a :class:`FaissScan` holds: the rotated centres and the codebooks (copies), the
    precomputed L2 table and the centres' squared norms (L2)."""
    l2 = metric == "sqeuclidean"
    return (4 * n_lists * rot_dim + 4 * rot_dim * (1 << pq_bits) + (4 * n_lists if l2 else 0)
            + precomputed_table_bytes(n_lists, rot_dim, pq_dim, pq_bits, metric))


class FaissScan:
    """A ``faiss.IndexIVFPQ`` over the lists and tables of ``index`` (see the module)."""

    def __init__(self, index: Index):
        self.lists, self.tables = index.lists.invlists, _tables(index)
        self.versions = tuple(t._version for t in self.tables)
        l2 = index.metric == "sqeuclidean"
        d = index.rot_dim
        self.quantizer = faiss.IndexFlatL2(d) if l2 else faiss.IndexFlatIP(d)
        self.quantizer.add(np.ascontiguousarray(index.centers_rot.numpy(), dtype=np.float32))
        ivf = faiss.IndexIVFPQ(self.quantizer, d, index.n_lists, index.pq_dim, index.pq_bits,
                               faiss.METRIC_L2 if l2 else faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = True
        faiss.copy_array_to_vector(np.ascontiguousarray(index.pq_centers.numpy(), dtype=np.float32).ravel(),
                                   ivf.pq.centroids)
        ivf.is_trained = True
        ivf.replace_invlists(self.lists, False)
        ivf.parallel_mode = 3                 # search_preassigned itself splits the queries over threads
        table = precomputed_table_bytes(index.n_lists, d, index.pq_dim, index.pq_bits, index.metric) > 0
        ivf.use_precomputed_table = 1 if table else -1
        if table:
            ivf.precompute_table()
        self.ivf = ivf
        self.c_sq = (index.centers ** 2).sum(1) if l2 else None       # |c|^2 of the coarse L2 scores
        self.nbytes = scan_bytes(index.n_lists, index.rot_dim, index.pq_dim, index.pq_bits, index.metric)

    def fits(self, index: Index) -> bool:
        """Whether this scan still holds the tables and lists of ``index``."""
        tables = _tables(index)
        return (self.lists is index.lists.invlists and all(a is b for a, b in zip(self.tables, tables))
                and self.versions == tuple(t._version for t in tables))


def _tables(index: Index) -> tuple[torch.Tensor, ...]:
    """The tables a :class:`FaissScan` copies."""
    return index.centers, index.centers_rot, index.pq_centers


def scanner(index: Index) -> FaissScan:
    """The index's :class:`FaissScan`, built (or rebuilt) when needed."""
    lists = index.lists
    if lists.view is None or not lists.view.fits(index):
        lists.view = None                     # free the old one first
        lists.view = FaissScan(index)
    lists.view.ivf.ntotal = lists.ntotal
    return lists.view


@contextlib.contextmanager
def omp_threads(n: int):
    """faiss's OpenMP threads set to ``n`` for the calling thread, restored after."""
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _select(scores_QC: np.ndarray, P: int, largest: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``P`` smallest (largest) scores of each row, best first, and their columns: faiss's
    heaps for few probes (faster than ``torch.topk`` there), ``torch.topk`` for many."""
    if P > HEAP_MAX_PROBES:
        top = torch.from_numpy(scores_QC).topk(P, dim=1, largest=largest)
        return top.values.numpy(), top.indices.numpy()
    Q, C = scores_QC.shape
    values, indices = np.empty((Q, P), dtype=np.float32), np.empty((Q, P), dtype=np.int64)
    heaps = faiss.float_minheap_array_t() if largest else faiss.float_maxheap_array_t()
    heaps.nh, heaps.k, heaps.val, heaps.ids = Q, P, faiss.swig_ptr(values), faiss.swig_ptr(indices)
    heaps.heapify()
    heaps.addn(C, faiss.swig_ptr(scores_QC), 0, 0, Q)
    heaps.reorder()
    return values, indices


def _coarse(scan: FaissScan, index: Index, q_QD: torch.Tensor, P: int) -> tuple[np.ndarray, np.ndarray]:
    """The probes of :meth:`Index.coarse_scores` (a torch matrix product, with ``|c|^2`` kept),
    and the coarse scores faiss wants with them: ``|q - c|^2`` for L2, ``<q, c>`` otherwise."""
    if scan.c_sq is None:
        return _select(np.ascontiguousarray(torch.mm(q_QD, index.centers.T).numpy()), P, largest=True)
    scores = np.ascontiguousarray(torch.addmm(scan.c_sq, q_QD, index.centers.T, alpha=-2).numpy())
    dis0, assign = _select(scores, P, largest=False)
    q = q_QD.numpy()
    return dis0 + np.einsum("qd,qd->q", q, q)[:, None], assign


def search_batch(index: Index, p: SearchParams, q_QD: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances (in the index's metric) and ids ``(Q, k)`` of a batch of float32 queries
    (normalised for cosine) by faiss's scan; inf distances and -1 ids where the probed lists
    hold fewer than ``k`` vectors."""
    P = min(p.n_probes, index.n_lists)
    x = np.ascontiguousarray(index.rotate(q_QD).numpy(), dtype=np.float32)
    distances = np.empty((len(x), k), dtype=np.float32)
    ids = np.empty((len(x), k), dtype=np.int64)
    with omp_threads(torch.get_num_threads()):
        scan = scanner(index)
        dis0, assign = _coarse(scan, index, q_QD, P)
        scan.ivf.search_preassigned_c(len(x), faiss.swig_ptr(x), k, faiss.swig_ptr(assign), faiss.swig_ptr(dis0),
                                      faiss.swig_ptr(distances), faiss.swig_ptr(ids), False,
                                      faiss.SearchParametersIVF(nprobe=P))
    if index.metric == "cosine":
        distances = 1 - distances
    distances[ids < 0] = np.inf
    return distances, ids
