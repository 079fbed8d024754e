"""The scan of the shortlist index with tables computed once per query.

faiss's own scan of an IVF additive-quantizer index computes, for every probed list, the table of
``<q - c, T_m[k]>`` over all ``M * K`` codewords: ``D * M * K`` multiply-adds per (query, list),
262k at D=128, M=8, where scanning the ~50 codes of a list costs a few hundred additions. It
bounded the first stage of IVF-QINCo2 (sift-photos, 2,048 lists: 3,800 queries/s at
``nprobe=4`` on 2 cores against 24,000 for ``IVF2048,PQ8x8``). The distance splits as

    ||q - c - r||^2 = ||q - c||^2  - 2 <q, r>  + 2 <c, r>  + ||r||^2,    r = sum_m T_m[i_m]

where ``||q - c||^2`` is the coarse distance, ``<q, r> = sum_m <q, T_m[i_m]>`` needs one table
per query, ``<c, r> = sum_m <c, T_m[i_m]>`` one table per list, independent of the query
(computed once), and ``||r||^2`` is the norm byte that the index stores (code layout: ``M`` code
bytes, then the norm byte). Two scans compute it over the index's own inverted lists (no copy):

- :class:`NativeScan`, a small C kernel (``scan_kernel.c``, compiled on first use by
  :mod:`qinco2.native`): the query tables of a batch of queries in one matrix product (the
  ``M * K * D`` multiply-adds per query at GEMM speed), then for each (query, probed list) the
  sum of the query's and the list's tables, one look-up per code byte, and a heap of the best k.
  It reads the lists' addresses from faiss (``ArrayInvertedLists``) and reads them again when the
  index's ``ntotal`` changes (any add or removal: faiss reallocates a growing list) or after
  :func:`invalidate` (which ``add_codes`` calls: a reset followed by as many codes keeps ``ntotal``).
- :class:`ShortlistScan`, where no C compiler is found: faiss's ``IndexIVFPQ`` with precomputed
  tables (``use_precomputed_table=1``) and ``M + 1`` sub-quantizers over a space of ``(M + 1) * D``
  dimensions: sub-space ``m < M`` holds the codewords ``T_m`` and a copy of the query; sub-space
  ``M`` reads the norm byte, with zero codewords and, as its precomputed entries, the 256 norms
  the byte stands for. faiss computes its query table one query at a time (~3x slower overall
  than the kernel on sift-photos at 1,000 queries, 2 cores).

Inner-product indexes (``<q, c + r>``, the norm byte unused): the per-list term is ``<q, c>``, the
coarse similarity for the kernel; ``IndexIVFPQ`` takes it from its quantizer's reconstruction of
the list centre, a quantizer here that holds the ``C x D`` centres padded with zeros to ``(M + 1) * D``.

Memory: the precomputed L2 table, ``4 * C * M * 256`` bytes for the kernel, ``4 * C * (M + 1) *
256`` for faiss (18.9 MB for 2,048 lists and M=8), and the query tables of a batch (8 kB per
query at M=8). Above ``MAX_TABLE_BYTES`` (faiss's own limit for IVF-PQ tables) the search falls
back to faiss's scan of the index. Results are those of faiss's scan up to float32 rounding (the
sums are grouped differently).
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from pathlib import Path

import faiss
import numpy as np
import torch

from .. import native

log = logging.getLogger(__name__)

MAX_TABLE_BYTES = 2 << 30          # faiss's precomputed_table_max_bytes
QUERY_BATCH = 4096                 # queries whose tables are held at a time: 4 * M * 256 floats each
KERNEL = Path(__file__).with_name("scan_kernel.c")
_SCANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def table_bytes(C: int, M: int, K: int = 256) -> int:
    """Bytes of the precomputed table of an L2 index of ``C`` lists and ``M`` code bytes."""
    return 4 * C * (M + 1) * K


def decoded_norms(rq) -> np.ndarray:
    """The 256 squared norms the ``ST_norm_qint8`` byte stands for (faiss's ``decode_qint8``)."""
    return ((np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(256)
            * np.float32(rq.norm_max - rq.norm_min) + np.float32(rq.norm_min))


def list_tables(centroids_CD: np.ndarray, T_MKD: np.ndarray) -> np.ndarray:
    """``2 <c, T_m[k]>`` for every list centre ``c``: ``(C, M, K)`` float32."""
    return 2 * np.einsum("cd,mkd->cmk", centroids_CD, T_MKD, dtype=np.float32)


class _TableScan:
    """Queries in batches of ``QUERY_BATCH``: the HNSW quantizer's probes, then ``_scan``."""

    def search(self, coarse, q_QD: np.ndarray, k: int, nprobe: int, quantizer_params=None):
        """Distances and ids ``(Q, k)`` of the ``k`` nearest codes in the ``nprobe`` lists that
        ``coarse`` (the index's HNSW quantizer) finds for each query; -1 ids where fewer."""
        Q = len(q_QD)
        dist_Qk = np.empty((Q, k), dtype=np.float32)
        ids_Qk = np.empty((Q, k), dtype=np.int64)
        for lo in range(0, Q, QUERY_BATCH):
            q = q_QD[lo:lo + QUERY_BATCH]
            coarse_dis, assign = coarse.search(q, nprobe, params=quantizer_params)
            self._scan(q, coarse_dis, assign, dist_Qk[lo:lo + len(q)], ids_Qk[lo:lo + len(q)])
        return dist_Qk, ids_Qk


class NativeScan(_TableScan):
    """The compiled scan (``scan_kernel.c``) over the lists of an IVF-RQ shortlist index: the
    query tables of a batch in one matrix product, each (query, list) table their sum with the
    list's precomputed one. ``scanned`` counts the codes of the last search."""

    def __init__(self, lib: ctypes.CDLL, index: faiss.IndexIVFResidualQuantizer, centroids_CD: np.ndarray,
                 T_MKD: np.ndarray):
        M, K, D = T_MKD.shape
        self.l2, self.invlists, self.M = index.metric_type == faiss.METRIC_L2, index.invlists, M
        self.code_size, self.nlist, self.ntotal, self.scanned = index.code_size, index.nlist, -1, 0
        # -2 <q, T> (L2: with the list table and the norm) or -<q, T> (inner product, negated back)
        self.T_DX = torch.from_numpy(np.ascontiguousarray(T_MKD.reshape(M * K, D).T * (-2.0 if self.l2 else -1.0)))
        self.ltab_CMK = list_tables(centroids_CD, T_MKD) if self.l2 else None
        self.norms = decoded_norms(index.rq) if self.l2 else None
        self.fn = lib.qinco2_scan
        self.fn.restype = ctypes.c_int64
        self.fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 10

    def sync(self, index) -> None:
        """Read the lists' addresses and sizes again when codes were added or removed (faiss
        reallocates a list that grows, and every add or removal changes ``ntotal``)."""
        if index.ntotal == self.ntotal:
            return
        inv = self.invlists
        address = [(inv.get_codes(i), inv.get_ids(i)) for i in range(self.nlist)]
        self.code_ptrs = np.array([0 if c is None else int(c) for c, _ in address], dtype=np.int64)
        self.id_ptrs = np.array([0 if i is None else int(i) for _, i in address], dtype=np.int64)
        self.sizes = np.array([inv.list_size(i) for i in range(self.nlist)], dtype=np.int64)
        self.ntotal = index.ntotal

    def _scan(self, q, coarse_dis, assign, dist_Qk, ids_Qk):
        qtab = (torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)) @ self.T_DX).numpy()
        base = np.ascontiguousarray(coarse_dis if self.l2 else -coarse_dis, dtype=np.float32)
        assign = np.ascontiguousarray(assign, dtype=np.int64)
        # the kernel writes the caller's rows (row blocks of C-contiguous arrays: contiguous)
        arrays = (qtab, self.ltab_CMK, self.norms, base, assign, self.code_ptrs, self.id_ptrs, self.sizes,
                  dist_Qk, ids_Qk)
        addr = [None if a is None else a.ctypes.data for a in arrays]
        n = self.fn(len(q), assign.shape[1], dist_Qk.shape[1], self.M, self.code_size, *addr)
        if n < 0:
            raise MemoryError("the shortlist scan could not allocate its per-thread table")
        self.scanned += n
        if not self.l2:
            np.negative(dist_Qk, out=dist_Qk)

    def search(self, coarse, q_QD, k, nprobe, quantizer_params=None):
        self.scanned = 0
        return super().search(coarse, q_QD, k, nprobe, quantizer_params)


