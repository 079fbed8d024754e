"""Pairwise additive decoder (QINCo2 §3.3, spec §8.6): look-up tables indexed by code pairs.

A vector with codes ``(i0, i1..iM)`` (IVF list, then M step codes) is decoded as
``c_ivf[i0] + sum_l A_l[k_l] + sum_j P_j[k_{a_j} * K + k_{b_j}]`` where the columns ``k`` are
the M step codes followed by ``levels`` sub-codes of the IVF centroid (a residual k-means of the
centroids), ``A_l`` are least-squares additive (AQ) tables of ``K`` vectors (by default), and
each pair table ``P_j`` holds ``K*K`` vectors. Training fits the pair tables greedily, one table
of shrunk per-cell means per round, on what the centroid and the AQ tables leave of ``x``; the
pair and the shrinkage of each round are chosen on held-out rows, and rounds stop when no table
helps them (:mod:`qinco2.ivfsearch.pair_tables`). Codes and vectors are only read in row chunks
(memory maps larger than RAM work); the residual after the tables chosen so far is kept in a
memory-mapped scratch file, updated once per round.
"""
from __future__ import annotations

import logging
from functools import partial

import faiss
import numpy as np
import torch

from ..checkpoint import atomic_torch_save, load_tagged
from ..errors import ConfigError, InputError, ModelFileError, NotTrainedError
from ..kmeans import kmeans
from ..metrics import mse
from ..validation import check_codes, check_finite, check_vectors
from .aq import additive_decode, fit_additive_codebooks, gather_add_
from .pair_tables import DEFAULT_MIN_GAIN, DEFAULT_SHRINKAGE, greedy_pair_tables

log = logging.getLogger(__name__)

FORMAT_TAG = "qinco2-pairwise"
FORMAT_VERSION = 2                # 2: held-out choices and shrinkage (1: in-sample means)
_STATE = ("M_", "ivf_centroids_", "ivf_subcodes_", "aq_tables_", "pairs_", "tables_", "holdout_mse_", "shrinkage_")
DEFAULT_CHUNK_ROWS = 65_536        # training / measuring rows read at a time
DEFAULT_ACCUMULATOR_BYTES = 1 << 30  # float64 per-cell sums of candidate tables held at a time


