"""Greedy fitting of the pairwise decoder's look-up tables (spec §8.6), with held-out choices.

Each round builds, for every unordered pair of code columns ``(a, b)``, the table of the
residual's per-cell sums over the *fitting* rows, and scores it on the *held-out* rows (the
first ``n_hold`` rows, never fitted) for every shrinkage ``lam`` of a grid: the cell value is
``sum / (count + lam)``, so a cell seen by few rows is pulled towards 0 (no correction). The
pair and shrinkage with the lowest held-out MSE are kept and subtracted from all rows; the
rounds stop early when no table lowers the held-out MSE by a relative ``min_gain``. With
65,536 cells per table and a few training rows per cell, the plain means (``lam = 0``,
chosen on the fitted rows) overfit: they decode the training set almost exactly and the
database worse than no table at all.

The held-out MSE of a shrunk table needs no second pass over the rows. With per-cell fitting
sums ``s_c`` and counts ``n_c``, held-out sums ``T_c`` and counts ``h_c``, and the held-out
residual energy ``E``::

    sum_i |t_i - s_c(i) / (n_c(i) + lam)|^2 = E - 2 sum_c (s_c . T_c) w_c + sum_c h_c |s_c|^2 w_c^2

with ``w_c = 1 / (n_c + lam)`` (0 for empty cells), so every ``lam`` of the grid costs ``K*K``
operations once the per-cell dot products are known.

The residual after the tables chosen so far is kept in a scratch file (:class:`ResidualFile`:
the code columns and float32 residuals of all rows, memory-mapped, so on disk and in the page
cache, not in the process's memory), written once and updated once per round: every pass over
the rows then costs the same, whatever the round (recomputing it from the vectors, the AQ tables
and every table already chosen made round ``j`` cost ``O(j)`` per pass: 25 s to 2 min per round
on 490k rows).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_SHRINKAGE = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
DEFAULT_MIN_GAIN = 1e-4


def scratch_bytes(n: int, L: int, D: int, K: int) -> int:
    """Bytes of the :class:`ResidualFile` of ``n`` rows: code columns and float32 residuals."""
    return n * (L * np.dtype(_column_dtype(K)).itemsize + 4 * D)


def _column_dtype(K: int):
    return np.uint8 if K <= 1 << 8 else np.uint16 if K <= 1 << 16 else np.int64


class ResidualFile:
    """The code columns ``(n, L)`` and float32 residual targets ``(n, D)`` of all rows, in two
    memory-mapped ``.npy`` files of a fresh directory under ``scratch_dir`` (default: the system's
    temporary directory), removed by :meth:`close`. Written once from ``rows(lo, hi)``
    (:func:`greedy_pair_tables`), ``chunk_rows`` rows at a time; :meth:`subtract` takes a chosen
    table off every row. Calling it hands out rows ``[lo, hi)`` as (int64 columns, float64
    residuals), as ``rows`` does."""

    def __init__(self, rows, n: int, L: int, D: int, K: int, chunk_rows: int, scratch_dir=None):
        need = scratch_bytes(n, L, D, K)
        parent = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())
        free = shutil.disk_usage(parent).free if parent.is_dir() else None
        if free is None or free < need + (64 << 20):
            where = f"{parent} has {free / 2**30:.2f} GiB free" if free is not None else f"{parent} is not a directory"
            raise InputError(f"the pairwise decoder's training keeps the residuals of its {n:,} rows in a scratch "
                             f"file of {need / 2**30:.2f} GiB, but {where}; pass scratch_dir= a directory with enough "
                             "space (the command line uses the directory of output=), or train on fewer rows")
        self.K, self.chunk_rows = K, chunk_rows
        self._dir = tempfile.mkdtemp(prefix="qinco2-pairwise-", dir=parent)
        try:
            self.cols = np.lib.format.open_memmap(Path(self._dir) / "cols.npy", mode="w+", dtype=_column_dtype(K),
                                                  shape=(n, L))
            self.t = np.lib.format.open_memmap(Path(self._dir) / "residual.npy", mode="w+", dtype=np.float32,
                                               shape=(n, D))
            for lo in range(0, n, chunk_rows):
                hi = min(lo + chunk_rows, n)
                self.cols[lo:hi], self.t[lo:hi] = rows(lo, hi)
        except BaseException:
            self.close()
            raise

    def __call__(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.cols[lo:hi].astype(np.int64), self.t[lo:hi].astype(np.float64)

    def subtract(self, a: int, b: int, table_CD: torch.Tensor) -> None:
        """Take the pair table of columns ``(a, b)`` (``(K*K, D)`` float32) off every row."""
        table = table_CD.numpy()
        for lo in range(0, len(self.t), self.chunk_rows):
            cols = self.cols[lo:lo + self.chunk_rows]
            self.t[lo:lo + self.chunk_rows] -= table[cols[:, a].astype(np.int64) * self.K + cols[:, b]]

    def close(self) -> None:
        self.cols = self.t = None
        shutil.rmtree(self._dir, ignore_errors=True)


def _cell_sums(rows, lo: int, hi: int, group: list, K: int, D: int, chunk_rows: int):
    """Per candidate pair: float64 per-cell sums ``(K*K, D)`` and counts of the residual over
    rows ``[lo, hi)``, and the residual's total squared norm there."""
    sums = [torch.zeros((K * K, D), dtype=torch.float64) for _ in group]
    counts = [torch.zeros(K * K, dtype=torch.float64) for _ in group]
    energy = 0.0
    for start in range(lo, hi, chunk_rows):
        cols_nL, t_nD = rows(start, min(start + chunk_rows, hi))
        cols, t = torch.from_numpy(cols_nL), torch.from_numpy(t_nD)
        energy += float((t * t).sum())
        for (a, b), s, c in zip(group, sums, counts):
            code = cols[:, a] * K + cols[:, b]
            s.index_add_(0, code, t)
            c += torch.bincount(code, minlength=K * K)
    return sums, counts, energy