class ShortlistScan(_TableScan):
    """The scan by a ``faiss.IndexIVFPQ`` over the lists of an IVF-RQ shortlist index (see the
    module), where no C compiler builds :class:`NativeScan`."""

    def __init__(self, index: faiss.IndexIVFResidualQuantizer, centroids_CD: np.ndarray, T_MKD: np.ndarray):
        M, K, D = T_MKD.shape
        C, d_fake = index.nlist, (M + 1) * D
        self.l2, self.invlists, self.M, self.D = index.metric_type == faiss.METRIC_L2, index.invlists, M, D
        if self.l2:
            self.quantizer = faiss.IndexFlatL2(d_fake)           # unused: the table holds the list terms
        else:                                                     # reconstruct(list) = [c, 0, ..., 0]
            self.remap = faiss.RemapDimensionsTransform(d_fake, D, faiss.swig_ptr(np.arange(D, dtype=np.int32)))
            self.flat = faiss.IndexFlatIP(D)
            self.flat.add(np.ascontiguousarray(centroids_CD, dtype=np.float32))
            self.quantizer = faiss.IndexPreTransform(self.remap, self.flat)
        ivf = faiss.IndexIVFPQ(self.quantizer, d_fake, C, M + 1, 8, index.metric_type)
        ivf.by_residual = True
        books = np.zeros((M + 1, K, D), dtype=np.float32)
        books[:M] = T_MKD
        faiss.copy_array_to_vector(books.ravel(), ivf.pq.centroids)
        ivf.is_trained = True
        ivf.replace_invlists(index.invlists, False)
        if self.l2:
            table_CMK = np.empty((C, M + 1, K), dtype=np.float32)
            table_CMK[:, :M] = list_tables(centroids_CD, T_MKD)
            table_CMK[:, M] = decoded_norms(index.rq)
            faiss.copy_array_to_AlignedTable(table_CMK.ravel(), ivf.precomputed_table)
            ivf.use_precomputed_table = 1
        self.ivf = ivf

    def sync(self, index) -> None:
        self.ivf.ntotal = index.ntotal

    def _scan(self, q, coarse_dis, assign, dist_Qk, ids_Qk):
        q_fake = np.zeros((len(q), self.M + 1, self.D), dtype=np.float32)
        q_fake[:, :self.M] = q[:, None, :]
        params = faiss.SearchParametersIVF(nprobe=assign.shape[1])
        self.ivf.search_preassigned_c(len(q), faiss.swig_ptr(q_fake), dist_Qk.shape[1], faiss.swig_ptr(assign),
                                      faiss.swig_ptr(coarse_dis), faiss.swig_ptr(dist_Qk), faiss.swig_ptr(ids_Qk),
                                      False, params)


