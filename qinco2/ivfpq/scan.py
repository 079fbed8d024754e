"""IVF-PQ search: coarse probing, scoring of the probed lists' codes, top-k; and search
followed by refinement re-ranking (raw vectors or a QINCo2 codec).

With float32 tables the sum of a code's table entries equals a dot product of the query
with the decoded code, so lists are scored by matrix products with their decoded codes;
reduced-precision tables (``lut_dtype``, ``internal_distance_dtype``) are built and summed in
the requested types. Every stage is a torch operation, the same code on CPU and CUDA.
Queries go in batches whose workspace stays under ``workspace_bytes``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..packing import unpack_codes
from ..rerank import refine, refine_with_codec
from .index import Index, check_vectors, float_rows
from .params import DISTANCE_DTYPES, LUT_DTYPES, SearchParams

DEFAULT_WORKSPACE_BYTES = 256 << 20
LUT8_DTYPE, LUT8_MAX = torch.float8_e4m3fn, 448.0      # lut_dtype="uint8": 8-bit float entries
FP16_SUM_MAX = 60_000.0                                  # below float16's largest finite 65504
BLOCK_ROWS = 2048    # vectors decoded at a time: temporaries small enough for malloc to reuse
GROUP_COST = 6e6      # fixed cost of one list group's operations, in multiply-adds (tuned on 2 CPU threads)


def _table_scores(index: Index, p: SearchParams, q_rot, pair_const, l: int, codes_nS: torch.Tensor):
    """Scores ``(nq, n)`` from look-up tables ``(nq, S, K)`` stored in ``p.lut_dtype`` and
    summed in ``p.internal_distance_dtype`` (the reduced-precision modes)."""
    nq, S, L = len(q_rot), index.pq_dim, index.pq_len
    books = index.pq_centers if index.params.codebook_kind == "subspace" else index.pq_centers[l].expand(S, -1, -1)
    if index.metric == "sqeuclidean":
        u = (q_rot - index.centers_rot[l]).reshape(nq, S, L).transpose(0, 1)          # (S, nq, L)
        lut = (torch.cdist(u, books) ** 2).transpose(0, 1)                              # (nq, S, K)
        const = torch.zeros(nq, device=q_rot.device)
    else:
        lut = -torch.bmm(q_rot.reshape(nq, S, L).transpose(0, 1), books.transpose(1, 2)).transpose(0, 1)
        const = pair_const                             # -<q, c>
    lut, scale, const = _quantized(lut, const, p)
    index_nq = codes_nS.T[None].expand(nq, -1, -1)
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


def _probed_rows(index: Index, lists_U: torch.Tensor):
    """Buffer rows of the probed lists, list after list, and where each list starts there."""
    size_U = index.lists.size[lists_U]
    first_U = torch.cumsum(size_U, 0) - size_U
    rows = torch.repeat_interleave(index.lists.start[lists_U] - first_U, size_U) + torch.arange(int(size_U.sum()))
    return rows.to(index.device), first_U.tolist(), size_U.tolist()


def _blocks(lists_U: torch.Tensor, size_U: torch.Tensor, rows: int = BLOCK_ROWS):
    """Runs of consecutive probed lists holding about ``rows`` vectors (at least one list)."""
    block_of = torch.div(torch.cumsum(size_U, 0) - size_U, rows, rounding_mode="floor")
    return [lists_U[block_of == b] for b in torch.unique_consecutive(block_of).tolist()]


def _row_terms(index: Index, r_nR: torch.Tensor, lists_n: torch.Tensor) -> torch.Tensor:
    """The query-independent part of each decoded row's score: ``|r|^2 + 2 <c, r>`` for L2
    (``|q - c - r|^2 = |q - c|^2 - 2 <q, r> + |r|^2 + 2 <c, r>`` in the rotated space), 0 for
    inner products (``-<q, c + r> = -<q, c> - <q, r>``)."""
    if index.metric != "sqeuclidean":
        return torch.zeros(len(r_nR), device=r_nR.device)
    return ((r_nR + 2 * index.centers_rot[lists_n]) * r_nR).sum(1)


def _groups(sizes: list[int], target_rows: float) -> list[tuple[int, int]]:
    """Runs ``(first, stop)`` of consecutive lists holding about ``target_rows`` vectors."""
    out, start, rows = [], 0, 0
    for i, n in enumerate(sizes):
        rows += n
        if rows >= target_rows:
            out.append((start, i + 1))
            start, rows = i + 1, 0
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def _search_batch(index: Index, p: SearchParams, q_QD: torch.Tensor, k: int):
    """Top-``k`` scores and ids ``(Q, k)`` of a batch of queries.

    The probed lists are unpacked (and, for float32 tables, decoded) ``BLOCK_ROWS`` vectors at
    a time. Float32 table sums are computed as what they equal: dot products of the rotated
    queries with the decoded residuals, one matrix product per group of consecutive lists
    against all the (query, list) pairs of the group, the products of a query with the rows
    of lists it does not probe being masked; the group size balances per-group overhead
    against that waste. Reduced-precision tables are scored list by list."""
    Q, P, dev = len(q_QD), min(p.n_probes, index.n_lists), index.device
    exact = p.lut_dtype == "float32" and p.internal_distance_dtype == "float32"
    coarse = index.coarse_scores(q_QD).topk(P, dim=1, largest=False)
    probe = coarse.indices.reshape(-1)                                  # (Q*P,) pair = query * P + rank
    pair_const = coarse.values                                           # -<q, c> for inner products
    if index.metric == "sqeuclidean":
        pair_const = pair_const + (q_QD * q_QD).sum(1, keepdim=True)    # |q - c|^2
    pair_const = pair_const.reshape(-1)
    q_rot = index.rotate(q_QD)
    order = torch.argsort(probe, stable=True)                            # pairs grouped by list
    query_of, list_of = order // P, probe[order]
    counts = torch.bincount(probe, minlength=index.n_lists).cpu()
    pair_first = (torch.cumsum(counts, 0) - counts).tolist()
    lists_U = torch.nonzero((counts > 0) & (index.lists.size > 0))[:, 0]
    n_rows = int(index.lists.size[lists_U].sum())
    target = (n_rows * GROUP_COST / max(Q * P * 2 * index.rot_dim, 1)) ** 0.5 if exact else 0
    best = torch.full((Q * P, k), float("inf"), device=dev)             # in list-sorted pair order
    best_ids = torch.full((Q * P, k), -1, dtype=torch.int64, device=dev)
    alpha = -2.0 if index.metric == "sqeuclidean" else -1.0
    for block in _blocks(lists_U, index.lists.size[lists_U]):
        rows, first_U, size_U = _probed_rows(index, block)
        codes = unpack_codes(index.lists.codes[rows], index.pq_dim, index.pq_bits)
        ids = index.lists.ids[rows]
        block_lists = block.tolist()
        if exact:
            lists_n = torch.repeat_interleave(block.to(dev), torch.tensor(size_U, device=dev))
            r = index.residuals(codes, lists_n)
        for g0, g1 in _groups(size_U, target):
            l0, l1 = block_lists[g0], block_lists[g1 - 1]
            sel = slice(pair_first[l0], pair_first[l1] + int(counts[l1]))
            a, b = first_U[g0], first_U[g1 - 1] + size_U[g1 - 1]
            if exact:
                t = _row_terms(index, r[a:b], lists_n[a:b])     # per group: small temporaries
                scores = torch.addmm(t[None], q_rot[query_of[sel]], r[a:b].T, alpha=alpha)
                if g1 - g0 > 1:                 # a query is scored only on its own list's rows
                    scores.masked_fill_(lists_n[a:b][None] != list_of[sel][:, None], float("inf"))
                scores += pair_const[order[sel]][:, None]
            else:
                scores = _table_scores(index, p, q_rot[query_of[sel]], pair_const[order[sel]], l0, codes[a:b])
            top = torch.topk(scores, min(k, b - a), dim=1, largest=False)
            best[sel, :top.values.shape[1]] = top.values
            best_ids[sel, :top.values.shape[1]] = ids[a:b][top.indices]
    best_ids[torch.isinf(best)] = -1
    back = torch.argsort(order)                                          # to query-major pair order
    top = torch.topk(best[back].reshape(Q, P * k), k, dim=1, largest=False)
    return top.values, best_ids[back].reshape(Q, P * k).gather(1, top.indices)


def _batch_size(index: Index, p: SearchParams, k: int, workspace_bytes: int) -> int:
    """Queries per batch: the (query, probe) top-k buffers and one list's tables per query
    (the decoded rows of the probed lists take ``BLOCK_ROWS`` rows at a time)."""
    P = min(p.n_probes, index.n_lists)
    per_query = P * k * 12 + index.pq_dim * index.pq_book_size * 12 + index.rot_dim * 8
    return max(1, (workspace_bytes - BLOCK_ROWS * (index.rot_dim * 4 + index.pq_dim * 8 + 16)) // per_query)


def _to_metric(index: Index, dist_QK: torch.Tensor) -> torch.Tensor:
    if index.metric == "inner_product":
        return -dist_QK
    if index.metric == "cosine":
        return 1 + dist_QK
    return dist_QK


def search(search_params: SearchParams, index: Index, queries, k: int, *,
           workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` approximate nearest neighbours of each query: ``(distances, neighbors)``,
    float32 and int64 ``(Q, k)``; -1 ids (and inf distances, -inf for inner products) where
    the probed lists hold fewer than ``k`` vectors."""
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
    with torch.no_grad():
        for a in range(0, Q, step):
            q_QD = float_rows(queries[a:a + step], index.device, index.metric == "cosine")
            dist, ids = _search_batch(index, p, q_QD, k)
            distances[a:a + len(q_QD), :dist.shape[1]] = _to_metric(index, dist).cpu().numpy()
            neighbors[a:a + len(q_QD), :ids.shape[1]] = ids.cpu().numpy()
    if index.metric == "inner_product":
        distances[neighbors < 0] = -np.inf
    return distances, neighbors


def search_and_refine(search_params: SearchParams, index: Index, queries, k: int, *, refine_ratio: float = 2,
                      dataset=None, codec=None, codes=None,
                      workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Search ``k0 = ceil(refine_ratio * k)`` candidates, then keep the best ``k`` by exact
    distances to the raw ``dataset`` rows, or (``codec`` and ``codes``) to the vectors the
    QINCo2 codec decodes from the database's compact codes. Ids must be dataset rows."""
    if (dataset is None) == (codec is None):
        raise InputError("pass either dataset= (raw vectors) or codec= and codes= (QINCo2 codes) to refine with")
    if refine_ratio < 1:
        raise InputError(f"refine_ratio must be >= 1, got {refine_ratio}")
    k0 = min(int(np.ceil(refine_ratio * k)), index.size)
    _, candidates = search(search_params, index, queries, k0, workspace_bytes=workspace_bytes)
    metric = index.metric
    if dataset is not None:
        return refine(dataset, queries, candidates, k, metric=metric)
    if codes is None:
        raise InputError("codec= needs codes= (the database encoded by that codec, one row per id)")
    return refine_with_codec(codec, codes, queries, candidates, k, metric=metric)
