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


def _tables(index: Index, q_QD: torch.Tensor, probe_QP: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Look-up tables ``(Q*P, S, K)`` float32 and per-(query, list) constants ``(Q*P,)``;
    the score of a code is the constant plus its table sum (smaller is better)."""
    Q, P = probe_QP.shape
    S, L, K = index.pq_dim, index.pq_len, index.pq_book_size
    q_rot = index.rotate(q_QD)
    if index.metric == "sqeuclidean":            # ||residual - codeword||^2, sub-space by sub-space
        u = (q_rot[:, None] - index.centers_rot[probe_QP]).reshape(Q * P, S, L)
        const = torch.zeros(Q * P, device=q_QD.device)
    else:                                          # -<q, centre> - <q_rot, codeword>
        u = q_rot.reshape(Q, 1, S, L).expand(Q, P, S, L).reshape(Q * P, S, L)
        const = -(q_QD[:, None] * index.centers[probe_QP]).sum(-1).reshape(-1)
    if index.params.codebook_kind == "subspace":
        dot = torch.bmm(u.transpose(0, 1), index.pq_centers.transpose(1, 2)).transpose(0, 1)
        book_sq = (index.pq_centers ** 2).sum(-1)[None]                     # (1, S, K)
    else:
        books = index.pq_centers[probe_QP.reshape(-1)]                     # (Q*P, K, L)
        dot = torch.bmm(u, books.transpose(1, 2))
        book_sq = (books ** 2).sum(-1)[:, None]                             # (Q*P, 1, K)
    if index.metric == "sqeuclidean":
        return (u ** 2).sum(-1, keepdim=True) - 2 * dot + book_sq, const
    return -dot, const


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


def _candidates(index: Index, probe_QP: torch.Tensor):
    """Rows of the lists' buffers scanned for each (query, probe), flattened."""
    lists = index.lists
    dev = index.device
    probes = probe_QP.reshape(-1).cpu()
    n_pair = lists.size[probes]
    pair = torch.repeat_interleave(torch.arange(len(probes)), n_pair)
    first = torch.cumsum(n_pair, 0) - n_pair
    rows = lists.start[probes][pair] + torch.arange(len(pair)) - first[pair]
    return pair.to(dev), rows.to(dev), n_pair


def _search_batch(index: Index, p: SearchParams, q_QD: torch.Tensor, k: int):
    Q, P = len(q_QD), min(p.n_probes, index.n_lists)
    S, K = index.pq_dim, index.pq_book_size
    probe_QP = index.coarse_scores(q_QD).topk(P, dim=1, largest=False).indices
    lut, scale, const = _quantized(*_tables(index, q_QD, probe_QP), p)
    pair, rows, n_pair = _candidates(index, probe_QP)
    codes = unpack_codes(index.lists.codes[rows], S, index.pq_bits)
    flat = pair[:, None] * (S * K) + torch.arange(S, device=index.device) * K + codes
    vals = lut.reshape(-1)[flat]
    dtype = DISTANCE_DTYPES[p.internal_distance_dtype]
    if scale is None:                                   # float32 tables and sums
        dist = vals.sum(-1) + const[pair]
    else:
        dist = vals.to(dtype).sum(-1, dtype=dtype).float() * scale[pair] + const[pair]
    n_query = n_pair.reshape(Q, P).sum(1)
    width = max(int(n_query.max()) if Q else 0, 1)
    query = (pair // P).long()
    pos = torch.arange(len(pair), device=index.device) - (torch.cumsum(n_query, 0) - n_query).to(index.device)[query]
    dist_QW = torch.full((Q, width), float("inf"), device=index.device)
    ids_QW = torch.full((Q, width), -1, dtype=torch.int64, device=index.device)
    dist_QW[query, pos] = dist
    ids_QW[query, pos] = index.lists.ids[rows]
    top = torch.topk(dist_QW, min(k, width), dim=1, largest=False)
    return top.values, ids_QW.gather(1, top.indices)


def _batch_size(index: Index, p: SearchParams, workspace_bytes: int) -> int:
    P = min(p.n_probes, index.n_lists)
    S, K = index.pq_dim, index.pq_book_size
    n_cand = P * max(int(index.lists.size.max()), 1)
    per_query = (P * S * K * 9 + (P * K * index.pq_len * 4 if index.params.codebook_kind == "cluster" else 0)
                 + n_cand * (S * 20 + index.code_bytes + 48))
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
    step = _batch_size(index, p, workspace_bytes)
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
