"""Evaluation of a trained codec: database MSE, code usage, prefix MSEs, exhaustive search
R@k, a faiss residual-quantizer baseline, and the demo run on the synthetic set.

These are the calls behind the CLI tasks ``eval``, ``eval_valset``, ``search`` and ``demo``.
Arrays may be memory-mapped and of any numeric dtype; they are read batch by batch. Empty
sets are refused, and a row holding NaN or Inf stops the evaluation with its row (and file).

Search ranks the decoded database by ``metric``: ``"l2"`` (smallest distance first) or
``"ip"`` (largest inner product first, for inner-product data such as unit-norm text
embeddings). Decoded vectors do not have unit norm, so the two rankings differ even when the
raw vectors' rankings coincide (and one ground truth serves both).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ..datasets import DataLimits, resolve_dataset
from ..errors import InputError
from ..metrics import check_metric, code_usage, knn, mse, recall_at
from ..progress import progress_bar
from ..tensor_io import accepts_tensors
from ..validation import check_vectors
from .batches import check_rows_finite, require_rows, row_source
from .codec import QincoCodec

log = logging.getLogger(__name__)

KS = (1, 10, 100)

# The demo's codec: 8 bytes (M=8, K=256) on the D=64 synthetic set, sized to train in about
# two minutes on two CPU cores: a small network, a narrow beam, 10 short epochs (one of
# warm-up) at a higher learning rate than the 60-epoch default.
DEMO_SETTINGS = dict(M=8, K=256, L=1, de=64, dh=128, A=4, B=4, loop=50_000, batch=256,
                     lr=0.004, epochs=7, ramp_epochs=1, max_epochs=8)   # ~2.2 min on 2 idle cores


def _check_set(codec: QincoCodec, x, what: str) -> np.ndarray:
    """``x`` checked to be vectors of the codec's dimension with at least one row (their
    values are checked as they are read, by :func:`_batches`)."""
    x = check_vectors(x, what, codec.dim, dim_owner=f"the codec was trained on D={codec.dim}", finite=False)
    require_rows(x, what, "evaluation needs at least one vector; check the file and the row limit it is read with")
    return x


def _check_queries(codec: QincoCodec, queries, gt) -> None:
    """Queries (in memory: checked whole) and their ground truth, one row per query."""
    _check_set(codec, queries, "queries")
    check_rows_finite(np.asarray(queries, dtype=np.float32), "queries", row_source(queries))
    gt = np.asarray(gt)
    if gt.ndim not in (1, 2) or len(gt) != len(queries):
        raise InputError(f"gt must hold one row of neighbour ids per query ({len(queries)} rows), got shape "
                         f"{gt.shape}; pass the ground truth of these queries")


def _batches(x: np.ndarray, batch: int, progress: bool, desc: str, what: str = "x"):
    """Float32 row blocks of ``x`` with their start index, checked for NaN/Inf (after the
    cast) as they are read: the error names ``what``, the row and the file if any."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InputError(f"batch must be a whole number >= 1 (rows per batch), got {batch!r}")
    source = row_source(x)
    for i in progress_bar(range(0, len(x), batch), desc=desc, disable=not progress, leave=False):
        with np.errstate(over="ignore"):                  # overflow gives Inf, caught below
            x_nD = np.array(x[i:i + batch], dtype=np.float32)   # a copy: torch wants writable rows
        check_rows_finite(x_nD, what, source, first_row=i)
        yield i, x_nD


def _scan(codec: QincoCodec, x: np.ndarray, batch: int, progress: bool, prefixes: bool, what: str,
          precision: str = "fp32"):
    """Encode ``x`` (refused when empty) in batches: codes ``(N, n_codes)`` and the summed
    squared errors of the decoded prefixes of length 1..n_codes (or of the full code only)."""
    x = _check_set(codec, x, what)
    codes_NM = np.empty((len(x), codec.n_codes), dtype=np.int32)
    lengths = range(1, codec.n_codes + 1) if prefixes else [codec.n_codes]
    totals = np.zeros(len(lengths))
    for i, x_ND in _batches(x, batch, progress, "encode", what):
        codes_NM[i:i + len(x_ND)] = codes = codec.encode(x_ND, precision=precision)
        for j, m in enumerate(lengths):
            totals[j] += mse(x_ND, codec.decode(codes[:, :m])) * len(x_ND)
    return codes_NM, totals / len(x)