def _nearest(x_CD: np.ndarray, centroids_KD: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (exact L2) for every row."""
    _, ids = faiss.knn(np.ascontiguousarray(x_CD, dtype=np.float32),
                       np.ascontiguousarray(centroids_KD, dtype=np.float32), 1)
    return ids[:, 0]


def weighted_kmeans(x_CD: np.ndarray, weights_C: np.ndarray, k: int, rng: np.random.Generator,
                    max_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """:func:`qinco2.kmeans.kmeans` with weights (seeded from ``rng``, at most ``max_iter``
    iterations). Returns (float32 centroids, assignment)."""
    centroids = kmeans(x_CD, k, niter=max_iter, weights=weights_C, seed=int(rng.integers(1 << 62)))
    return centroids, _nearest(x_CD, centroids)


def ivf_subcodes(centroids_CD: np.ndarray, weights_C: np.ndarray, levels: int, K: int,
                 seed: int = 0) -> np.ndarray:
    """``(C, levels)`` int32 codes of a ``levels``-level weighted residual k-means of the IVF
    centroids, ``min(K, C, #lists with weight)`` centroids per level."""
    rng = np.random.default_rng(seed)
    residual = centroids_CD.astype(np.float64)
    k = min(K, int((weights_C > 0).sum()))
    codes = np.zeros((len(centroids_CD), levels), dtype=np.int32)
    for level in range(levels):
        cents, codes[:, level] = weighted_kmeans(residual, weights_C, k, rng)
        residual -= cents[codes[:, level]]
        log.info("IVF sub-codes level %d/%d: weighted MSE %.6g", level + 1, levels,
                 float((weights_C * (residual ** 2).sum(1)).sum() / weights_C.sum()))
    return codes


def _head(a):
    """``a`` itself if it is a numpy array (checked without reading it) or not array-like (so the
    checkers name its type), else its first 0 rows: the type, rank, dtype and columns of an
    object that only supports ``len``, ``.shape`` and row slices."""
    return a if isinstance(a, np.ndarray) or not hasattr(a, "shape") else a[:0]


def _columns_and_targets(codes, x, centroids_CD, subcodes_CL, aq_LKD, lo: int, hi: int):
    """Rows ``lo:hi`` as code columns ``(n, M + levels)`` int64 (the step codes, then the IVF
    sub-codes) and raw residual targets ``x - c_ivf[i0] - sum_l aq[l, col_l]`` ``(n, D)``
    float64 (no AQ term when ``aq_LKD`` has no table)."""
    c = np.asarray(codes[lo:hi])
    cols = np.concatenate([c[:, 1:], subcodes_CL[c[:, 0]]], axis=1).astype(np.int64)
    t = np.asarray(x[lo:hi], dtype=np.float64) - centroids_CD[c[:, 0]]
    if len(aq_LKD):
        t -= additive_decode(cols, aq_LKD)
    return cols, t


def _check_x(x, D: int, n: int, dim_owner: str, chunk_rows: int, finite: bool = True) -> None:
    """Vectors ``(n, D)`` (a numpy array, memory-mapped or not, or an object with ``len``,
    ``.shape`` and row slices), checked for NaN/Inf ``chunk_rows`` rows at a time if ``finite``."""
    check_vectors(_head(x), "x", D, dim_owner=dim_owner, finite=False)
    if len(x) != n:
        raise InputError(f"x has {len(x)} rows but the codes have {n}; pass exactly {n} rows")
    for lo in range(0, n if finite else 0, chunk_rows):
        check_finite(np.asarray(x[lo:lo + chunk_rows]), "x", first_row=lo)


def _check_chunking(**sizes) -> None:
    for name, value in sizes.items():
        if not (isinstance(value, int) and value >= 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _upgrade_version_1(params: dict, state: dict) -> None:
    """Version-1 files (tables of plain means chosen on fitted rows) in version-2 names: their
    per-round MSEs were measured on fitted rows, their shrinkage is 0."""
    if "eval_rows" in params:
        params["holdout_rows"] = params.pop("eval_rows")
    params["additive_start"] = False
    if "train_mse_" in state:
        state["holdout_mse_"] = state.pop("train_mse_")
        state["shrinkage_"] = [0.0] * len(state["holdout_mse_"])
    tables = state.get("tables_")
    if isinstance(tables, torch.Tensor) and tables.ndim == 3:
        state["aq_tables_"] = torch.zeros((0, params.get("K", 256), tables.shape[2]), dtype=torch.float32)


class PairwiseDecoder:
    """Look-up-only decoder of IVF codes ``(N, 1+M)`` into raw-space vectors.

    >>> dec = PairwiseDecoder(K=256).train(codes, x, ivf_centroids)   # doctest: +SKIP
    >>> xhat = dec.decode(codes)                                       # doctest: +SKIP

    Learned state: ``M_`` (step codes per vector), ``ivf_centroids_`` (C, D) float32,
    ``ivf_subcodes_`` (C, levels) int32, ``aq_tables_`` (L, K, D) float32 one table per
    column (L = M + levels; none when ``additive_start=False``), ``pairs_`` (J, 2) column pairs
    (columns: the M step codes, then the sub-codes), ``tables_`` (J, K*K, D) float32,
    ``holdout_mse_`` (held-out MSE after each table), ``shrinkage_`` (each table's ``lam``).
    ``J`` is at most ``round(n_pairs_per_step * M)``: rounds stop when no table helps the
    held-out rows. A vector decodes as its centroid + its AQ tables + its pair tables.

    ``additive_start`` (default): the pair tables correct the residual of least-squares AQ
    tables of every column (fitted jointly, :mod:`qinco2.ivfsearch.aq`), so on held-out rows
    the decoder is never worse than AQ; ``False`` starts from the centroids (the paper's
    decoder, which needs millions of training rows: greedy tables are not fitted jointly).

    Training holds out the first ``min(holdout_rows, N // 4)`` rows: tables are fitted on the
    others, and each round's pair and shrinkage (cell value ``sum / (count + lam)``, ``lam`` from
    ``shrinkage``) are the ones with the lowest MSE on the held-out rows
    (:mod:`qinco2.ivfsearch.pair_tables`).
    """

    def __init__(self, n_pairs_per_step: float = 2, ivf_subcode_levels: int = 5, K: int = 256,
                 seed: int = 0, holdout_rows: int = 100_000, shrinkage=DEFAULT_SHRINKAGE,
                 min_gain: float = DEFAULT_MIN_GAIN, additive_start: bool = True):
        self.n_pairs_per_step = n_pairs_per_step
        self.ivf_subcode_levels = ivf_subcode_levels
        self.K = K
        self.seed = seed
        self.holdout_rows = holdout_rows
        self.shrinkage = tuple(shrinkage)
        self.min_gain = min_gain
        self.additive_start = additive_start
        for name in _STATE:
            setattr(self, name, None)

    def get_params(self) -> dict:
        """The constructor's parameters (stored in decoder files)."""
        return {"n_pairs_per_step": self.n_pairs_per_step, "ivf_subcode_levels": self.ivf_subcode_levels,
                "K": self.K, "seed": self.seed, "holdout_rows": self.holdout_rows,
                "shrinkage": [float(v) for v in self.shrinkage], "min_gain": self.min_gain,
                "additive_start": self.additive_start}

    def n_holdout(self, N: int) -> int:
        """Rows held out of fitting when training on ``N`` rows: the first ``min(holdout_rows, N // 4)``
        (at least 1)."""
        return max(1, min(self.holdout_rows, N // 4))

    # ------------------------------------------------------------------ checks
    def _check_params(self, M: int) -> int:
        if not (isinstance(self.K, int) and self.K >= 2):
            raise ConfigError(f"K must be an integer >= 2, got {self.K!r}")
        if not (isinstance(self.ivf_subcode_levels, int) and self.ivf_subcode_levels >= 0):
            raise ConfigError(f"ivf_subcode_levels must be an integer >= 0, got {self.ivf_subcode_levels!r}")
        if not (isinstance(self.holdout_rows, int) and self.holdout_rows >= 1):
            raise ConfigError(f"holdout_rows must be an integer >= 1, got {self.holdout_rows!r}")
        if not self.shrinkage or not all(isinstance(v, (int, float)) and v >= 0 for v in self.shrinkage):
            raise ConfigError(f"shrinkage must be a non-empty list of numbers >= 0, got {self.shrinkage!r}")
        if not (isinstance(self.min_gain, (int, float)) and 0 <= self.min_gain < 1):
            raise ConfigError(f"min_gain must be a number in [0, 1), got {self.min_gain!r}")
        J = round(self.n_pairs_per_step * M)
        if J < 1:
            raise ConfigError(f"n_pairs_per_step={self.n_pairs_per_step} with M={M} gives no pair table; use > 0.5/M")
        if M + self.ivf_subcode_levels < 2:
            raise ConfigError("need at least two code columns to form pairs: M=1 needs ivf_subcode_levels >= 1")
        return J

    def _check_codes(self, codes, M: int | None = None) -> tuple[int, int]:
        """``(N, M)`` of codes ``(N, 1+M)`` (a numpy array or an object with ``len``, ``.shape``
        and row slices) after checking their type and columns; :meth:`_code_chunks` checks the values."""
        head = _head(codes)
        check_codes(head, None, "codes", columns=(2, None) if M is None else 1 + M,
                    columns_are="1+M columns: the IVF id, then M step codes")
        return len(codes), head.shape[1] - 1

    def _code_chunks(self, codes, n_ivf: int, chunk_rows: int):
        """``(lo, codes[lo:lo + chunk_rows])`` as arrays, IVF ids checked in ``[0, n_ivf)`` and step
        codes in ``[0, K)``."""
        for lo in range(0, len(codes), chunk_rows):
            c = np.asarray(codes[lo:lo + chunk_rows])
            check_codes(c[:, :1], n_ivf, "codes column 0 (IVF ids)", K_name="C",
                        fix="were these codes made with these centroids?")
            check_codes(c[:, 1:], self.K, "codes columns 1..M (step codes)",
                        fix="construct the decoder with the codes' K")
            yield lo, c

    def _list_sizes(self, codes, n_ivf: int, chunk_rows: int) -> np.ndarray:
        """Rows per IVF list (float64), every code value checked on the way."""
        counts = np.zeros(n_ivf, dtype=np.int64)
        for _, c in self._code_chunks(codes, n_ivf, chunk_rows):
            counts += np.bincount(c[:, 0], minlength=n_ivf)
        return counts.astype(np.float64)

    def _trained(self) -> None:
        if self.tables_ is None:
            raise NotTrainedError("this PairwiseDecoder is not trained: call train(codes, x, ivf_centroids) "
                                  "or PairwiseDecoder.load(path) first")

    def _rows(self, codes, x, additive: bool = True):
        """``rows(lo, hi)`` of :func:`greedy_pair_tables` for these codes and vectors: targets
        after the AQ tables (``additive``) or after the IVF centroids only."""
        aq = self.aq_tables_ if additive else self.aq_tables_[:0]
        return partial(_columns_and_targets, codes, x, self.ivf_centroids_, self.ivf_subcodes_, aq)

    def _fit_additive(self, codes, x, N: int, chunk_rows: int, ridges=(1e-6,), require_gain: bool = False):
        """Least-squares AQ tables ``(L, K, D)`` on up to ``holdout_rows`` of the fitting rows
        (those after the first :meth:`n_holdout`), targets after the IVF centroids: of the
        ``ridges`` (in rows, like the shrinkage), the one with the lowest held-out MSE. With
        ``require_gain``: no table (shape ``(0, K, D)``) unless it beats the centroids alone on the
        held-out rows by ``min_gain``."""
        rows, n_hold = self._rows(codes, x, additive=False), self.n_holdout(N)
        end = min(N, n_hold + self.holdout_rows)
        fit = [rows(lo, min(lo + chunk_rows, end)) for lo in range(n_hold, end, chunk_rows)]
        cols_fit, t_fit = np.concatenate([c for c, _ in fit]), np.concatenate([t for _, t in fit])
        del fit
        held = [rows(lo, min(lo + chunk_rows, n_hold)) for lo in range(0, n_hold, chunk_rows)]
        fits = []
        for ridge in ridges:
            tables = fit_additive_codebooks(cols_fit, t_fit, self.K, ridge=max(float(ridge), 1e-6))
            fits.append((sum(mse(t, additive_decode(c, tables)) * len(t) for c, t in held), float(ridge), tables))
        err, ridge, tables = min(fits, key=lambda f: f[0])
        if require_gain and not err < sum(float((t * t).sum()) for _, t in held) * (1 - self.min_gain):
            log.info("pairwise decoder: AQ tables do not help the held-out rows; starting from the centroids")
            return np.zeros((0, self.K, t_fit.shape[1]), dtype=np.float32)
        log.info("pairwise decoder: AQ tables with ridge %g, held-out MSE %.6g", ridge, err / n_hold)
        return tables

    # ------------------------------------------------------------------ training
    def train(self, codes, x_ND, ivf_centroids_CD, progress: bool = True, *,
              chunk_rows: int = DEFAULT_CHUNK_ROWS,
              accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES, scratch_dir=None) -> PairwiseDecoder:
        """Fit sub-codes and pair tables on training codes ``(N, 1+M)`` of raw vectors ``x_ND``.

        Both are read ``chunk_rows`` rows at a time (slices ``[lo:hi]`` only, so memory maps
        larger than RAM work): memory is one chunk, about ``accumulator_bytes`` of float64
        per-cell sums of candidate tables, and the tables. Each round makes one pass over all
        rows per group of candidate pairs whose fitting and held-out sums fit in
        ``accumulator_bytes`` (at least one pair per group); the result does not depend on either
        size (up to float rounding). Disk: the code columns and float32 residuals of all rows in a
        scratch file under ``scratch_dir`` (default: the system's temporary directory), about
        ``N * (M + levels + 4 * D)`` bytes, removed at the end
        (:class:`~qinco2.ivfsearch.pair_tables.ResidualFile`). Needs at least 2 rows (one held out).
        """
        centroids = check_vectors(ivf_centroids_CD, what="ivf_centroids")
        _check_chunking(chunk_rows=chunk_rows, accumulator_bytes=accumulator_bytes)
        N, M = self._check_codes(codes)
        D = centroids.shape[1]
        _check_x(x_ND, D, N, f"ivf_centroids have D={D}", chunk_rows)
        if N < 2:
            raise InputError(f"codes and x have {N} rows; training needs at least 2 (one is held out to choose "
                             "the tables), and far more to be useful (tables have K*K cells)")
        J = self._check_params(M)
        weights = self._list_sizes(codes, len(centroids), chunk_rows)
        self.M_ = M
        self.ivf_centroids_ = np.ascontiguousarray(centroids, dtype=np.float32)
        self.ivf_subcodes_ = ivf_subcodes(self.ivf_centroids_, weights, self.ivf_subcode_levels,
                                          self.K, self.seed)
        L = M + self.ivf_subcode_levels
        self.aq_tables_ = np.zeros((0, self.K, D), dtype=np.float32)
        if self.additive_start:
            self.aq_tables_ = self._fit_additive(codes, x_ND, N, chunk_rows, self.shrinkage, require_gain=True)
        group_size = max(1, accumulator_bytes // (self.K ** 2 * (2 * D + 2) * 8))
        n_hold = self.n_holdout(N)
        log.info("pairwise decoder: N=%d (%d held out), M=%d, %d columns, J<=%d tables of %d x %d, "
                 "%d candidate tables per pass", N, n_hold, M, L, J, self.K ** 2, D, group_size)
        self.pairs_, self.tables_, self.holdout_mse_, self.shrinkage_ = greedy_pair_tables(
            self._rows(codes, x_ND), N, L, D, self.K, J, n_hold, shrinkage=self.shrinkage,
            min_gain=self.min_gain, chunk_rows=chunk_rows, group_size=group_size, progress=progress,
            scratch_dir=scratch_dir)
        return self

    def additive_baseline_mse(self, codes, x_ND, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
        """MSE of plain additive decoding (least-squares AQ tables, :mod:`qinco2.ivfsearch.aq`) fitted on
        the same code columns and targets as this decoder; it is a lower bound for AQ on the
        step codes alone. Split as in training: fitted on up to ``holdout_rows`` of the fitting
        rows, measured on the held-out rows (the first :meth:`n_holdout` rows), ``chunk_rows``
        at a time, so it compares with ``holdout_mse_[-1]`` when given the training codes."""
        self._trained()
        _check_chunking(chunk_rows=chunk_rows)
        N, _ = self._check_codes(codes)
        D = self.ivf_centroids_.shape[1]
        _check_x(x_ND, D, N, f"the decoder was trained on D={D}", chunk_rows)
        self._list_sizes(codes, len(self.ivf_centroids_), chunk_rows)
        if N < 2:
            raise InputError(f"codes and x have {N} rows; the baseline needs at least 2 (one is held out)")
        tables = self._fit_additive(codes, x_ND, N, chunk_rows)
        rows, n_hold = self._rows(codes, x_ND, additive=False), self.n_holdout(N)
        total = 0.0
        for lo in range(0, n_hold, chunk_rows):
            cols, t = rows(lo, min(lo + chunk_rows, n_hold))
            total += mse(t, additive_decode(cols, tables)) * len(t)
        return total / n_hold

    # ------------------------------------------------------------------ decoding
    def decode(self, codes, *, batch_size: int = 65_536) -> np.ndarray:
        """Float32 raw-space vectors ``(N, D)`` from codes ``(N, 1+M)``, ``batch_size`` rows at a time."""
        self._trained()
        _check_chunking(batch_size=batch_size)
        N, _ = self._check_codes(codes, self.M_)
        out = np.empty((N, self.ivf_centroids_.shape[1]), dtype=np.float32)
        for i, c in self._code_chunks(codes, len(self.ivf_centroids_), batch_size):
            cols = np.concatenate([c[:, 1:], self.ivf_subcodes_[c[:, 0]]], axis=1).astype(np.int64)
            acc = out[i:i + len(c)]
            np.take(self.ivf_centroids_, c[:, 0], axis=0, out=acc)
            if len(self.aq_tables_):
                additive_decode(cols, self.aq_tables_, out_ND=acc)
            acc_t, cols_t = torch.from_numpy(acc), torch.from_numpy(cols)
            for (a, b), table in zip(self.pairs_, self.tables_):
                gather_add_(acc_t, table, cols_t[:, a] * self.K + cols_t[:, b])
        return out

    def decode_mse(self, codes, x_ND, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
        """MSE of :meth:`decode` against the raw vectors ``x_ND``, ``chunk_rows`` rows at a time
        (no ``(N, D)`` array is made)."""
        self._trained()
        _check_chunking(chunk_rows=chunk_rows)
        N, _ = self._check_codes(codes, self.M_)
        D = self.ivf_centroids_.shape[1]
        _check_x(x_ND, D, N, f"the decoder was trained on D={D}", chunk_rows, finite=False)
        total = 0.0
        for lo in range(0, N, chunk_rows):
            x_nD = np.asarray(x_ND[lo:lo + chunk_rows])
            check_finite(x_nD, "x", first_row=lo)
            total += mse(x_nD, self.decode(codes[lo:lo + chunk_rows])) * len(x_nD)
        return total / max(N, 1)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write parameters and learned state atomically to ``path``."""
        self._trained()
        state = {"M_": int(self.M_), "holdout_mse_": [float(v) for v in self.holdout_mse_],
                 "shrinkage_": [float(v) for v in self.shrinkage_]}
        for name in ("ivf_centroids_", "ivf_subcodes_", "aq_tables_", "pairs_", "tables_"):
            state[name] = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
        atomic_torch_save({"format": FORMAT_TAG, "version": FORMAT_VERSION,
                           "params": self.get_params(), "state": state}, path)

    @classmethod
    def load(cls, path) -> PairwiseDecoder:
        """Read a file written by :meth:`save` (``weights_only`` loading, format checked)."""
        payload = load_tagged(path, FORMAT_TAG, (1, FORMAT_VERSION), "pairwise decoder",
                              "train one with `qinco2 task=train_pairwise_decoder ... output=PATH`")
        state = payload.get("state")
        if payload["version"] == 1 and isinstance(state, dict) and isinstance(payload.get("params"), dict):
            _upgrade_version_1(payload["params"], state)
        if not isinstance(state, dict) or set(state) != set(_STATE) or not isinstance(payload.get("params"), dict):
            raise ModelFileError(f"{path} is a damaged pairwise decoder file (state keys {sorted(state or {})})")
        try:
            dec = cls(**payload["params"])
        except TypeError as exc:
            raise ModelFileError(f"{path} holds unknown pairwise decoder parameters: {exc}") from exc
        for name in _STATE:
            value = state[name]
            setattr(dec, name, value.numpy() if isinstance(value, torch.Tensor) else value)
        return dec

