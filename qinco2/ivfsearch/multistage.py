"""The large-scale search pipeline (spec sections 8.7-8.8): a faiss IVF-AQ shortlist, an
optional pairwise-decoder re-rank, then QINCo2 decoding and an exact re-rank; a pruned sweep
over the query-time parameters, its JSON log, Pareto fronts and plots.

Build-time choices live in the index (:mod:`qinco2.ivfsearch.shortlist`); everything here is a query-time
:class:`SearchParams`, so a sweep never rebuilds anything. The database codes ``(Nb, 1+M)``
are kept in memory and looked up by id (the ids in the index are database rows).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from ..atomic import atomic_open
from ..errors import ConfigError, InputError
from ..metrics import recall_at
from ..progress import progress_bar
from ..rerank import exact_rerank
from ..validation import check_codes, check_vectors
from . import shortlist_scan

log = logging.getLogger(__name__)

MAX_N1 = 8000                     # largest first shortlist (spec 8.7)
RECALL_KS = (1, 10, 100)
TIMERS = ("t_search", "t_mid_rerank", "t_decode", "t_rerank")

# Settings (nprobe, quantizer_efSearch, nshort, nmid_short) expected near the Pareto front of
# a 1M-list index; the sweep runs the grid points closest to them (in log2 space) first, so
# that the pruning has good points to compare against early.
KNOWN_GOOD = [
    (1, 4, 1, 0), (1, 8, 2, 0), (2, 8, 4, 0), (4, 16, 10, 0), (4, 16, 10, 4),
    (8, 16, 20, 0), (8, 32, 20, 4), (16, 32, 50, 0), (16, 64, 50, 4), (32, 64, 100, 4),
    (32, 128, 100, 8), (64, 128, 200, 4), (64, 256, 200, 8), (128, 256, 500, 8),
    (256, 512, 1000, 8), (512, 1024, 1000, 12), (1024, 2048, 2000, 16), (2048, 4096, 2000, 16),
]


@dataclass(frozen=True)
class SearchParams:
    """Query-time parameters of :func:`multistage_search`.

    ``nprobe``: IVF lists scanned per query; ``quantizer_efSearch``: HNSW breadth when finding
    them; ``nshort``: candidates decoded with QINCo2 and re-ranked exactly; ``nmid_short``: the
    IVF-AQ stage returns ``nmid_short * nshort`` candidates that the pairwise decoder cuts to
    ``nshort`` (0 or 1: no pairwise stage).
    """

    nprobe: int = 16
    quantizer_efSearch: int = 64
    nshort: int = 100
    nmid_short: int = 0

    def validated(self) -> "SearchParams":
        """``self``, or :class:`ConfigError` naming the first parameter out of its range."""
        for f in dataclasses.fields(self):
            value, low = getattr(self, f.name), 0 if f.name == "nmid_short" else 1
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"search parameter {f.name} must be an integer >= {low}, got {value!r}")
        return self

    @property
    def n1(self) -> int:
        """Length of the first (IVF-AQ) shortlist."""
        return min(max(self.nmid_short * self.nshort, self.nshort), MAX_N1)

    def as_dict(self) -> dict:
        """The parameters as a plain dict of ints (the keys of a search log)."""
        return {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)}


# ---------------------------------------------------------------------------- pipeline stages
def _exact_top(q_QD: np.ndarray, ids_QS: np.ndarray, decode, db_codes, n: int, batch_rows: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Distances and ids ``(Q, n)`` of the ``n`` candidates nearest to each query by the exact
    ``metric`` (of :func:`qinco2.rerank.exact_rerank`) to their ``decode``-d codes (-1 padded)."""
    return exact_rerank(q_QD, ids_QS, lambda ids: decode(np.asarray(db_codes[ids])), n,
                        metric=metric, batch_rows=batch_rows)


def _shortlist_distances(dist_QS: np.ndarray, ids_QS: np.ndarray, metric: str) -> np.ndarray:
    """The faiss stage's distances in the convention of :func:`qinco2.rerank.exact_rerank`
    (-1 ids: inf, or -inf for inner products). ``cosine`` runs on an L2 index of unit vectors,
    where ``||q - x||^2 = 2 (1 - cos)``: exact for unit-norm reconstructions."""
    largest = metric == "inner_product"
    out = np.asarray(dist_QS, dtype=np.float32) / (2 if metric == "cosine" else 1)
    return np.where(ids_QS >= 0, out, -np.inf if largest else np.inf).astype(np.float32)