def _mse_fields(codec: QincoCodec, codes_NM: np.ndarray, mse_m: np.ndarray, mse_scale: float,
                prefixes: bool) -> dict:
    used, entropy = code_usage(codes_NM, [s.K for s in codec.model_.steps])
    out = {"n": len(codes_NM), "mse": float(mse_m[-1] * mse_scale),
           "code_usage": used.round(4).tolist(), "entropy_bits": entropy.round(4).tolist()}
    if prefixes:
        out["prefix_mse"] = (mse_m * mse_scale).tolist()
    return out


@accepts_tensors
def evaluate_mse(codec: QincoCodec, x: np.ndarray, mse_scale: float = 1.0, *,
                 batch: int = 16_384, prefixes: bool = False, progress: bool = False,
                 precision: str = "fp32") -> dict:
    """MSE of encode+decode (times ``mse_scale``) plus, per step, the fraction of codewords
    used and the entropy (bits) of the code distribution; with ``prefixes`` also
    ``prefix_mse`` as :func:`evaluate_prefixes` gives it, from the same encoding pass.
    ``precision``: the encoder's arithmetic (:meth:`QincoCodec.encode`)."""
    codes_NM, mse_m = _scan(codec, x, batch, progress, prefixes, "x", precision)
    return _mse_fields(codec, codes_NM, mse_m, mse_scale, prefixes)


def evaluate_prefixes(codec: QincoCodec, x: np.ndarray, mse_scale: float = 1.0, *,
                      batch: int = 16_384, progress: bool = False) -> list[float]:
    """MSE of the decoding of the first ``m`` codes, for ``m = 1 .. n_codes`` (the model
    is trained so that every prefix is a usable lower-rate code)."""
    return (_scan(codec, x, batch, progress, True, "x")[1] * mse_scale).tolist()


def _search_metrics(xhat_ND: np.ndarray, queries: np.ndarray, gt: np.ndarray, ks,
                    metric: str) -> dict:
    ids_QS = knn(queries, xhat_ND, max(ks), metric=metric)
    return {f"R@{k}": r for k, r in recall_at(ids_QS, gt, ks).items()}


def _search_fields(xhat_ND: np.ndarray, queries: np.ndarray, gt: np.ndarray, ks,
                   metric: str) -> dict:
    """The result of an exhaustive search of the decoded database ``xhat_ND``."""
    if np.asarray(gt).max(initial=-1) >= len(xhat_ND):
        log.warning("ground truth refers to rows past the %d database rows used; recall is "
                    "computed against the truncated database", len(xhat_ND))
    return {"metric": metric, "n_db": len(xhat_ND), "n_queries": len(queries),
            **_search_metrics(xhat_ND, queries, gt, ks, metric)}


@accepts_tensors
def evaluate_search(codec: QincoCodec, db: np.ndarray, queries: np.ndarray, gt: np.ndarray,
                    ks=KS, *, metric: str = "l2", batch: int = 16_384,
                    progress: bool = False, precision: str = "fp32") -> dict:
    """Exhaustive search over the decoded database: R@k = the true nearest neighbour
    (first column of ``gt``) is among the k best decoded vectors by ``metric`` ("l2" or
    "ip", see :func:`qinco2.metrics.knn`). ``precision``: the encoder's arithmetic."""
    check_metric(metric)
    _check_queries(codec, queries, gt)
    db = _check_set(codec, db, "db")
    xhat_ND = np.empty((len(db), codec.dim), dtype=np.float32)
    for i, x_ND in _batches(db, batch, progress, "encode db", "db"):
        xhat_ND[i:i + len(x_ND)] = codec.decode(codec.encode(x_ND, precision=precision))
    return _search_fields(xhat_ND, queries, gt, ks, metric)


