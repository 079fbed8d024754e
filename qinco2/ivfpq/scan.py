"""IVF-PQ search: coarse probing, look-up tables per (query, list), table sums, top-k; and
search followed by refinement re-ranking (raw vectors or a QINCo2 codec).

Every stage is a batched torch operation, so the same code runs on CPU and CUDA. Queries go
in batches whose workspace (tables, gathered candidates, per-query padding) stays under
``workspace_bytes``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..ivf_lists import unpack_codes
from ..rerank import refine, refine_with_codec
from .index import Index, check_vectors, float_rows
from .params import DISTANCE_DTYPES, LUT_DTYPES, SearchParams

DEFAULT_WORKSPACE_BYTES = 256 << 20
LUT8_DTYPE, LUT8_MAX = torch.float8_e4m3fn, 448.0      # lut_dtype="uint8": 8-bit float entries
FP16_SUM_MAX = 60_000.0                                  # below float16's largest finite 65504


def _exact_scores(index: Index, q_rot: torch.Tensor, q_raw: torch.Tensor, l: int, r_nR: torch.Tensor):
    """Scores ``(nq, n)`` (smaller is better) of a list's decoded residuals, in float32:
    the sums of float32 look-up tables, computed as dot products with the decoded codes."""
    if index.metric == "sqeuclidean":                 # ||(q - c) - r||^2
        qc = q_rot - index.centers_rot[l]
        return torch.addmm((r_nR ** 2).sum(1)[None], qc, r_nR.T, alpha=-2) + (qc ** 2).sum(1)[:, None]
    return -torch.addmm((q_raw @ index.centers[l])[:, None], q_rot, r_nR.T)   # -<q, c + r>


def _table_scores(index: Index, p: SearchParams, q_rot, q_raw, l: int, codes_nS: torch.Tensor):
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
        const = -(q_raw @ index.centers[l])
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


def _search_batch(index: Index, p: SearchParams, q_QD: torch.Tensor, k: int):
    """Top-``k`` scores and ids ``(Q, k)`` of a batch of queries: the probed lists are
    scanned one after the other, each against all the queries that probe it."""
    Q, P, dev = len(q_QD), min(p.n_probes, index.n_lists), index.device
    exact = p.lut_dtype == "float32" and p.internal_distance_dtype == "float32"
    probe = index.coarse_scores(q_QD).topk(P, dim=1, largest=False).indices.reshape(-1)  # (Q*P,)
    q_rot = index.rotate(q_QD)
    order = torch.argsort(probe, stable=True)              # pairs (query * P + rank) by list
    counts = torch.bincount(probe, minlength=index.n_lists).cpu()
    first = (torch.cumsum(counts, 0) - counts).tolist()
    best = torch.full((Q * P, k), float("inf"), device=dev)
    best_ids = torch.full((Q * P, k), -1, dtype=torch.int64, device=dev)
    for l in torch.nonzero(counts * (index.lists.size > 0))[:, 0].tolist():
        pairs = order[first[l]:first[l] + int(counts[l])]
        J = pairs // P
        rows = index.lists.list_rows(l)
        codes = unpack_codes(index.lists.codes[rows], index.pq_dim, index.pq_bits)
        if exact:
            r = index.residuals(codes, torch.full((len(codes),), l, device=dev))
            scores = _exact_scores(index, q_rot[J], q_QD[J], l, r)
        else:
            scores = _table_scores(index, p, q_rot[J], q_QD[J], l, codes)
        top = torch.topk(scores, min(k, len(codes)), dim=1, largest=False)
        best[pairs, :top.values.shape[1]] = top.values
        best_ids[pairs, :top.values.shape[1]] = index.lists.ids[rows][top.indices]
    top = torch.topk(best.reshape(Q, P * k), k, dim=1, largest=False)
    return top.values, best_ids.reshape(Q, P * k).gather(1, top.indices)


def _batch_size(index: Index, p: SearchParams, k: int, workspace_bytes: int) -> int:
    """Queries per batch: the (query, probe) top-k buffers and one list's tables per query."""
    P = min(p.n_probes, index.n_lists)
    S, K = index.pq_dim, index.pq_book_size
    per_query = P * k * 12 + S * K * 12 + S * max(int(index.lists.size.max()), 1) * 8 + index.rot_dim * 8
    return max(1, workspace_bytes // per_query)


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
