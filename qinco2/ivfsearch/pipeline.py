"""The large-scale search stages behind the CLI tasks (spec sections 8.5-8.8), one function
per task: :func:`train_pairwise_decoder`, :func:`build_index_file`, :func:`search_index`.

Each takes arrays and file paths, checks that the files belong together (same model, same
IVF centroids, same rows) before any long computation, and returns a result dict. Codes
files are the packed ``.npy`` codes (with their ``.npy.json`` sidecar) of
:mod:`qinco2.codec.codes_io`, memory-mapped; the training codes hold the training rows, then
the validation rows (``task=encode encode_trainset=true``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..codec.codes_io import SIZE_KEYS, load_encoded
from ..errors import ConfigError, DatasetError, InputError
from ..formats import read_vectors
from ..ivf import check_centroids
from ..metrics import mse
from ..rows import RowStack
from .index import IVFQincoIndex
from .multistage import load_runs, pareto_front, plot_pareto
from .pairwise import PairwiseDecoder
from .shortlist import build_index, factory_string, save_index

log = logging.getLogger(__name__)

ENCODE_TRAIN_HINT = ("encode the training split with `qinco2 task=encode encode_trainset=true "
                     "model=<model.pt> trainset=<vectors> output={path}` and the same "
                     "ds.trainset and ds.valset")

# Query-time settings tried by search_index when the caller gives none (pruned by the sweep).
DEFAULT_GRID = {"nprobe": [1, 4, 16, 64], "quantizer_efSearch": [16, 64, 256],
                "nshort": [10, 100, 1000], "nmid_short": [0, 4, 8]}


# ---------------------------------------------------------------------------- checks
def load_ivf_centroids(path, codes: dict, codes_path) -> np.ndarray:
    """The centroids in ``path``, checked against the codes file's ``D`` and ``ivf_K``."""
    centroids = check_centroids(read_vectors(path, dtype=np.float32), codes["D"])
    if len(centroids) != codes["ivf_K"]:
        raise InputError(f"{path} holds {len(centroids)} IVF centroids but the codes in {codes_path} come "
                         f"from a model with ivf_K={codes['ivf_K']}; pass the ivf_centroids the model "
                         "was trained with")
    return centroids


def training_rows(x_train, x_val, codes: dict, codes_path, n: int | None = None) -> np.ndarray:
    """The first ``n`` (default all) raw rows of the training split, in the order of the codes
    file (training rows, then validation rows), after checking both have the same rows: an
    array, or a :class:`~qinco2.rows.RowStack` of both parts (read by row slices)."""
    n_raw, n_codes = len(x_train) + len(x_val), len(codes["codes"])
    if n_raw != n_codes:
        raise DatasetError(f"{codes_path} holds {n_codes} encoded rows but the training split has "
                           f"{n_raw} ({len(x_train)} training + {len(x_val)} validation rows with these "
                           f"ds.trainset and ds.valset); {ENCODE_TRAIN_HINT.format(path=codes_path)}")
    if x_train.shape[1] != codes["D"]:
        raise InputError(f"the training vectors have dimension {x_train.shape[1]} but the codes in "
                         f"{codes_path} come from a model with D={codes['D']}")
    n = n_raw if n is None else min(n, n_raw)
    if n <= len(x_train):
        return x_train[:n]
    return RowStack([x_train, x_val[:n - len(x_train)]])      # read by row slices, never copied whole


def check_same_model(a: dict, a_path, b: dict, b_path) -> None:
    """Both codes files come from one model (same digest and code sizes)."""
    def describe(c: dict) -> str:
        return f"model {c['model_sha']}, " + ", ".join(f"{k}={c[k]}" for k in SIZE_KEYS)

    if a["model_sha"] != b["model_sha"] or any(a[k] != b[k] for k in SIZE_KEYS):
        raise InputError(f"{a_path} ({describe(a)}) and {b_path} ({describe(b)}) were encoded by "
                         "different models; encode the training set and the database with the same model")


def centroids_only_mse(codes, x_ND, centroids_CD, chunk_rows: int = 65_536) -> float:
    """MSE of decoding every row as its IVF centroid (codes column 0), ``chunk_rows`` rows at a time."""
    total = 0.0
    for lo in range(0, len(codes), chunk_rows):
        x_nD = np.asarray(x_ND[lo:lo + chunk_rows], dtype=np.float32)
        total += mse(x_nD, centroids_CD[np.asarray(codes[lo:lo + chunk_rows, 0])]) * len(x_nD)
    return total / max(len(codes), 1)