def held_out_errors(s, n, T, h, energy: float, shrinkage: torch.Tensor) -> torch.Tensor:
    """Held-out squared error (a sum over rows) of the table ``s / (n + lam)`` for every ``lam``
    of ``shrinkage``, from fitting sums/counts ``s, n`` and held-out sums/counts ``T, h``."""
    dots, norms = (s * T).sum(1), (s * s).sum(1)
    denom = n[None, :] + shrinkage[:, None]
    w = torch.where(n[None, :] > 0, 1.0 / denom.clamp(min=1e-300), torch.zeros(()))
    return energy - 2 * (w * dots).sum(1) + (w * w * (h * norms)).sum(1)


def _best_of_group(rows, n: int, n_hold: int, group: list, K: int, D: int, chunk_rows: int,
                   shrinkage: torch.Tensor):
    """The best ``(held-out MSE, a, b, lam, float32 table)`` of the pairs of ``group``, and the
    held-out MSE of the residual itself."""
    fit_sums, fit_counts, _ = _cell_sums(rows, n_hold, n, group, K, D, chunk_rows)
    hold_sums, hold_counts, energy = _cell_sums(rows, 0, n_hold, group, K, D, chunk_rows)
    best = None
    for i, (a, b) in enumerate(group):
        errs = held_out_errors(fit_sums[i], fit_counts[i], hold_sums[i], hold_counts[i], energy, shrinkage)
        hold_sums[i] = None
        k = int(torch.argmin(errs))
        err = float(errs[k]) / n_hold
        if best is None or err < best[0]:
            lam = float(shrinkage[k])
            table = (fit_sums[i] / (fit_counts[i] + lam).clamp(min=1e-300)[:, None]).float()
            table[fit_counts[i] == 0] = 0
            best = (err, a, b, lam, table)
        fit_sums[i] = None
    return best, energy / n_hold


def greedy_pair_tables(rows, n: int, L: int, D: int, K: int, J: int, n_hold: int, *,
                       shrinkage=DEFAULT_SHRINKAGE, min_gain: float = DEFAULT_MIN_GAIN,
                       chunk_rows: int = 65_536, group_size: int | None = None, progress: bool = True,
                       scratch_dir=None):
    """At most ``J`` greedy rounds over ``L`` code columns: tables fitted on rows
    ``[n_hold, n)``, pair and shrinkage chosen on rows ``[0, n_hold)``. Returns (pairs ``(J', 2)``,
    tables ``(J', K*K, D)`` float32, held-out MSE after each table, shrinkage of each table),
    ``J' <= J`` (fewer when a round gains less than ``min_gain`` relative held-out MSE).

    ``rows(lo, hi)`` hands out rows ``lo:hi`` as (code columns ``(hi-lo, L)`` int64, residual
    targets ``(hi-lo, D)`` float64, a fresh array); it is called with at most ``chunk_rows``
    rows. Memory: one chunk, ``group_size`` (default: all) candidate pairs' float64 per-cell
    sums (fitting and held-out) at a time (two passes over the rows per group), the tables.
    Disk: the :class:`ResidualFile` under ``scratch_dir``, :func:`scratch_bytes` (``rows`` is
    read once, into it; each round then reads it once per group and updates it once).
    """
    if not 1 <= n_hold < n:
        raise ValueError(f"need 1 <= n_hold < n, got n_hold={n_hold}, n={n}")
    lam = torch.tensor(sorted(set(float(v) for v in shrinkage)), dtype=torch.float64)
    candidates = [(a, b) for a in range(L) for b in range(a + 1, L)]
    group_size = group_size or len(candidates)
    pairs, tables, mses, lams = [], [], [], []
    residuals = ResidualFile(rows, n, L, D, K, chunk_rows, scratch_dir)
    try:
        for j in progress_bar(range(J), desc="pairwise tables", disable=not progress, leave=False):
            best, before = None, None
            for g in range(0, len(candidates), group_size):
                found, before = _best_of_group(residuals, n, n_hold, candidates[g:g + group_size], K, D, chunk_rows,
                                               lam)
                if best is None or found[0] < best[0]:
                    best = found
            err, a, b, best_lam, table = best
            if not err < before * (1 - min_gain):
                log.info("pairwise round %d/%d: no table lowers the held-out MSE %.6g by %g; %d tables kept",
                         j + 1, J, before, min_gain, j)
                break
            pairs.append((a, b)), tables.append(table), mses.append(err), lams.append(best_lam)
            log.info("pairwise round %d/%d: columns (%d, %d), shrinkage %g, held-out MSE %.6g -> %.6g",
                     j + 1, J, a, b, best_lam, before, err)
            if j + 1 < J:
                residuals.subtract(a, b, table)
    finally:
        residuals.close()
    out = torch.stack(tables).numpy() if tables else np.zeros((0, K * K, D), dtype=np.float32)
    return np.array(pairs, dtype=np.int64).reshape(-1, 2), out, mses, lams
