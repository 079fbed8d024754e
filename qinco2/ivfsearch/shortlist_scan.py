"""The scan of the shortlist index with tables computed once per query, by faiss's IVF-PQ scanner.

faiss's own scan of an IVF additive-quantizer index computes, for every probed list, the table of
``<q - c, T_m[k]>`` over all ``M * K`` codewords: ``D * M * K`` multiply-adds per (query, list),
262k at D=128, M=8, where scanning the ~50 codes of a list costs a few hundred additions. It
bounded the first stage of IVF-QINCo2 (sift-photos, 2,048 lists: 3,800 queries/s at
``nprobe=4`` on 2 cores against 24,000 for ``IVF2048,PQ8x8``). The distance splits as

    ||q - c - r||^2 = ||q - c||^2  - 2 <q, r>  + 2 <c, r>  + ||r||^2,    r = sum_m T_m[i_m]

where ``||q - c||^2`` is the coarse distance, ``<q, r> = sum_m <q, T_m[i_m]>`` needs one table
per query, ``<c, r> = sum_m <c, T_m[i_m]>`` one table per list, independent of the query
(computed once), and ``||r||^2`` is the norm byte that the index stores. That is the distance of
faiss's ``IndexIVFPQ`` with precomputed tables (``use_precomputed_table=1``), with ``M + 1``
sub-quantizers over a space of ``(M + 1) * D`` dimensions: sub-space ``m < M`` holds the
codewords ``T_m`` and a copy of the query; sub-space ``M`` reads the norm byte, with zero
codewords and, as its precomputed entries, the 256 norms the byte stands for. The code layout,
``M`` code bytes then the norm byte, is the one the IVF-RQ index already stores, so the
``IndexIVFPQ`` shares its inverted lists (no copy).

Inner-product indexes (``<q, c + r>``, the norm byte unused): the per-list term is
``<q, c>``, which ``IndexIVFPQ`` takes from its quantizer's reconstruction of the list centre; the
quantizer here holds the ``C x D`` centres and pads them with zeros to ``(M + 1) * D``.

Memory: the precomputed L2 table, ``4 * C * (M + 1) * 256`` bytes (18.9 MB for 2,048 lists and
M=8), plus a copy of the ``C x D`` centres. Above ``MAX_TABLE_BYTES`` (faiss's own limit for
IVF-PQ tables) the search falls back to faiss's scan of the index. Results are those of faiss's
scan up to float32 rounding (the sums are grouped differently).
"""

from __future__ import annotations

import logging
import weakref

import faiss
import numpy as np

log = logging.getLogger(__name__)

MAX_TABLE_BYTES = 2 << 30          # faiss's precomputed_table_max_bytes
QUERY_BATCH = 4096                 # queries expanded to (M + 1) * D floats at a time
_SCANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def table_bytes(C: int, M: int, K: int = 256) -> int:
    """Bytes of the precomputed table of an L2 index of ``C`` lists and ``M`` code bytes."""
    return 4 * C * (M + 1) * K


def decoded_norms(rq) -> np.ndarray:
    """The 256 squared norms the ``ST_norm_qint8`` byte stands for (faiss's ``decode_qint8``)."""
    return ((np.arange(256, dtype=np.float32) + np.float32(0.5)) / np.float32(256)
            * np.float32(rq.norm_max - rq.norm_min) + np.float32(rq.norm_min))


class ShortlistScan:
    """A ``faiss.IndexIVFPQ`` that scans the lists of an IVF-RQ shortlist index (see the module)."""

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
            table_CMK[:, :M] = 2 * np.einsum("cd,mkd->cmk", centroids_CD, T_MKD, dtype=np.float32)
            table_CMK[:, M] = decoded_norms(index.rq)
            faiss.copy_array_to_AlignedTable(table_CMK.ravel(), ivf.precomputed_table)
            ivf.use_precomputed_table = 1
        self.ivf = ivf

    def search(self, coarse, q_QD: np.ndarray, k: int, nprobe: int, quantizer_params=None):
        """Distances and ids ``(Q, k)`` of the ``k`` nearest codes in the ``nprobe`` lists that
        ``coarse`` (the index's HNSW quantizer) finds for each query; -1 ids where fewer."""
        Q = len(q_QD)
        dist_Qk = np.empty((Q, k), dtype=np.float32)
        ids_Qk = np.empty((Q, k), dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        for lo in range(0, Q, QUERY_BATCH):
            q = q_QD[lo:lo + QUERY_BATCH]
            coarse_dis, assign = coarse.search(q, nprobe, params=quantizer_params)
            q_fake = np.zeros((len(q), self.M + 1, self.D), dtype=np.float32)
            q_fake[:, :self.M] = q[:, None, :]
            self.ivf.search_preassigned_c(len(q), faiss.swig_ptr(q_fake), k, faiss.swig_ptr(assign),
                                          faiss.swig_ptr(coarse_dis), faiss.swig_ptr(dist_Qk[lo:]),
                                          faiss.swig_ptr(ids_Qk[lo:]), False, params)
        return dist_Qk, ids_Qk


def scanner(index: faiss.Index) -> ShortlistScan | None:
    """The :class:`ShortlistScan` of ``index`` (built at the first call and kept while the index
    lives), or None where faiss's own scan must do (another code layout, or a table above
    ``MAX_TABLE_BYTES``)."""
    scan = _SCANS.get(index)
    if scan is not None and scan.invlists.this == index.invlists.this:
        scan.ivf.ntotal = index.ntotal
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
    scan = _SCANS[index] = ShortlistScan(index, centroids_CD, T_MKD)
    scan.ivf.ntotal = index.ntotal
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