@accepts_tensors
def evaluate_codec(codec: QincoCodec, db: np.ndarray, mse_scale: float = 1.0,
                   queries: np.ndarray | None = None, gt: np.ndarray | None = None, ks=KS, *,
                   metric: str = "l2", batch: int = 16_384, progress: bool = False,
                   precision: str = "fp32") -> dict:
    """:func:`evaluate_mse` with prefixes and, when ``queries`` and ``gt`` are given,
    :func:`evaluate_search` by ``metric``, from one encoding pass over ``db`` (encoded in
    ``precision``, see :meth:`QincoCodec.encode`)."""
    check_metric(metric)
    if queries is not None and gt is not None:
        _check_queries(codec, queries, gt)
    codes_NM, mse_m = _scan(codec, db, batch, progress, True, "db", precision)
    out = _mse_fields(codec, codes_NM, mse_m, mse_scale, True)
    if queries is None or gt is None:
        return out
    xhat_ND = np.empty((len(db), codec.dim), dtype=np.float32)
    for i in range(0, len(codes_NM), batch):
        xhat_ND[i:i + batch] = codec.decode(codes_NM[i:i + batch])
    return {**out, **_search_fields(xhat_ND, queries, gt, ks, metric)}


def compare_with_rq(x_train: np.ndarray, x_db: np.ndarray, queries: np.ndarray, gt: np.ndarray,
                    M: int, K: int, mse_scale: float = 1.0, ks=KS, *, metric: str = "l2") -> dict:
    """faiss ``ResidualQuantizer(D, M, log2 K)`` (its default beam) trained on ``x_train``:
    database MSE and exhaustive-search R@k by ``metric``, the baseline QINCo2 should beat."""
    import faiss

    nbits = int(K).bit_length() - 1
    if 1 << nbits != K:
        raise InputError(f"the RQ baseline needs K a power of two (K = 2**nbits), got K={K}")
    check_metric(metric)
    for what, x in (("x_train", x_train), ("x_db", x_db), ("queries", queries)):
        require_rows(x, what, f"the RQ baseline needs at least one {what} vector")
        check_rows_finite(np.asarray(x, dtype=np.float32), what, row_source(x))
    x_train = np.ascontiguousarray(x_train, dtype=np.float32)
    x_db = np.ascontiguousarray(x_db, dtype=np.float32)
    rq = faiss.ResidualQuantizer(x_train.shape[1], M, nbits)
    start = time.perf_counter()
    rq.train(x_train)
    train_s = time.perf_counter() - start
    xhat_ND = rq.decode(rq.compute_codes(x_db))
    return {"mse": mse(x_db, xhat_ND, mse_scale), "train_s": round(train_s, 2),
            "beam": int(rq.max_beam_size), "metric": metric,
            **_search_metrics(xhat_ND, queries, gt, ks, metric)}


def run_demo(output, *, device="cpu", progress: bool = True, **overrides) -> dict:
    """Train a small QINCo2 on the embedded synthetic set (8 bytes per vector by default) and
    compare it with faiss RQ of the same M and K; the model is written to ``output``.

    ``overrides`` replace :data:`DEMO_SETTINGS` (codec fields); ``trainset``, ``valset`` and
    ``db`` limit the data rows (tests use them to shrink the run).
    """
    limits = DataLimits(valset=overrides.pop("valset", 10_000),
                        trainset=overrides.pop("trainset", None), db=overrides.pop("db", None))
    settings = {**DEMO_SETTINGS, **overrides}
    ds = resolve_dataset("synthetic")
    x_train, x_val = ds.train_val(limits)
    x_db, queries = ds.database(limits), ds.query_vectors()
    # The stored ground truth is over the whole base; a truncated base needs its own.
    gt = ds.ground_truth() if limits.db is None else knn(queries, np.asarray(x_db), 1)
    codec = QincoCodec.from_preset("qinco2-S", device=device, **settings)
    start = time.perf_counter()
    codec.train(x_train, x_val, mse_scale=ds.mse_scale, output=output, progress=progress)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    qinco = evaluate_mse(codec, x_db, ds.mse_scale, progress=progress)
    qinco.update(evaluate_search(codec, x_db, queries, gt, progress=progress))
    eval_s = time.perf_counter() - start
    rq = compare_with_rq(x_train, x_db, queries, gt, settings["M"], settings["K"], ds.mse_scale)
    return {"dataset": ds.name, "D": int(x_db.shape[1]), "M": settings["M"], "K": settings["K"],
            "n_train": len(x_train), "n_val": len(x_val), "n_db": len(x_db),
            "n_queries": len(queries), "epochs_run": codec.train_state_.epoch,
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "device": str(codec.device),
            "qinco2": qinco, "rq": rq, "output": str(output)}