def invalidate(index: faiss.Index) -> None:
    """Make the kept scan of ``index`` read its lists' addresses again at the next search: call it
    after changing the lists other than by an add or removal that changes ``ntotal`` (e.g. a
    ``reset`` followed by adding as many codes; :func:`~qinco2.ivfsearch.shortlist.add_codes`
    calls it)."""
    scan = _SCANS.get(index)
    if isinstance(scan, NativeScan):
        scan.ntotal = -1


def _native_lib() -> ctypes.CDLL | None:
    return native.load(KERNEL)


def scanner(index: faiss.Index) -> NativeScan | ShortlistScan | None:
    """The scan of ``index`` (built at the first call and kept while the index lives): a
    :class:`NativeScan` where the kernel compiles, else a :class:`ShortlistScan`; None where
    faiss's own scan must do (another code layout, or a table above ``MAX_TABLE_BYTES``)."""
    scan = _SCANS.get(index)
    if scan is not None and scan.invlists.this == index.invlists.this:
        scan.sync(index)
        return scan
    rq = getattr(index, "rq", None)
    usable = (isinstance(index, faiss.IndexIVFResidualQuantizer) and index.by_residual
              and rq.search_type == faiss.AdditiveQuantizer.ST_norm_qint8
              and all(b == 8 for b in faiss.vector_to_array(rq.nbits))
              and index.metric_type in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT))
    if usable and index.metric_type == faiss.METRIC_L2 and table_bytes(index.nlist, rq.M) > MAX_TABLE_BYTES:
        log.warning("the shortlist scan table would take %.1f GB (> %.1f GB): faiss's slower scan is used",
                    table_bytes(index.nlist, rq.M) / 1e9, MAX_TABLE_BYTES / 1e9)
        usable = False
    if not usable:
        return None
    centroids_CD = index.quantizer.reconstruct_n(0, index.nlist)
    T_MKD = faiss.vector_to_array(rq.codebooks).reshape(rq.M, 256, index.d)
    lib = _native_lib() if isinstance(faiss.downcast_InvertedLists(index.invlists), faiss.ArrayInvertedLists) else None
    scan = NativeScan(lib, index, centroids_CD, T_MKD) if lib is not None else ShortlistScan(index, centroids_CD, T_MKD)
    _SCANS[index] = scan
    scan.sync(index)
    return scan


def search(index: faiss.Index, q_QD: np.ndarray, k: int, nprobe: int, quantizer_efSearch: int):
    """``index.search`` of the shortlist index (HNSW quantizer at ``quantizer_efSearch``,
    ``nprobe`` lists), by the :class:`ShortlistScan` where it applies."""
    hnsw_params = faiss.SearchParametersHNSW(efSearch=quantizer_efSearch)
    scan = scanner(index)
    if scan is None:
        params = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=hnsw_params)
        return index.search(q_QD, k, params=params)
    return scan.search(index.quantizer, q_QD, k, nprobe, hnsw_params)