def _check_search_inputs(index, codec, db_codes, queries) -> np.ndarray:
    """Float32 queries; ``db_codes`` must be the codes the index was built from (values: by decode)."""
    check_vectors(queries, "queries", index.d, dim_owner=f"the index has dim={index.d}")
    check_codes(db_codes, None, "db_codes", columns=codec.n_codes,
                columns_are="1+M columns: the IVF id, then M step codes", rows=index.ntotal,
                rows_owner=f"the index holds {index.ntotal} vectors",
                fix="pass the codes the index was built from")
    return np.ascontiguousarray(queries, dtype=np.float32)


def multistage_search(index, codec, db_codes, queries, params: SearchParams, *, pairwise=None,
                      k: int = 100, gt=None, batch_rows: int = 65_536, metric: str = "sqeuclidean",
                      decode_precision: str = "fp32") -> tuple[np.ndarray, dict]:
    """Ids ``(Q, k)`` of the nearest database vectors (-1 where fewer candidates), and a dict
    of the stage times in seconds (``t_search``, ``t_mid_rerank``, ``t_decode``, ``t_rerank``,
    ``t_total``) plus, when the true neighbours ``gt`` are given, ``recalls_before_rerank``
    (R@1/10/100 of the shortlist in the order before the QINCo2 re-rank).

    ``db_codes`` ``(Nb, 1+M)``: the codes the index was built from; ``codec``: the IVF QINCo2
    codec that made them; ``pairwise``: an optional :class:`~qinco2.ivfsearch.pairwise.PairwiseDecoder`.
    ``batch_rows`` candidates are decoded at a time. ``metric``: that of the exact re-ranks
    (``sqeuclidean``, ``inner_product`` or ``cosine``, :func:`qinco2.rerank.exact_rerank`).
    ``decode_precision``: the arithmetic of the QINCo2 decoding (``codec.decode(precision=...)``:
    ``"bf16"`` decodes 1.6-2.7x faster on a CPU with bfloat16 units, the vectors moving by about
    1e-4 of the codec's error; distances and ranking stay float32).
    """
    _, ids, stats = multistage_knn(index, codec, db_codes, queries, params, pairwise=pairwise, k=k, gt=gt,
                                   batch_rows=batch_rows, metric=metric, decode_precision=decode_precision)
    return ids, stats


