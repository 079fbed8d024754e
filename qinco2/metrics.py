"""Evaluation measures: MSE, exhaustive k-NN, R@k, code usage and entropy."""

from __future__ import annotations

import faiss
import numpy as np

from .errors import InputError


def mse(x_ND: np.ndarray, xhat_ND: np.ndarray, scale: float = 1.0, batch: int = 65_536) -> float:
    """Mean over vectors of the squared L2 error (summed over dimensions), times ``scale``."""
    total = 0.0
    for i in range(0, len(x_ND), batch):
        diff = np.asarray(x_ND[i:i + batch], dtype=np.float64) - xhat_ND[i:i + batch]
        total += float((diff * diff).sum())
    return total / max(len(x_ND), 1) * scale


METRICS = ("l2", "ip")  # squared L2 distance (smallest first), inner product (largest first)


def check_metric(metric: str) -> str:
    """``metric`` if it is one of :data:`METRICS`, else an :class:`InputError`."""
    if metric not in METRICS:
        raise InputError(f"metric={metric!r}: expected one of {METRICS} ('l2' for L2 distance, "
                         "'ip' for inner product, e.g. of unit-norm text embeddings)")
    return metric


def knn(queries_QD: np.ndarray, db_ND: np.ndarray, k: int, metric: str = "l2") -> np.ndarray:
    """Ids ``(Q, k)`` of the exact nearest database vectors (faiss brute force), best first.

    ``metric="l2"``: smallest L2 distance first; ``metric="ip"``: largest inner product first
    (for unit-norm vectors both give the same ranking).
    """
    check_metric(metric)
    k = min(k, len(db_ND))
    q_QD = np.ascontiguousarray(queries_QD, dtype=np.float32)
    x_ND = np.ascontiguousarray(db_ND, dtype=np.float32)
    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    _, ids = faiss.knn(q_QD, x_ND, k, metric=kind)
    return ids


def recall_at(ids_QS: np.ndarray, gt_Q: np.ndarray, ks=(1, 10, 100)) -> dict[int, float]:
    """R@k: fraction of queries whose true nearest neighbour ``gt_Q`` is among the first k ids."""
    gt_Q = np.asarray(gt_Q).reshape(len(ids_QS), -1)[:, 0]
    hit = ids_QS == gt_Q[:, None]
    return {k: float(hit[:, :k].any(1).mean()) for k in ks}


def code_usage(codes_NM: np.ndarray, K_per_step) -> tuple[np.ndarray, np.ndarray]:
    """Per step: fraction of the K codewords used, and entropy of the code distribution in bits."""
    used, entropy = [], []
    for m in range(codes_NM.shape[1]):
        K = K_per_step[m]
        p = np.bincount(codes_NM[:, m], minlength=K) / max(len(codes_NM), 1)
        nz = p[p > 0]
        used.append(len(nz) / K)
        entropy.append(float(-(nz * np.log2(nz)).sum()))
    return np.array(used), np.array(entropy)


def neighbor_recall(ids_QS: np.ndarray, gt_QK: np.ndarray, k: int) -> float:
    """k-recall@k: mean fraction of the ``k`` true nearest neighbours among the first ``k``
    ids (the "recall@k" of cuVS and ann-benchmarks; needs ``k`` true neighbours per query)."""
    gt_QK = np.asarray(gt_QK)
    if gt_QK.ndim != 2 or gt_QK.shape[1] < k or ids_QS.shape[1] < k:
        raise ValueError(f"k-recall@{k} needs {k} ids and {k} true neighbours per query, got "
                         f"{ids_QS.shape[1]} and {gt_QK.shape[1] if gt_QK.ndim == 2 else 1}")
    hits = (ids_QS[:, :k, None] == gt_QK[:, None, :k]).any(2)
    return float(hits.mean())
