"""Exact re-ranking of candidate lists: by raw vectors (cuVS ``refine``) or by vectors
decoded from compact codes (a QINCo2 codec), one implementation for both.

Candidates are database row ids ``(Q, S)`` (-1: none); the vectors of the candidates are
fetched ``batch_rows`` at a time, so the raw vectors may be a memory-mapped file of any size.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

RERANK_METRICS = ("sqeuclidean", "inner_product", "cosine")


def _chunks(Q: int, S: int, batch_rows: int):
    """Query ranges whose ``(queries, S)`` candidate blocks hold about ``batch_rows`` rows."""
    step = max(1, batch_rows // max(S, 1))
    return [(i, min(i + step, Q)) for i in range(0, Q, step)]


def exact_rerank(q_QD: np.ndarray, ids_QS: np.ndarray, vectors_of, k: int, *,
                 metric: str = "sqeuclidean", batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best candidates of each query by exact ``metric``: distances ``(Q, k)``
    float32 (squared L2; inner product, descending; or 1 - cosine) and ids ``(Q, k)`` int64,
    padded with -1 (and inf / -inf) where a query has fewer than ``k`` candidates.
    ``vectors_of(ids_n)``: float vectors ``(n, D)`` of database rows ``ids_n``."""
    if metric not in RERANK_METRICS:
        raise InputError(f"metric must be one of {RERANK_METRICS}, got {metric!r}")
    Q, S = ids_QS.shape
    largest = metric == "inner_product"
    out_ids = np.full((Q, k), -1, dtype=np.int64)
    out_dist = np.full((Q, k), -np.inf if largest else np.inf, dtype=np.float32)
    n_keep = min(k, S)
    for a, b in _chunks(Q, S, batch_rows):
        ids = ids_QS[a:b]
        valid = torch.from_numpy(ids >= 0)
        x = np.asarray(vectors_of(np.where(ids >= 0, ids, 0).ravel()), dtype=np.float32)
        x_QSD = torch.from_numpy(x).reshape(b - a, S, -1)
        q_QD = torch.from_numpy(np.ascontiguousarray(q_QD[a:b], dtype=np.float32))
        if metric == "sqeuclidean":
            dist = ((x_QSD - q_QD[:, None]) ** 2).sum(-1)
        else:
            if metric == "cosine":
                x_QSD = torch.nn.functional.normalize(x_QSD, dim=-1)
                q_QD = torch.nn.functional.normalize(q_QD, dim=-1)
            dist = (x_QSD * q_QD[:, None]).sum(-1)
            dist = dist if largest else 1 - dist
        dist[~valid] = -float("inf") if largest else float("inf")
        top = torch.topk(dist, n_keep, dim=1, largest=largest, sorted=True)
        out_ids[a:b, :n_keep] = np.take_along_axis(ids, top.indices.numpy(), 1)
        out_dist[a:b, :n_keep] = top.values.numpy()
    out_ids[~np.isfinite(out_dist)] = -1
    return out_dist, out_ids


def _check(queries, candidates, dim: int, n_db: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries, candidates = np.asarray(queries), np.asarray(candidates)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InputError(f"queries must have shape (Q, {dim}) like the vectors, got {queries.shape}")
    if candidates.shape[:1] != queries.shape[:1] or candidates.ndim != 2 or candidates.dtype.kind not in "iu":
        raise InputError(f"candidates must be integer ids of shape (Q={len(queries)}, n_candidates), got "
                         f"{candidates.shape} {candidates.dtype}")
    if candidates.size and candidates.max() >= n_db:
        raise InputError(f"candidate id {candidates.max()} is out of range: the vectors have {n_db} rows")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    return queries, candidates.astype(np.int64)


def refine(dataset, queries, candidates, k: int, *, metric: str = "sqeuclidean",
           batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank ``candidates`` ``(Q, k0)`` by exact distances to the raw ``dataset`` rows (a
    numpy array, memory-mapped or not; only candidate rows are read). Returns
    ``(distances, neighbors)``, each ``(Q, k)``."""
    if not hasattr(dataset, "shape") or len(dataset.shape) != 2:
        raise InputError(f"dataset must be a 2-D array (N, dim), got {type(dataset).__name__}")
    queries, candidates = _check(queries, candidates, dataset.shape[1], len(dataset), k)

    def rows(ids_n):
        order = np.argsort(ids_n, kind="stable")           # sorted reads from a memory map
        out = np.empty((len(ids_n), dataset.shape[1]), dtype=np.float32)
        out[order] = dataset[ids_n[order]]
        return out

    return exact_rerank(queries, candidates, rows, k, metric=metric, batch_rows=batch_rows)


def refine_with_codec(codec, codes, queries, candidates, k: int, *, metric: str = "sqeuclidean",
                      batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank ``candidates`` by exact distances to the vectors that ``codec`` (a trained
    :class:`~qinco2.codec.codec.QincoCodec`) decodes from ``codes`` ``(N, n_codes)``, the compact
    codes of the same database rows: no raw vectors needed."""
    if getattr(codes, "ndim", 0) != 2 or codes.shape[1] != codec.n_codes:
        raise InputError(f"codes must have shape (N, {codec.n_codes}) for this codec, got "
                         f"{getattr(codes, 'shape', None)}")
    queries, candidates = _check(queries, candidates, codec.dim, len(codes), k)
    return exact_rerank(queries, candidates, lambda ids_n: codec.decode(np.asarray(codes[ids_n])), k,
                        metric=metric, batch_rows=batch_rows)
