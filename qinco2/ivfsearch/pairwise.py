"""Pairwise additive decoder (QINCo2 §3.3, spec §8.6): look-up tables indexed by code pairs.

A vector with codes ``(i0, i1..iM)`` (IVF list, then M step codes) is decoded as
``c_ivf[i0] + sum_j P_j[k_{a_j} * K + k_{b_j}]`` where the columns ``k`` are the M step codes
followed by ``levels`` sub-codes of the IVF centroid (a residual k-means of the centroids), and
each table ``P_j`` holds ``K*K`` vectors. Training fits the tables greedily, one closed-form
least-squares table per round, on raw-space residuals ``x - c_ivf[i0]``.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import atomic_torch_save, load_tagged
from ..errors import ConfigError, InputError, ModelFileError, NotTrainedError
from ..kmeans import kmeans
from ..metrics import mse
from ..validation import check_codes, check_vectors
from .aq import additive_decode, fit_additive_codebooks

log = logging.getLogger(__name__)

FORMAT_TAG = "qinco2-pairwise"
FORMAT_VERSION = 1
_STATE = ("M_", "ivf_centroids_", "ivf_subcodes_", "pairs_", "tables_", "train_mse_")


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


def _cell_means(code_N: torch.Tensor, t_ND: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Mean of ``t`` per cell (float64 sums); empty cells are 0."""
    sums = torch.zeros((n_cells, t_ND.shape[1]), dtype=torch.float64).index_add_(0, code_N, t_ND)
    counts = torch.bincount(code_N, minlength=n_cells).clamp_(min=1)
    return sums / counts[:, None]


def greedy_pair_tables(cols_NL: np.ndarray, t_ND: np.ndarray, K: int, J: int, eval_rows: int,
                       progress: bool = True):
    """``J`` greedy rounds: every column pair's table of means, keep the one with the lowest MSE
    on the first ``eval_rows`` rows, subtract it from all rows. Returns (pairs, tables, mses)."""
    cols = torch.from_numpy(cols_NL.astype(np.int64))
    t = torch.from_numpy(np.array(t_ND, dtype=np.float64))          # residual target, updated in place
    n_eval, L = min(eval_rows, len(t)), cols.shape[1]
    candidates = [(a, b) for a in range(L) for b in range(a + 1, L)]
    pairs, tables, mses = [], [], []
    for j in tqdm(range(J), desc="pairwise tables", disable=not progress, leave=False):
        best = None
        for a, b in candidates:
            code = cols[:, a] * K + cols[:, b]
            table = _cell_means(code, t, K * K).float()          # stored (and decoded) in float32
            err = t[:n_eval] - table[code[:n_eval]].double()
            err_mse = float((err * err).sum(1).mean())
            if best is None or err_mse < best[0]:
                best = (err_mse, a, b, table)
        err_mse, a, b, table = best
        t -= table.double()[cols[:, a] * K + cols[:, b]]
        pairs.append((a, b))
        tables.append(table.numpy())
        mses.append(err_mse)
        log.info("pairwise round %d/%d: columns (%d, %d), MSE %.6g", j + 1, J, a, b, err_mse)
    return np.array(pairs, dtype=np.int64).reshape(-1, 2), np.stack(tables), mses