def multistage_knn(index, codec, db_codes, queries, params: SearchParams, *, pairwise=None,
                   k: int = 100, gt=None, batch_rows: int = 65_536, metric: str = "sqeuclidean",
                   decode_precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`multistage_search` with the distances: ``(D, I, stats)``, ``D`` ``(Q, k)`` float32
    as :func:`qinco2.rerank.exact_rerank` gives them for ``metric``, to the QINCo2-decoded
    vectors; with ``nshort=1`` nothing is decoded and ``D`` is that of the shortlist stage
    (the pairwise-decoded vectors, or faiss' additive reconstructions)."""
    params = params.validated()
    q_QD = _check_search_inputs(index, codec, db_codes, queries)
    nshort, n1 = params.nshort, params.n1
    times = dict.fromkeys(TIMERS, 0.0)

    t0 = time.perf_counter()
    dist, ids = shortlist_scan.search(index, q_QD, n1, params.nprobe, params.quantizer_efSearch)
    times["t_search"] = time.perf_counter() - t0

    if pairwise is not None and params.nmid_short > 1 and n1 > nshort:
        t0 = time.perf_counter()
        dist, ids = _exact_top(q_QD, ids, pairwise.decode, db_codes, nshort, batch_rows, metric)
        times["t_mid_rerank"] = time.perf_counter() - t0
    else:
        dist = _shortlist_distances(dist, ids, metric)
    shortlist = ids[:, :nshort]
    stats = {}
    if gt is not None:
        stats["recalls_before_rerank"] = {str(r): v for r, v in recall_at(shortlist, gt, RECALL_KS).items()}

    if nshort == 1:                     # nothing to re-rank: the decode timers stay at zero
        out = np.full((len(q_QD), k), -1, dtype=np.int64)
        out_dist = np.full((len(q_QD), k), -np.inf if metric == "inner_product" else np.inf, dtype=np.float32)
        out[:, :1], out_dist[:, :1] = shortlist, dist[:, :1]
    else:
        decode_time = [0.0]

        def timed_decode(codes):
            t = time.perf_counter()
            xhat = codec.decode(codes, precision=decode_precision)
            decode_time[0] += time.perf_counter() - t
            return xhat

        t0 = time.perf_counter()
        out_dist, out = _exact_top(q_QD, shortlist, timed_decode, db_codes, k, batch_rows, metric)
        times["t_decode"] = decode_time[0]
        times["t_rerank"] = time.perf_counter() - t0 - decode_time[0]
    times["t_total"] = sum(times[t] for t in TIMERS)
    return out_dist, out, {**times, **stats}


# ---------------------------------------------------------------------------- sweep
def _grid_points(grid: dict, pairwise) -> list[tuple]:
    names = [f.name for f in dataclasses.fields(SearchParams)]
    unknown = set(grid) - set(names)
    if unknown:
        raise ConfigError(f"unknown search parameter(s) {sorted(unknown)} in the grid; valid: {names}")
    values = {n: list(grid.get(n, [getattr(SearchParams, n)])) for n in names}
    if pairwise is None:
        values["nmid_short"] = [0]          # no pairwise decoder: no middle stage
    for n, vals in values.items():
        if not vals:
            raise ConfigError(f"the grid gives no value for {n}")
        for v in vals:
            SearchParams(**{n: v}).validated()
    return list(itertools.product(*(sorted(set(values[n])) for n in names)))


def log2_distance(p: tuple, q: tuple) -> float:
    """Sum over parameters of ``|log2 max(p_i, 1) - log2 max(q_i, 1)|``."""
    return sum(abs(math.log2(max(a, 1)) - math.log2(max(b, 1))) for a, b in zip(p, q))


def order_points(points: list[tuple], known_good=KNOWN_GOOD) -> list[tuple]:
    """``points`` sorted by log2 distance to the nearest known-good setting (stable)."""
    return sorted(points, key=lambda p: min(log2_distance(p, g) for g in known_good))


def _key_of(p: tuple) -> tuple:
    return tuple(int(v) for v in p)


def _params_key(run: dict) -> tuple:
    return tuple(int(run["parameters"][f.name]) for f in dataclasses.fields(SearchParams))


def _recall(run: dict, key: str) -> float:
    if not key.startswith("R@"):
        raise ConfigError(f"recall key must look like 'R@1', got {key!r}")
    return float(run["recalls"][key[2:]])


def _qps(run: dict) -> float:
    if "qps" in run:
        return float(run["qps"])
    return run["n_queries"] / max(run["t_total"], 1e-12)


def is_pruned(p: tuple, runs: list[dict], key: str = "R@1") -> bool:
    """Whether setting ``p`` cannot be Pareto-optimal, every parameter being monotone (larger:
    slower and more accurate): its recall is at most that of any run that dominates it
    component-wise, its time at least that of any run it dominates; skip it when a measured
    run is at least as accurate as that bound and at least as fast."""
    recall_bound, time_bound = 1.0, 0.0
    for run in runs:
        q = _params_key(run)
        if all(a <= b for a, b in zip(p, q)):
            recall_bound = min(recall_bound, _recall(run, key))
        if all(a >= b for a, b in zip(p, q)):
            time_bound = max(time_bound, run["t_total"])
    return any(_recall(r, key) >= recall_bound and r["t_total"] <= time_bound for r in runs)


def _environment(threads) -> dict:
    return {"faiss": faiss.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "threads": threads or faiss.omp_get_max_threads()}


def _write_log(path: Path, runs: list[dict], env: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        f.write(json.dumps({"runs": runs, "environment": env}, indent=1).encode())


def load_runs(path) -> list[dict]:
    """The runs of a sweep log written by :func:`sweep`."""
    try:
        content = json.loads(Path(path).read_text())
        runs = content["runs"]
        for run in runs:
            _params_key(run)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a qinco2 search log ({exc}); delete it or drop resume=true") from None
    return runs


def _run_one(index, codec, db_codes, q_QD, gt, p: tuple, pairwise, k: int, metric: str,
             decode_precision: str = "fp32") -> dict:
    params = SearchParams(*p)
    ids, stats = multistage_search(index, codec, db_codes, q_QD, params, pairwise=pairwise, k=k, gt=gt,
                                   metric=metric, decode_precision=decode_precision)
    recalls = {str(r): v for r, v in recall_at(ids, gt, RECALL_KS).items()}
    return {"parameters": params.as_dict(), "recalls": recalls, **stats,
            "n_queries": len(q_QD), "qps": len(q_QD) / max(stats["t_total"], 1e-12)}


def sweep(index, codec, db_codes, queries, gt, grid: dict[str, list], *, pairwise=None, log_path=None,
          resume: bool = False, threads: int | None = None, key: str = "R@1", k: int = 100,
          known_good=KNOWN_GOOD, progress: bool = True, metric: str = "sqeuclidean",
          decode_precision: str = "fp32") -> list[dict]:
    """Run :func:`multistage_search` over the grid of :class:`SearchParams` values (missing
    names: the defaults; ``nmid_short`` is 0 without ``pairwise``), skipping settings that
    cannot be Pareto-optimal for ``key`` vs time (:func:`is_pruned`), closest to ``known_good``
    first. Returns all runs (loaded and new). ``log_path``: JSON log rewritten atomically after
    each run; ``resume``: continue a log, skipping the settings already in it. ``threads``:
    faiss and torch threads during the sweep (restored after); ``metric``: that of the exact
    re-ranks and ``decode_precision`` that of the QINCo2 decoding (:func:`multistage_search`)."""
    points = order_points(_grid_points(grid, pairwise), known_good)
    log_path = Path(log_path) if log_path is not None else None
    runs = load_runs(log_path) if resume and log_path is not None and log_path.is_file() else []
    done = {_params_key(r) for r in runs}
    q_QD = _check_search_inputs(index, codec, db_codes, queries)
    if len(gt) != len(q_QD):
        raise InputError(f"gt has {len(gt)} rows but there are {len(q_QD)} queries; pass one true "
                         "nearest neighbour id per query")
    old_threads = faiss.omp_get_max_threads(), torch.get_num_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)
    env, warm, n_pruned = _environment(threads), False, 0
    try:
        for p in progress_bar(points, desc="search sweep", disable=not progress, leave=False):
            if _key_of(p) in done:
                continue
            if is_pruned(p, runs, key):
                n_pruned += 1
                continue
            if not warm:                # warm up both decoders and the index before timing
                _run_one(index, codec, db_codes, q_QD[:8], gt[:8], p, pairwise, k, metric, decode_precision)
                warm = True
            run = _run_one(index, codec, db_codes, q_QD, gt, p, pairwise, k, metric, decode_precision)
            runs.append(run)
            done.add(_key_of(p))
            log.info("%s R@1=%.4f R@10=%.4f R@100=%.4f %.1f QPS", run["parameters"], run["recalls"]["1"],
                     run["recalls"]["10"], run["recalls"]["100"], run["qps"])
            if log_path is not None:
                _write_log(log_path, runs, env)
    finally:
        faiss.omp_set_num_threads(old_threads[0])
        torch.set_num_threads(old_threads[1])
    log.info("sweep: %d runs, %d settings pruned", len(runs), n_pruned)
    return runs


# ---------------------------------------------------------------------------- results
def pareto_front(runs: list[dict], key: str = "R@1") -> list[dict]:
    """The runs not dominated in (``key`` recall, QPS), by increasing recall. A run needs
    ``recalls`` ({"1": ..}) and ``qps`` (or ``t_total`` and ``n_queries``)."""
    ordered = sorted(runs, key=lambda r: (-_qps(r), -_recall(r, key)))
    front, best = [], -1.0
    for run in ordered:                  # fastest first: keep each run that is more accurate
        if _recall(run, key) > best:
            front.append(run)
            best = _recall(run, key)
    return front


def plot_pareto(runs_by_label: dict[str, list[dict]], path_png, *, key: str = "R@1",
                title: str | None = None) -> None:
    """One Pareto curve (``key`` recall vs QPS, log-scale QPS) per label, written to a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'qinco2[plot]'") from None
    many = len(runs_by_label) > 4
    fig = Figure(figsize=(9, 4.5) if many else (6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, runs) in enumerate(runs_by_label.items()):
        front = pareto_front(runs, key)
        # ten colours, then the same colours dashed, then dotted: every curve stays distinct
        ax.plot([_qps(r) for r in front], [_recall(r, key) for r in front], marker="o", markersize=4,
                linestyle=("-", "--", ":")[i // 10 % 3], color=f"C{i % 10}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("queries per second")
    ax.set_ylabel(key)
    ax.grid(True, which="both", alpha=0.3)
    if many:                                    # beside the axes, so that no curve is hidden
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        ax.legend()
    if title:
        ax.set_title(title)
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
