"""Exact re-ranking of candidate lists: by raw vectors (cuVS ``refine``) or by vectors
decoded from compact codes (a QINCo2 codec), one implementation for both.

Candidates are database row ids ``(Q, S)`` (-1: none); the vectors of the candidates are
fetched ``batch_rows`` at a time, so the raw vectors may be a memory-mapped file of any size.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .tensor_io import accepts_tensors
from .validation import check_codes, check_finite, check_vectors

RERANK_METRICS = ("sqeuclidean", "inner_product", "cosine")


def _chunks(Q: int, S: int, batch_rows: int):
    """Query ranges whose ``(queries, S)`` candidate blocks hold about ``batch_rows`` rows."""
    step = max(1, batch_rows // max(S, 1))
    return [(i, min(i + step, Q)) for i in range(0, Q, step)]


def exact_rerank(q_QD: np.ndarray, ids_QS: np.ndarray, vectors_of, k: int, *,
                 metric: str = "sqeuclidean", batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best candidates of each query by exact ``metric``: distances ``(Q, k)``
    float32 (squared L2; inner product, descending; or 1 - cosine) and ids ``(Q, k)`` int64,
    padded with -1 (and inf / -inf) where a query has fewer than ``k`` candidates. Equal
    distances keep the candidates' order: the earlier stage's ranking breaks the tie.
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
        x_bSD = torch.from_numpy(x).reshape(b - a, S, -1)
        q_bD = torch.from_numpy(np.ascontiguousarray(q_QD[a:b], dtype=np.float32))
        if metric == "sqeuclidean":
            dist = ((x_bSD - q_bD[:, None]) ** 2).sum(-1)
        else:
            if metric == "cosine":
                x_bSD = torch.nn.functional.normalize(x_bSD, dim=-1)
                q_bD = torch.nn.functional.normalize(q_bD, dim=-1)
            dist = (x_bSD * q_bD[:, None]).sum(-1)
            dist = dist if largest else 1 - dist
        dist[~valid] = -float("inf") if largest else float("inf")
        top_dist, top_pos = torch.sort(dist, dim=1, descending=largest, stable=True)
        out_ids[a:b, :n_keep] = np.take_along_axis(ids, top_pos[:, :n_keep].numpy(), 1)
        out_dist[a:b, :n_keep] = top_dist[:, :n_keep].numpy()
    out_ids[~np.isfinite(out_dist)] = -1
    return out_dist, out_ids


def _check(queries, candidates, dim: int, n_db: int, k: int, dim_owner: str,
           db: str) -> tuple[np.ndarray, np.ndarray]:
    """Queries ``(Q, dim)`` and candidate ids ``(Q, S)``: rows of ``db`` in ``[-1, n_db)`` (-1: none)."""
    check_vectors(queries, "queries", dim, dim_owner=dim_owner)
    check_codes(candidates, None, "candidates", columns_are="candidate row ids per query",
                rows=len(queries), rows_owner=f"there are {len(queries)} queries")
    if candidates.size and not -1 <= candidates.min() <= candidates.max() < n_db:
        raise InputError(f"candidates: values must lie in [-1, N={n_db}) (-1: no candidate), got "
                         f"[{candidates.min()}, {candidates.max()}]; pass row ids of {db}")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    return queries, candidates.astype(np.int64)


@accepts_tensors
def refine(dataset, queries, candidates, k: int, *, metric: str = "sqeuclidean",
           batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank ``candidates`` ``(Q, k0)`` by exact distances to the raw ``dataset`` rows (a
    numpy array, memory-mapped or not; only candidate rows are read). Returns
    ``(distances, neighbors)``, each ``(Q, k)``."""
    check_vectors(dataset, "dataset", finite=False)      # only the rows read are checked, below
    queries, candidates = _check(queries, candidates, dataset.shape[1], len(dataset), k,
                                 f"the dataset has dimension {dataset.shape[1]}", "the dataset")

    def rows(ids_n):
        order = np.argsort(ids_n, kind="stable")           # sorted reads from a memory map
        out = np.empty((len(ids_n), dataset.shape[1]), dtype=np.float32)
        out[order] = dataset[ids_n[order]]
        check_finite(out, "dataset", row_ids=ids_n)
        return out

    return exact_rerank(queries, candidates, rows, k, metric=metric, batch_rows=batch_rows)


@accepts_tensors
def refine_with_codec(codec, codes, queries, candidates, k: int, *, metric: str = "sqeuclidean",
                      batch_rows: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank ``candidates`` by exact distances to the vectors that ``codec`` (a trained
    :class:`~qinco2.codec.codec.QincoCodec`) decodes from ``codes`` ``(N, n_codes)``, the compact
    codes of the same database rows: no raw vectors needed."""
    check_codes(codes, None, "codes", columns=codec.n_codes, columns_are="the codec's codes of each row",
                fix="pass the database codes made by this codec")   # values: checked by decode
    queries, candidates = _check(queries, candidates, codec.dim, len(codes), k,
                                 f"the codec was trained on D={codec.dim}", "codes")
    return exact_rerank(queries, candidates, lambda ids_n: codec.decode(np.asarray(codes[ids_n])), k,
                        metric=metric, batch_rows=batch_rows)