class PairwiseDecoder:
    """Look-up-only decoder of IVF codes ``(N, 1+M)`` into raw-space vectors.

    >>> dec = PairwiseDecoder(K=256).train(codes, x, ivf_centroids)   # doctest: +SKIP
    >>> xhat = dec.decode(codes)                                       # doctest: +SKIP

    Learned state: ``M_`` (step codes per vector), ``ivf_centroids_`` (C, D) float32,
    ``ivf_subcodes_`` (C, levels) int32, ``pairs_`` (J, 2) column pairs (columns: the M step
    codes, then the sub-codes), ``tables_`` (J, K*K, D) float32, ``train_mse_`` (MSE per round
    on the first ``eval_rows`` training rows).
    """

    def __init__(self, n_pairs_per_step: float = 2, ivf_subcode_levels: int = 5, K: int = 256,
                 seed: int = 0, eval_rows: int = 100_000):
        self.n_pairs_per_step = n_pairs_per_step
        self.ivf_subcode_levels = ivf_subcode_levels
        self.K = K
        self.seed = seed
        self.eval_rows = eval_rows
        for name in _STATE:
            setattr(self, name, None)

    def get_params(self) -> dict:
        return {"n_pairs_per_step": self.n_pairs_per_step, "ivf_subcode_levels": self.ivf_subcode_levels,
                "K": self.K, "seed": self.seed, "eval_rows": self.eval_rows}

    # ------------------------------------------------------------------ checks
    def _check_params(self, M: int) -> int:
        if not (isinstance(self.K, int) and self.K >= 2):
            raise ConfigError(f"K must be an integer >= 2, got {self.K!r}")
        if not (isinstance(self.ivf_subcode_levels, int) and self.ivf_subcode_levels >= 0):
            raise ConfigError(f"ivf_subcode_levels must be an integer >= 0, got {self.ivf_subcode_levels!r}")
        if not (isinstance(self.eval_rows, int) and self.eval_rows >= 1):
            raise ConfigError(f"eval_rows must be an integer >= 1, got {self.eval_rows!r}")
        J = round(self.n_pairs_per_step * M)
        if J < 1:
            raise ConfigError(f"n_pairs_per_step={self.n_pairs_per_step} with M={M} gives no pair table; use > 0.5/M")
        if M + self.ivf_subcode_levels < 2:
            raise ConfigError("need at least two code columns to form pairs: M=1 needs ivf_subcode_levels >= 1")
        return J

    def _check_codes(self, codes, n_ivf: int, M: int | None = None) -> np.ndarray:
        """Codes ``(N, 1+M)``: IVF ids in ``[0, n_ivf)``, step codes in ``[0, K)``."""
        check_codes(codes, None, "codes", columns=(2, None) if M is None else 1 + M,
                    columns_are="1+M columns: the IVF id, then M step codes")
        check_codes(codes[:, :1], n_ivf, "codes column 0 (IVF ids)", K_name="C",
                    fix="were these codes made with these centroids?")
        check_codes(codes[:, 1:], self.K, "codes columns 1..M (step codes)",
                    fix="construct the decoder with the codes' K")
        return codes

    def _trained(self) -> None:
        if self.tables_ is None:
            raise NotTrainedError("this PairwiseDecoder is not trained: call train(codes, x, ivf_centroids) "
                                  "or PairwiseDecoder.load(path) first")

    def _columns_and_targets(self, codes, x):
        """Code columns ``(N, M + levels)`` and raw residual targets ``x - c_ivf[i0]`` (float64)."""
        cols = np.concatenate([codes[:, 1:], self.ivf_subcodes_[codes[:, 0]]], axis=1).astype(np.int64)
        t = np.asarray(x, dtype=np.float64) - self.ivf_centroids_[codes[:, 0]]
        return cols, t

    # ------------------------------------------------------------------ training
    def train(self, codes, x_ND, ivf_centroids_CD, progress: bool = True) -> "PairwiseDecoder":
        """Fit sub-codes and pair tables on training codes ``(N, 1+M)`` of raw vectors ``x_ND``."""
        centroids = check_vectors(ivf_centroids_CD, what="ivf_centroids")
        codes = self._check_codes(codes, len(centroids))
        x_ND = check_vectors(x_ND, "x", centroids.shape[1], dim_owner=f"ivf_centroids have D={centroids.shape[1]}",
                             rows=len(codes), rows_owner=f"the codes have {len(codes)}")
        if len(codes) == 0:
            raise InputError("codes and x are empty; training needs at least one vector")
        M = codes.shape[1] - 1
        J = self._check_params(M)
        weights = np.bincount(codes[:, 0], minlength=len(centroids)).astype(np.float64)
        self.M_ = M
        self.ivf_centroids_ = np.ascontiguousarray(centroids, dtype=np.float32)
        self.ivf_subcodes_ = ivf_subcodes(self.ivf_centroids_, weights, self.ivf_subcode_levels,
                                          self.K, self.seed)
        cols, t = self._columns_and_targets(codes, x_ND)
        log.info("pairwise decoder: N=%d, M=%d, %d columns, J=%d tables of %d x %d, initial MSE %.6g",
                 len(t), M, cols.shape[1], J, self.K ** 2, t.shape[1],
                 float((t[:self.eval_rows] ** 2).sum(1).mean()))
        self.pairs_, self.tables_, self.train_mse_ = greedy_pair_tables(
            cols, t, self.K, J, self.eval_rows, progress)
        return self

    def additive_baseline_mse(self, codes, x_ND) -> float:
        """MSE of plain additive decoding (least-squares AQ tables, :mod:`qinco2.ivfsearch.aq`) fitted on
        the same code columns and targets as this decoder; it is a lower bound for AQ on the
        step codes alone. Fitted and measured on all the given rows."""
        self._trained()
        codes = self._check_codes(codes, len(self.ivf_centroids_))
        D = self.ivf_centroids_.shape[1]
        x_ND = check_vectors(x_ND, "x", D, dim_owner=f"the decoder was trained on D={D}",
                             rows=len(codes), rows_owner=f"the codes have {len(codes)}")
        cols, t = self._columns_and_targets(codes, x_ND)
        tables = fit_additive_codebooks(cols, t, self.K)
        return mse(t, additive_decode(cols, tables))

    # ------------------------------------------------------------------ decoding
    def decode(self, codes, *, batch_size: int = 65_536) -> np.ndarray:
        """Float32 raw-space vectors ``(N, D)`` from codes ``(N, 1+M)``."""
        self._trained()
        codes = self._check_codes(codes, len(self.ivf_centroids_), self.M_)
        out = np.empty((len(codes), self.ivf_centroids_.shape[1]), dtype=np.float32)
        for i in range(0, len(codes), batch_size):
            c = codes[i:i + batch_size]
            cols = np.concatenate([c[:, 1:], self.ivf_subcodes_[c[:, 0]]], axis=1).astype(np.int64)
            acc = self.ivf_centroids_[c[:, 0]].copy()
            for (a, b), table in zip(self.pairs_, self.tables_):
                acc += table[cols[:, a] * self.K + cols[:, b]]
            out[i:i + len(c)] = acc
        return out

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write parameters and learned state atomically to ``path``."""
        self._trained()
        state = {"M_": int(self.M_), "train_mse_": [float(v) for v in self.train_mse_]}
        for name in ("ivf_centroids_", "ivf_subcodes_", "pairs_", "tables_"):
            state[name] = torch.from_numpy(np.ascontiguousarray(getattr(self, name)))
        atomic_torch_save({"format": FORMAT_TAG, "version": FORMAT_VERSION,
                           "params": self.get_params(), "state": state}, path)

    @classmethod
    def load(cls, path) -> "PairwiseDecoder":
        """Read a file written by :meth:`save` (``weights_only`` loading, format checked)."""
        payload = load_tagged(path, FORMAT_TAG, FORMAT_VERSION, "pairwise decoder",
                              "train one with `qinco2 task=train_pairwise_decoder ... output=PATH`")
        state = payload.get("state")
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