# ---------------------------------------------------------------------------- tasks
def train_pairwise_decoder(ivf_centroids, encoded_trainset, x_train, x_val, output, *,
                           n_pairs_per_step: float = 2, mse_scale: float = 1.0, seed: int = 0,
                           progress: bool = True) -> dict:
    """Train a :class:`~qinco2.ivfsearch.pairwise.PairwiseDecoder` on the training codes and raw rows,
    save it to ``output``; returns its MSE and that of plain additive decoding of the same
    codes (both on the training rows held out of fitting, times ``mse_scale``), and the MSE of
    the IVF centroids alone on those rows. The training's scratch file goes beside ``output``."""
    enc = load_encoded(encoded_trainset, require_ivf=True)
    centroids = load_ivf_centroids(ivf_centroids, enc, encoded_trainset)
    x_ND, codes = training_rows(x_train, x_val, enc, encoded_trainset), enc["codes"]
    dec = PairwiseDecoder(n_pairs_per_step=n_pairs_per_step, K=enc["K"], seed=seed)
    scratch = Path(output).resolve().parent
    scratch.mkdir(parents=True, exist_ok=True)
    dec.train(codes, x_ND, centroids, progress=progress, scratch_dir=scratch)
    dec.save(output)
    n_hold = dec.n_holdout(len(codes))
    centroid_mse = centroids_only_mse(codes[:n_hold], x_ND[:n_hold], centroids)
    return {"output": str(output), "n_train": len(codes), "n_holdout": n_hold, "M": enc["M"], "K": enc["K"],
            "ivf_K": enc["ivf_K"], "n_tables": len(dec.pairs_), "model_sha": enc["model_sha"],
            "mse_scale": mse_scale, "mse": dec.decode_mse(codes[:n_hold], x_ND[:n_hold]) * mse_scale,
            "additive_mse": dec.additive_baseline_mse(codes, x_ND) * mse_scale,
            "centroids_mse": centroid_mse * mse_scale}


def build_index_file(ivf_centroids, encoded_trainset, encoded_db, x_train, x_val, output, *,
                     db_rows: int | None = None, aq_training_samples: int = 1_000_000,
                     progress: bool = True) -> dict:
    """Build the faiss IVF-AQ index (:func:`qinco2.ivfsearch.shortlist.build_index`) of the first ``db_rows``
    (default all) database codes and save it with the codes' model digest."""
    train = load_encoded(encoded_trainset, require_ivf=True)
    db = load_encoded(encoded_db, require_ivf=True)
    check_same_model(train, encoded_trainset, db, encoded_db)
    centroids = load_ivf_centroids(ivf_centroids, train, encoded_trainset)
    x_raw = training_rows(x_train, x_val, train, encoded_trainset, aq_training_samples)
    db_codes = db["codes"][:db_rows]
    index = build_index(centroids, train["codes"][:len(x_raw)], x_raw, db_codes, K=train["K"],
                        aq_training_samples=aq_training_samples, progress=progress)
    save_index(index, output, model_sha=train["model_sha"])
    return {"output": str(output), "factory": factory_string(len(centroids), train["M"]),
            "n_db": int(index.ntotal), "n_aq_train": len(x_raw), "model_sha": train["model_sha"]}


def search_index(codec, index_path, encoded_db, queries, gt, *, grid: dict | None = None,
                 pairwise_decoder=None, output=None, resume: bool = False, threads: int | None = None,
                 db_rows: int | None = None, metric: str | None = None, progress: bool = True,
                 decode_precision: str = "fp32") -> dict:
    """Sweep the multi-stage search (:meth:`~qinco2.ivfsearch.index.IVFQincoIndex.sweep`) over ``grid``
    (names of :class:`~qinco2.ivfsearch.multistage.SearchParams` to value lists, missing names from
    :data:`DEFAULT_GRID`). ``index_path``: the faiss index of :func:`build_index_file` (with
    ``encoded_db``, the first ``db_rows`` codes it holds, and an optional ``pairwise_decoder``
    file), or the folder of a saved :class:`~qinco2.ivfsearch.index.IVFQincoIndex` (which holds
    its codes, ids, metric and decoder). ``metric``: when given, the index's metric must be it
    (the metric is chosen when an index is built). ``output``: JSON log, with its Pareto plot
    beside it (``.png``). ``decode_precision``: the arithmetic of the re-rank's QINCo2 decoding."""
    if output is not None and Path(output).suffix.lower() == ".png":
        raise ConfigError(f"output={output}: the search log is JSON (its plot gets the .png name)")
    if Path(index_path).is_dir():
        index = IVFQincoIndex.load(index_path, codec)
    else:
        index = IVFQincoIndex.from_files(codec, index_path, encoded_db, pairwise_decoder=pairwise_decoder,
                                         db_rows=db_rows)
    if metric is not None and metric != index.metric:
        raise ConfigError(f"metric={metric}, but the index {index_path} ranks by {index.metric} (the metric is "
                          "chosen when the index is built); drop metric=, or build an index with "
                          f"IVFQincoIndex(codec, metric={metric!r}) and save it")
    grid = {**DEFAULT_GRID, **(grid or {})}
    n_before = len(load_runs(output)) if resume and output and Path(output).is_file() else 0
    runs = index.sweep(queries, gt, grid, log_path=output, resume=resume, threads=threads, progress=progress,
                       decode_precision=decode_precision)
    plot = Path(output).with_suffix(".png") if output is not None and runs else None
    if plot is not None:
        label = "QINCo2 + pairwise decoder" if index.pairwise_ else "QINCo2"
        plot_pareto({label: runs}, plot, title=f"{Path(index_path).name}: {len(queries)} queries")
    front = [{**r["parameters"], **{f"R@{k}": v for k, v in r["recalls"].items()}, "qps": r["qps"]}
             for r in pareto_front(runs)]
    return {"n_db": index.ntotal, "n_queries": len(queries), "n_runs": len(runs),
            "n_new_runs": len(runs) - n_before, "pareto": front, "metric": index.metric,
            "log": None if output is None else str(output), "plot": None if plot is None else str(plot)}
