"""Additive (AQ) codebooks fitted by least squares to given codes (spec §8.4).

Given codes ``i`` (N, M) and targets ``t`` (N, D), find tables ``T`` (M, K, D) minimising
``sum_n ||t_n - sum_m T_m[i_nm]||^2``. The design matrix is the one-hot ``(N, M*K)`` matrix
``A``; instead of building it, the normal equations ``A^T A X = A^T t`` are accumulated from
code co-occurrence counts (``A^T A``) and per-code target sums (``A^T t``), batch by batch.

``A^T A`` is rank deficient by at least ``M - 1`` (a constant may move between two steps'
tables) and more when codes are unused; a tiny ridge picks one solution. The ridge does not
move the reconstructions ``A X`` measurably: the null directions of ``A^T A`` have no
component in ``A^T t``, and ``ridge`` (in units of vectors) is small next to every used count.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..validation import check_codes, check_vectors


def fit_additive_codebooks(codes_NM: np.ndarray, targets_ND: np.ndarray, K: int, *,
                           ridge: float = 1e-6, batch: int = 32_768) -> np.ndarray:
    """Least-squares additive tables ``(M, K, D)`` float32 for ``codes_NM`` -> ``targets_ND``.

    ``ridge`` is added to the diagonal of the count matrix (so it is in units of vectors);
    ``batch`` rows are accumulated at a time (memory ``batch * M^2`` pair indices).
    Codes never used get all-zero table rows.
    """
    codes_NM = check_codes(codes_NM, K)
    targets_ND = check_vectors(targets_ND, "targets", rows=len(codes_NM),
                               rows_owner=f"the codes have {len(codes_NM)}", fix="pass one row per code row")
    if not ridge > 0:
        raise InputError(f"ridge must be > 0 (the normal equations are singular without it), got {ridge}")
    N, M = codes_NM.shape
    D, MK = targets_ND.shape[1], codes_NM.shape[1] * K
    offsets = np.arange(M, dtype=np.int64) * K
    counts = np.zeros(MK * MK, dtype=np.int64)          # A^T A, exact integer counts
    rhs = torch.zeros((MK, D), dtype=torch.float64)     # A^T t
    for i in range(0, N, batch):
        col_nM = codes_NM[i:i + batch].astype(np.int64) + offsets      # one-hot column per entry
        counts += np.bincount((col_nM[:, :, None] * MK + col_nM[:, None, :]).ravel(), minlength=MK * MK)
        t = torch.from_numpy(np.asarray(targets_ND[i:i + batch], dtype=np.float64))
        for m in range(M):
            rhs.index_add_(0, torch.from_numpy(col_nM[:, m]), t)
    gram = torch.from_numpy(counts.reshape(MK, MK).astype(np.float64))
    gram.diagonal().add_(ridge)
    tables = torch.linalg.solve(gram, rhs)
    return tables.reshape(M, K, D).numpy().astype(np.float32)


def gather_add_(acc_ND: torch.Tensor, table_KD: np.ndarray, idx_N: torch.Tensor) -> None:
    """``acc_ND += table_KD[idx_N]`` in place (torch's row gather: 2.5x numpy's fancy indexing and
    its temporary on the pairwise decoder's 32 MB tables, 2 threads)."""
    acc_ND.add_(torch.from_numpy(table_KD).index_select(0, idx_N))


def additive_decode(codes_NM: np.ndarray, T_MKD: np.ndarray, *, out_ND: np.ndarray | None = None) -> np.ndarray:
    """Float32 vectors ``(N, D) = sum_m T_MKD[m, codes_NM[:, m]]``, added to ``out_ND`` (float32,
    C-contiguous, changed in place) when given."""
    T_MKD = np.asarray(T_MKD)
    if T_MKD.ndim != 3:
        raise InputError(f"tables must have shape (M, K, D), got {T_MKD.shape}")
    M, K, D = T_MKD.shape
    codes_NM = check_codes(codes_NM, K, columns=M, columns_are=f"M={M} columns, one per table")
    out = np.zeros((len(codes_NM), D), dtype=np.float32) if out_ND is None else out_ND
    acc, codes = torch.from_numpy(out), torch.from_numpy(np.asarray(codes_NM, dtype=np.int64))
    T_MKD = np.ascontiguousarray(T_MKD, dtype=np.float32)
    for m in range(M):
        gather_add_(acc, T_MKD[m], codes[:, m])
    return out
