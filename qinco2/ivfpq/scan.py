"""IVF-PQ search: coarse probing, scoring of the probed lists' codes, top-k; and search
followed by refinement re-ranking (raw vectors or a QINCo2 codec).

With float32 tables the sum of a code's table entries equals a dot product of the query
with the decoded code, so lists are scored by matrix products with their decoded codes;
reduced-precision tables (``lut_dtype``, ``internal_distance_dtype``) are built and summed in
the requested types. Every stage of this torch scan is a torch operation, the same code on
CPU and CUDA. A CPU index with subspace codebooks is scanned by faiss's IVF-PQ scan over its
own lists instead (:mod:`.faiss_scan`; ``SearchParams.cpu_scan`` chooses): same results up to
float rounding and ties, several times faster on few CPU cores.

Memory: the search workspace stays under ``workspace_bytes`` whatever the list sizes. Queries
go in batches whose buffers (coarse scores, tables, top-k per probe) take at most half of it;
the probed lists are scanned in chunks (runs of small lists, pieces of a large one) whose
temporaries (unpacked and decoded rows, scores or gathered table entries) take the rest.
faiss's scan works query by query inside a batch (its per-thread tables and heaps are small).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .. import validation
from ..errors import ConfigError, InputError
from ..packing import unpack_codes
from ..rerank import refine, refine_with_codec
from ..tensor_io import accepts_tensors
from . import faiss_scan
from .index import Index, check_vectors, float_rows
from .params import DISTANCE_DTYPES, LUT_DTYPES, SearchParams

log = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 256 << 20
LUT8_DTYPE, LUT8_MAX = torch.float8_e4m3fn, 448.0      # lut_dtype="uint8": 8-bit float entries
FP16_SUM_MAX = 60_000.0                                  # below float16's largest finite 65504
GROUP_COST = 6e6      # fixed cost of one list group's operations, in multiply-adds (tuned on 2 CPU threads)


def _tables(index: Index, p: SearchParams, q_rot, pair_const, li: int):
    """Look-up tables ``(nq, S, K)`` of the (query, list ``li``) pairs, stored in ``p.lut_dtype``,
    with the scale and constants of their sums (:func:`_quantized`)."""
    nq, S, L = len(q_rot), index.pq_dim, index.pq_len
    books = index.pq_centers if index.params.codebook_kind == "subspace" else index.pq_centers[li].expand(S, -1, -1)
    if index.metric == "sqeuclidean":
        u = (q_rot - index.centers_rot[li]).reshape(nq, S, L).transpose(0, 1)          # (S, nq, L)
        lut = (torch.cdist(u, books) ** 2).transpose(0, 1)                              # (nq, S, K)
        const = torch.zeros(nq, device=q_rot.device)
    else:
        lut = -torch.bmm(q_rot.reshape(nq, S, L).transpose(0, 1), books.transpose(1, 2)).transpose(0, 1)
        const = pair_const                             # -<q, c>
    return _quantized(lut, const, p)


def _table_scores(p: SearchParams, tables, codes_nS: torch.Tensor):
    """Scores ``(nq, n)`` of ``n`` codes from :func:`_tables`, summed in
    ``p.internal_distance_dtype`` (the reduced-precision modes)."""
    lut, scale, const = tables
    index_nq = codes_nS.T[None].expand(len(lut), -1, -1)
    if lut.dtype == LUT8_DTYPE:                        # gather the bytes of the 8-bit floats
        vals = torch.gather(lut.view(torch.uint8), 2, index_nq).view(LUT8_DTYPE)       # (nq, S, n)
    else:
        vals = torch.gather(lut, 2, index_nq)
    if scale is None:
        return vals.sum(1) + const[:, None]
    dtype = DISTANCE_DTYPES[p.internal_distance_dtype]
    return vals.to(dtype).sum(1, dtype=dtype).float() * scale[:, None] + const[:, None]


def _quantized(lut: torch.Tensor, const: torch.Tensor, p: SearchParams):
    """The tables in ``p.lut_dtype`` and the ``scale`` and constants that map their sums
    (taken in ``p.internal_distance_dtype``) back to scores: ``score = sum * scale + const``.

    Below float32, each sub-table's minimum moves into the constant and each table is scaled
    so that its entries fit the table type (8-bit tables hold a small float, like cuVS's:
    relative precision at every magnitude, so the small entries that decide the top-k keep
    their resolution) and its largest possible sum fits a float16 accumulator."""
    if p.lut_dtype == "float32" and p.internal_distance_dtype == "float32":
        return lut, None, const
    low = lut.amin(-1, keepdim=True)
    peak = (lut - low).amax(-1)                                             # (tables, S)
    ratios = []
    if p.internal_distance_dtype == "float16":
        ratios.append(peak.sum(-1) / FP16_SUM_MAX)
    if p.lut_dtype != "float32":
        ratios.append(peak.amax(-1) / (LUT8_MAX if p.lut_dtype == "uint8" else FP16_SUM_MAX))
    scale = torch.stack(ratios).amax(0).clamp_min(1e-30)
    stored = LUT8_DTYPE if p.lut_dtype == "uint8" else LUT_DTYPES[p.lut_dtype]
    return ((lut - low) / scale[:, None, None]).to(stored), scale, const + low.sum((-1, -2))


def _query_bytes(P: int, k: int, S: int, K: int, R: int, C: int, exact: bool) -> int:
    """Workspace of one query of a batch: its coarse scores over the ``C`` lists, the bookkeeping
    and top-``k`` buffers of its ``P`` (query, list) pairs (kept, reordered, merged), its rotated
    copy and, for reduced-precision tables, its look-up tables (built, shifted, quantized)."""
    return C * 8 + P * (40 + 24 * k) + R * 8 + (0 if exact else S * K * 12)


def _row_bytes(S: int, R: int, code_bytes: int, exact: bool) -> int:
    """Temporaries of one scanned row whatever the queries: its buffer row, id and list,
    packed and unpacked codes (with the unpacking's int64 temporaries) and, for float32 tables,
    its decoded residual and the temporaries of its row term."""
    return 32 + code_bytes + 48 * S + (16 * R if exact else 0)


def _pair_row_bytes(S: int, p: SearchParams) -> int:
    """Temporaries of one (query, row) score: with float32 tables the score and its mask; else
    the ``S`` gathered table entries (``lut_dtype``), their copy in ``internal_distance_dtype``
    and the sums."""
    if _exact(p):
        return 8
    lut = 1 if p.lut_dtype == "uint8" else LUT_DTYPES[p.lut_dtype].itemsize
    return S * (lut + DISTANCE_DTYPES[p.internal_distance_dtype].itemsize) + 16


def _exact(p: SearchParams) -> bool:
    return p.lut_dtype == "float32" and p.internal_distance_dtype == "float32"


def _chunks(size_U: list[int], pairs_U: list[int], target: float, row_bytes: int, pair_row_bytes: int,
            budget: int) -> list[tuple[int, int, int, int]]:
    """How to scan the probed lists (``size_U`` rows and ``pairs_U`` (query, list) pairs each):
    chunks ``(u0, u1, a, b)`` = lists ``u0 .. u1 - 1``, rows ``a .. b`` of the probed rows (list
    after list). A chunk is a run of whole lists of about ``target`` rows, or a piece of one
    list; its temporaries, ``rows * (row_bytes + pairs * pair_row_bytes)``, stay under
    ``budget`` (a chunk holds at least one row)."""
    out, u0, a0, rows, pairs = [], 0, 0, 0, 0
    for u, (n, m) in enumerate(zip(size_U, pairs_U)):
        if rows and (rows + n) * (row_bytes + (pairs + m) * pair_row_bytes) > budget:
            out.append((u0, u, a0, a0 + rows))             # the run without list u
            u0, a0, rows, pairs = u, a0 + rows, 0, 0
        piece = max(1, budget // (row_bytes + m * pair_row_bytes))
        if n > piece:                                        # too large alone: pieces of the list
            out += [(u, u + 1, a0 + i, a0 + min(i + piece, n)) for i in range(0, n, piece)]
            u0, a0 = u + 1, a0 + n
            continue
        rows, pairs = rows + n, pairs + m
        if rows >= target:
            out.append((u0, u + 1, a0, a0 + rows))
            u0, a0, rows, pairs = u + 1, a0 + rows, 0, 0
    if rows:
        out.append((u0, len(size_U), a0, a0 + rows))
    return out


def _row_terms(index: Index, r_nR: torch.Tensor, lists_n: torch.Tensor) -> torch.Tensor:
    """The query-independent part of each decoded row's score: ``|r|^2 + 2 <c, r>`` for L2
    (``|q - c - r|^2 = |q - c|^2 - 2 <q, r> + |r|^2 + 2 <c, r>`` in the rotated space), 0 for
    inner products (``-<q, c + r> = -<q, c> - <q, r>``)."""
    if index.metric != "sqeuclidean":
        return torch.zeros(len(r_nR), device=r_nR.device)
    return ((r_nR + 2 * index.centers_rot[lists_n]) * r_nR).sum(1)


class _Probes:
    """The (query, list) pairs of a batch, grouped by list: for each pair (in list order) its
    query, its list and its score constant (``|q - c|^2``, or ``-<q, c>``); per list its number
    of pairs and its first pair; the probed non-empty lists ``lists_U`` and where their rows
    start in the probed order."""

    def __init__(self, index: Index, p: SearchParams, q_QD: torch.Tensor):
        self.P = P = min(p.n_probes, index.n_lists)
        coarse = index.coarse_scores(q_QD).topk(P, dim=1, largest=False)
        probe = coarse.indices.reshape(-1)                                # pair = query * P + rank
        const = coarse.values                                             # -<q, c> for inner products
        if index.metric == "sqeuclidean":
            const = const + (q_QD * q_QD).sum(1, keepdim=True)           # |q - c|^2
        self.order = torch.argsort(probe, stable=True)                    # pairs grouped by list
        self.query_of, self.list_of = self.order // P, probe[self.order]
        self.const = const.reshape(-1)[self.order]
        self.counts = torch.bincount(probe, minlength=index.n_lists).cpu()
        self.first = (torch.cumsum(self.counts, 0) - self.counts).tolist()
        self.lists_U = torch.nonzero((self.counts > 0) & (index.lists.size > 0))[:, 0]
        size_U = index.lists.size[self.lists_U]
        self.first_U = torch.cumsum(size_U, 0) - size_U

    def pairs(self, lists: torch.Tensor) -> slice:
        """The pairs of a run of probed lists."""
        l0, l1 = int(lists[0]), int(lists[-1])
        return slice(self.first[l0], self.first[l1] + int(self.counts[l1]))


def _scan_chunk(index: Index, p: SearchParams, q_rot: torch.Tensor, pr: _Probes, chunk, k: int, tables=None):
    """The pairs of a chunk, their top-``k`` scores and ids among the chunk's rows, and the
    look-up tables used (reduced precision: ``tables`` are those of the list's earlier pieces)."""
    u0, u1, a, b = chunk
    first = int(pr.first_U[u0])                                  # rows a .. b in the probed order
    packed, ids_n, lists_n = index.lists.gather(pr.lists_U[u0:u1], a - first, b - first)
    codes = unpack_codes(packed, index.pq_dim, index.pq_bits)
    sel = pr.pairs(pr.lists_U[u0:u1])
    if _exact(p):
        r = index.residuals(codes, lists_n)
        alpha = -2.0 if index.metric == "sqeuclidean" else -1.0
        scores = torch.addmm(_row_terms(index, r, lists_n)[None], q_rot[pr.query_of[sel]], r.T, alpha=alpha)
        if u1 - u0 > 1:                      # a query is scored only on its own list's rows
            scores.masked_fill_(lists_n[None] != pr.list_of[sel][:, None], float("inf"))
        scores += pr.const[sel][:, None]
    else:
        if tables is None:
            tables = _tables(index, p, q_rot[pr.query_of[sel]], pr.const[sel], int(pr.lists_U[u0]))
        scores = _table_scores(p, tables, codes)
    top = torch.topk(scores, min(k, b - a), dim=1, largest=False)
    return sel, top.values, ids_n[top.indices], tables


def _search_batch(index: Index, p: SearchParams, q_QD: torch.Tensor, k: int, budget: int):
    """Top-``k`` scores and ids ``(Q, k)`` of a batch of queries.

    The probed lists are scanned in chunks (:func:`_chunks`) whose temporaries stay under
    ``budget`` bytes: a large list is scanned in pieces, its pairs' top-k merged piece after
    piece. Float32 table sums are computed as what they equal: dot products of the rotated
    queries with the decoded residuals, one matrix product per run of consecutive lists
    against all the (query, list) pairs of the run, the products of a query with the rows
    of lists it does not probe being masked; the run length balances per-run overhead
    against that waste. Reduced-precision tables are scored list by list."""
    Q, dev = len(q_QD), index.device
    pr = _Probes(index, p, q_QD)
    q_rot = index.rotate(q_QD)
    size_U, pairs_U = index.lists.size[pr.lists_U].tolist(), pr.counts[pr.lists_U].tolist()
    target = (sum(size_U) * GROUP_COST / max(Q * pr.P * 2 * index.rot_dim, 1)) ** 0.5 if _exact(p) else 0
    row_bytes = _row_bytes(index.pq_dim, index.rot_dim, index.code_bytes, _exact(p))
    best = torch.full((Q * pr.P, k), float("inf"), device=dev)          # in list-sorted pair order
    best_ids = torch.full((Q * pr.P, k), -1, dtype=torch.int64, device=dev)
    tables = None
    for chunk in _chunks(size_U, pairs_U, target, row_bytes, _pair_row_bytes(index.pq_dim, p), budget):
        later = chunk[2] > int(pr.first_U[chunk[0]])          # a later piece of a list
        sel, values, ids, tables = _scan_chunk(index, p, q_rot, pr, chunk, k, tables if later else None)
        if later:                                             # merge with the earlier pieces
            values, ids = torch.cat([best[sel], values], 1), torch.cat([best_ids[sel], ids], 1)
            top = torch.topk(values, k, dim=1, largest=False)
            values, ids = top.values, ids.gather(1, top.indices)
        best[sel, :values.shape[1]], best_ids[sel, :values.shape[1]] = values, ids
    best_ids[torch.isinf(best)] = -1
    back = torch.argsort(pr.order)                                       # to query-major pair order
    top = torch.topk(best[back].reshape(Q, pr.P * k), k, dim=1, largest=False)
    return top.values, best_ids[back].reshape(Q, pr.P * k).gather(1, top.indices)


def _batch_size(index: Index, p: SearchParams, k: int, workspace_bytes: int) -> int:
    """Queries per batch: their buffers take at most half of the workspace, the scan of the
    probed lists the rest."""
    return max(1, workspace_bytes // 2 // _index_query_bytes(index, p, k))


def _index_query_bytes(index: Index, p: SearchParams, k: int) -> int:
    return _query_bytes(min(p.n_probes, index.n_lists), k, index.pq_dim, index.pq_book_size, index.rot_dim,
                        index.n_lists, _exact(p))


def search_workspace_bytes(p: SearchParams, k: int, *, n_queries: int, n_lists: int, pq_dim: int, pq_bits: int,
                           rot_dim: int, list_rows: int, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """Peak search workspace: the buffers of a batch of queries plus the temporaries of scanning
    a list of ``list_rows`` rows that every query of the batch probes, at most ``workspace_bytes``
    (or one query and one row, when those alone take more)."""
    per_query = _query_bytes(min(p.n_probes, n_lists), k, pq_dim, 1 << pq_bits, rot_dim, n_lists, _exact(p))
    nq = min(max(n_queries, 1), max(1, workspace_bytes // 2 // per_query))
    per_row = _row_bytes(pq_dim, rot_dim, pq_dim * pq_bits // 8, _exact(p)) + nq * _pair_row_bytes(pq_dim, p)
    need = nq * per_query + list_rows * per_row
    return min(need, max(workspace_bytes, per_query + per_row))


def _use_faiss(index: Index, p: SearchParams) -> bool:
    """Whether faiss's scan searches ``index`` (``p.cpu_scan``, see :class:`SearchParams`)."""
    if p.cpu_scan == "torch":
        return False
    if faiss_scan.supported(index):
        return True
    if p.cpu_scan == "faiss":
        raise ConfigError(f"cpu_scan='faiss' needs a CPU index with codebook_kind='subspace'; this one is on "
                          f"{index.device} with codebook_kind={index.params.codebook_kind!r}: use cpu_scan='auto' "
                          "(the torch scan here) or 'torch'")
    return False


def _to_metric(index: Index, dist_QK: torch.Tensor) -> torch.Tensor:
    if index.metric == "inner_product":
        return -dist_QK
    if index.metric == "cosine":
        return 1 + dist_QK
    return dist_QK


@accepts_tensors
def search(search_params: SearchParams, index: Index, queries, k: int, *,
           workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` approximate nearest neighbours of each query: ``(distances, neighbors)``,
    float32 and int64 ``(Q, k)``; -1 ids (and inf distances, -inf for inner products) where
    the probed lists hold fewer than ``k`` vectors. ``workspace_bytes`` bounds the temporaries
    (see the module docstring; :func:`search_workspace_bytes` estimates them). A CPU index with
    subspace codebooks is scanned by faiss (``search_params.cpu_scan``; :mod:`.faiss_scan`)."""
    p = search_params.validated()
    queries = check_vectors(queries, "queries", index.dim)
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be an integer >= 1, got {k!r}")
    if k > index.size:
        raise InputError(f"k={k} is larger than the {index.size} vectors in the index; use k <= {index.size}")
    Q = len(queries)
    distances = np.full((Q, k), np.inf, dtype=np.float32)
    neighbors = np.full((Q, k), -1, dtype=np.int64)
    step = _batch_size(index, p, k, workspace_bytes)
    use_faiss = _use_faiss(index, p)
    with torch.no_grad():
        for a in range(0, Q, step):
            q_QD = float_rows(queries[a:a + step], index.device, index.metric == "cosine")
            if use_faiss:
                dist, ids = faiss_scan.search_batch(index, p, q_QD, k)
            else:
                budget = workspace_bytes - len(q_QD) * _index_query_bytes(index, p, k)
                dist, ids = _search_batch(index, p, q_QD, k, budget)
                dist, ids = _to_metric(index, dist).cpu().numpy(), ids.cpu().numpy()
            distances[a:a + len(q_QD), :dist.shape[1]] = dist
            neighbors[a:a + len(q_QD), :ids.shape[1]] = ids
    if index.metric == "inner_product":
        distances[neighbors < 0] = -np.inf
    return distances, neighbors


def _check_database(index: Index, dataset, codes) -> None:
    """The refinement database has the index's row count and (raw vectors) fingerprint."""
    fp = index.fingerprint
    if fp is None:
        log.warning("this index was saved without the row count and fingerprint of its database (an "
                    "older qinco2): cannot check that the refinement data are the rows it was built from; "
                    "rebuild the index to get the check")
    elif dataset is not None:
        validation.check_vectors(dataset, "dataset", index.dim, dim_owner=f"the index has dim={index.dim}",
                                 finite=False)    # rows read by refine are checked there
        fp.check(dataset)
    elif isinstance(codes, np.ndarray) and len(codes) != fp.rows:
        raise InputError(f"the index was built from {fp.rows} rows (fingerprint {fp.digest()}), but codes= "
                         f"holds {len(codes)} rows; pass the codes of the database the index was built from")


@accepts_tensors
def search_and_refine(search_params: SearchParams, index: Index, queries, k: int, *, refine_ratio: float = 2,
                      dataset=None, codec=None, codes=None,
                      workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Search ``k0 = ceil(refine_ratio * k)`` candidates, then keep the best ``k`` by exact
    distances to the raw ``dataset`` rows, or (``codec`` and ``codes``) to the vectors the
    QINCo2 codec decodes from the database's compact codes. Ids must be dataset rows:
    :class:`InputError` when ``dataset`` has another row count or fingerprint than the
    database the index was built from (``codes``: another row count)."""
    if (dataset is None) == (codec is None):
        raise InputError("pass either dataset= (raw vectors) or codec= and codes= (QINCo2 codes) to refine with")
    if refine_ratio < 1:
        raise InputError(f"refine_ratio must be >= 1, got {refine_ratio}")
    if codec is not None and codes is None:
        raise InputError("codec= needs codes= (the database encoded by that codec, one row per id)")
    _check_database(index, dataset, codes)
    k0 = min(int(np.ceil(refine_ratio * k)), index.size)
    _, candidates = search(search_params, index, queries, k0, workspace_bytes=workspace_bytes)
    metric = index.metric
    if dataset is not None:
        return refine(dataset, queries, candidates, k, metric=metric)
    return refine_with_codec(codec, codes, queries, candidates, k, metric=metric)
