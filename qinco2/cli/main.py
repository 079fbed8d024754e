"""The ``qinco2 task=... key=value ...`` command line.

Arguments are ``key=value`` pairs (dotted keys for the data limits, ``ds.valset=10_000``);
values are read as YAML scalars, so ``100_000``, ``8e-4``, ``true``/``false`` and ``null``
work; the search grid keys also take lists (``nprobe=[1,4,16]``). Each task parses, calls the
library (:mod:`qinco2.codec.codec`, :mod:`qinco2.codec.evaluate`, :mod:`qinco2.ivfsearch.pipeline`) and prints an
aligned table followed by one ``RESULT {json}`` line for scripts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError, QincoError

log = logging.getLogger("qinco2.cli.main")


@dataclass
class DataArgs:
    """``ds.*``: row limits of the data splits (see :class:`qinco2.datasets.DataLimits`)."""

    valset: int = 10_000
    trainset: Optional[int] = None
    db: Optional[int] = None
    loop: int = 10_000_000


@dataclass
class CliArgs:
    """Every key the command line accepts, with its default."""

    task: Optional[str] = None
    output: Optional[str] = None
    resume: bool = False
    model: Optional[str] = None
    model_args: Optional[str] = None
    L: Optional[int] = None
    dh: Optional[int] = None
    M: Optional[int] = None
    K: Optional[int] = None
    A: Optional[int] = None
    B: Optional[int] = None
    de: Optional[int] = None
    db: Optional[str] = None
    trainset: Optional[str] = None
    queries: Optional[str] = None
    queries_gt: Optional[str] = None
    ivf_centroids: Optional[str] = None
    ivf_K: Optional[int] = None
    encoded_trainset: Optional[str] = None
    encoded_db: Optional[str] = None
    encode_trainset: bool = False
    shard_rows: int = 65_536
    index: Optional[str] = None
    pairwise_decoder: Optional[str] = None
    n_pairs_per_step: float = 2
    nprobe: Any = None
    quantizer_efSearch: Any = None
    nshort: Any = None
    nmid_short: Any = None
    # IVF-PQ keys: null = the default of qinco2.ivfpq.IndexParams / SearchParams (cuVS's)
    n_lists: Optional[int] = None
    metric: Optional[str] = None
    kmeans_n_iters: Optional[int] = None
    kmeans_trainset_fraction: Optional[float] = None
    pq_bits: Optional[int] = None
    pq_dim: Optional[int] = None
    codebook_kind: Optional[str] = None
    force_random_rotation: Optional[bool] = None
    conservative_memory_allocation: Optional[bool] = None
    add_data_on_build: Optional[bool] = None
    max_train_points_per_pq_code: Optional[int] = None
    n_probes: Any = None
    lut_dtype: Optional[str] = None
    internal_distance_dtype: Optional[str] = None
    preferred_smem_carveout: Optional[float] = None
    k: int = 10
    refine: Optional[str] = None
    refine_ratio: float = 1.0
    ds: DataArgs = field(default_factory=DataArgs)
    lr: float = 0.0008
    batch: int = 1024
    epochs: int = 60
    max_epochs: Optional[int] = None
    grad_accumulate: int = 1
    grad_clip: Optional[float] = 0.1
    verbose: bool = True
    tensorboard: Optional[str] = None
    cpu: bool = False
    seed: int = 0
    max_time_s: Optional[float] = None
    time_schedule: bool = False
    threads: Optional[int] = None
    data_root: Optional[str] = None


ARCH_KEYS = ("L", "dh", "M", "K", "A", "B", "de")
TRAIN_KEYS = ("lr", "batch", "epochs", "max_epochs", "grad_accumulate", "grad_clip", "seed",
              "max_time_s", "time_schedule", "tensorboard")
GRID_KEYS = ("nprobe", "quantizer_efSearch", "nshort", "nmid_short")  # one value or a list


def _leaf_keys(cls=CliArgs, prefix: str = "") -> list[str]:
    """Dotted names of every leaf key: ``task``, ..., ``ds.valset``, ..."""
    keys = []
    for name, kind in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(kind):
            keys += _leaf_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_args(argv: list[str]) -> tuple[CliArgs, set[str]]:
    """The parsed arguments and the set of keys given explicitly on the command line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    valid = _leaf_keys()
    given = set()
    for arg in argv:
        key, eq, _ = arg.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"cannot read argument {arg!r}: expected key=value, e.g. task=train")
        if key not in valid:
            raise ConfigError(f"unknown argument {key!r}{_did_you_mean(key, valid)} "
                              f"(valid keys: {', '.join(valid)})")
        given.add(key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CliArgs), OmegaConf.from_dotlist(argv))
        return OmegaConf.to_object(merged), given
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or "an argument"
        raise ConfigError(f"bad value for {where}: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- helpers

def _setup(args: CliArgs) -> str:
    """Logging, threads and device: the CLI's global state. Returns the device name."""
    import torch

    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when a handler existed (main called twice)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"threads={args.threads}: expected a positive number of threads")
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    from ..distributed import Workers

    _, launched_device = Workers.from_environment(cpu=args.cpu)     # a launched job: this rank's device
    if launched_device is not None:
        return str(launched_device)
    return "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"


def _workers(args: CliArgs):
    from ..distributed import Workers

    return Workers.from_environment(cpu=args.cpu)[0]


def _require(args: CliArgs, key: str, what: str) -> str:
    value = getattr(args, key)
    if value is None:
        raise ConfigError(f"task={args.task} needs {key}=<{what}>")
    return value


def _dataset(args: CliArgs):
    from ..datasets import resolve_dataset

    return resolve_dataset(args.db, trainset=args.trainset, queries=args.queries,
                           queries_gt=args.queries_gt, data_root=args.data_root)


def _limits(args: CliArgs):
    from ..datasets import DataLimits

    return DataLimits(args.ds.valset, args.ds.trainset, args.ds.db, args.ds.loop)


def _arch_overrides(args: CliArgs, given: set[str]) -> dict:
    """Architecture keys given on the command line; ``de``/``A``/``B`` = 0 or null disable
    the projection, the pre-selection and the beam (de = D, A = 0, B = 1)."""
    out = {k: getattr(args, k) for k in ARCH_KEYS if k in given}
    if "de" in out and not out["de"]:
        out["de"] = None
    if "A" in out and not out["A"]:
        out["A"] = 0
    if "B" in out and not out["B"]:
        out["B"] = 1
    return out


def _load_codec(args: CliArgs, given: set[str], device: str):
    from ..codec.codec import QincoCodec

    path = _require(args, "model", "path of a trained model file")
    arch = _arch_overrides(args, given)
    beam = {k: v for k, v in arch.items() if k in ("A", "B")}
    ignored = sorted(set(arch) - set(beam))
    if ignored:
        log.warning("the architecture is read from %s; ignoring %s", path, ", ".join(ignored))
    return QincoCodec.load(path, device=device, **beam)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_table(rows: list[list], header: list[str] | None = None, file=None) -> None:
    """Print rows as left-aligned columns."""
    lines = ([header] if header else []) + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    for n, line in enumerate(lines):
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip(), file=file)
        if header and n == 0:
            print("  ".join("-" * w for w in widths), file=file)


def _print_result(result: dict) -> None:
    print("RESULT " + json.dumps(result, default=str), flush=True)


# ----------------------------------------------------------------------------- tasks

def task_train(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.codec import QincoCodec
    from ..formats import read_vectors

    output = _require(args, "output", "path of the model file to write, e.g. model.pt")
    arch = _arch_overrides(args, given)
    from_file = args.model or (output if args.resume and Path(output).is_file() else None)
    if from_file and (arch or args.model_args):
        log.warning("the architecture is read from %s; ignoring model_args and %s",
                    from_file, ", ".join(sorted(arch)) or "no other key")
    training = {k: getattr(args, k) for k in TRAIN_KEYS if k in given}
    if "ds.loop" in given:
        training["loop"] = args.ds.loop
    preset = args.model_args or "qinco2-S"
    if not args.model_args and not from_file:
        log.info("no model_args given: using the qinco2-S preset")
    codec = QincoCodec.from_preset(preset, device=device, **arch, **training)
    ds = _dataset(args)
    x_train, x_val = ds.train_val(_limits(args))
    ivf = read_vectors(args.ivf_centroids, dtype=np.float32) if args.ivf_centroids else None
    log.info("training %s on %s: %d training and %d validation vectors of D=%d, device %s",
             preset, ds.name, len(x_train), len(x_val), x_train.shape[1], device)
    codec.train(x_train, x_val, mse_scale=ds.mse_scale, output=output, resume=args.resume,
                init_model=args.model, ivf_centroids=ivf, progress=args.verbose, workers=_workers(args))
    state, cfg = codec.train_state_, codec.model_.cfg
    result = {"task": "train", "output": output, "dataset": ds.name, "D": cfg.D, "M": cfg.M,
              "K": cfg.K, "epochs_run": state.epoch, "best_epoch": state.best_epoch,
              "init_val_mse": state.init_mse, "val_mse": state.best_mse,
              "train_s": round(state.elapsed_s, 1)}
    if _workers_rank() == 0:
        print_table([[k, v] for k, v in result.items() if k != "task"])
    return result


def task_eval(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.evaluate import evaluate_mse

    codec = _load_codec(args, given, device)
    ds = _dataset(args)
    r = evaluate_mse(codec, ds.database(_limits(args)), ds.mse_scale, prefixes=True,
                     progress=args.verbose)
    print_table([[m + 1, u, h, p] for m, (u, h, p) in
                 enumerate(zip(r["code_usage"], r["entropy_bits"], r["prefix_mse"]))],
                ["step", "used/K", "entropy (bits)", "MSE of prefix"])
    print(f"database MSE ({r['n']} vectors, dataset {ds.name}): {r['mse']:.6g}")
    return {"task": "eval", "model": args.model, "dataset": ds.name, **r}


def task_eval_valset(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.evaluate import evaluate_mse

    codec = _load_codec(args, given, device)
    ds = _dataset(args)
    _, x_val = ds.train_val(_limits(args))
    r = evaluate_mse(codec, x_val, ds.mse_scale, progress=args.verbose)
    print(f"validation MSE ({r['n']} vectors, dataset {ds.name}): {r['mse']:.6g}")
    return {"task": "eval_valset", "model": args.model, "dataset": ds.name, **r}


def task_search(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.evaluate import evaluate_search

    if args.index is not None:
        return _search_index(args, given, device)
    codec = _load_codec(args, given, device)
    ds = _dataset(args)
    r = evaluate_search(codec, ds.database(_limits(args)), ds.query_vectors(), ds.ground_truth(),
                        progress=args.verbose)
    print_table([[k, v] for k, v in r.items()])
    return {"task": "search", "model": args.model, "dataset": ds.name, **r}


def _search_index(args: CliArgs, given: set[str], device: str) -> dict:
    from ..ivfsearch.pipeline import search_index

    if args.encoded_db is None:
        raise ConfigError("task=search with index= needs encoded_db=<codes of the database>: "
                          "produce it with `qinco2 task=encode model=<model.pt> db=<vectors> "
                          "output=db_codes.npz`")
    if args.resume and args.output is None:
        raise ConfigError("resume=true continues a search log: add output=<log.json>")
    codec = _load_codec(args, given, device)
    ds = _dataset(args)
    grid = {k: v if isinstance(v, list) else [v] for k in GRID_KEYS
            if (v := getattr(args, k)) is not None}
    r = search_index(codec, args.index, args.encoded_db, ds.query_vectors(), ds.ground_truth(),
                     grid=grid, pairwise_decoder=args.pairwise_decoder, output=args.output,
                     resume=args.resume, threads=args.threads, db_rows=args.ds.db,
                     progress=args.verbose)
    columns = [*GRID_KEYS, "R@1", "R@10", "R@100", "qps"]
    print_table([[p[c] for c in columns] for p in r["pareto"]], columns)
    print(f"{r['n_runs']} settings in the log ({r['n_new_runs']} new); Pareto front above"
          + (f"; log {r['log']}, plot {r['plot']}" if r["log"] else ""))
    return {"task": "search", "model": args.model, "index": args.index, "dataset": ds.name, **r}


def task_ivf_centroids(args: CliArgs, given: set[str], device: str) -> dict:
    from ..formats import write_vectors
    from ..ivf import assign_to_centroids, train_ivf_centroids
    from ..metrics import mse

    output = _require(args, "output", "path of the centroid file to write, e.g. centroids.npy")
    K = _require(args, "ivf_K", "number of IVF centroids, e.g. 65536")
    if Path(output).suffix.lower() not in (".npy", ".fvecs", ".fbin"):  # fail before k-means
        raise ConfigError(f"output={output}: centroids are float32; write them to a .npy "
                          "(or .fvecs, .fbin) file")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    ds = _dataset(args)
    x_train, _ = ds.train_val(_limits(args))
    start = time.perf_counter()
    centroids = train_ivf_centroids(x_train, K, seed=args.seed, progress=args.verbose,
                                    device=device)
    train_s = time.perf_counter() - start
    write_vectors(output, centroids)
    x_eval = x_train[::max(1, -(-len(x_train) // 100_000))]  # MSE on at most 100k training rows
    err = mse(x_eval, centroids[assign_to_centroids(x_eval, centroids)], ds.mse_scale)
    result = {"task": "ivf_centroids", "output": output, "dataset": ds.name, "ivf_K": K,
              "D": int(x_train.shape[1]), "n_train": len(x_train), "train_s": round(train_s, 1),
              "mse": err, "mse_rows": len(x_eval)}
    print_table([[k, v] for k, v in result.items() if k != "task"])
    return result


def task_encode(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.codes_io import encode_to_npz

    output = _require(args, "output", "path of the .npz file to write")
    codec = _load_codec(args, given, device)
    ds = _dataset(args)
    limits = _limits(args)
    parts = ds.train_val(limits) if args.encode_trainset else (ds.database(limits),)
    r = encode_to_npz(codec, parts, output, progress=args.verbose, shard_rows=args.shard_rows,
                      workers=_workers(args))
    what = "training set (training then validation rows)" if args.encode_trainset else "database"
    if _workers_rank() == 0:
        print(f"wrote codes {tuple(r['shape'])} of the {what} of {ds.name} to {output}")
    return {"task": "encode", "output": output, "dataset": ds.name, "split": what,
            "shape": r["shape"], "model_sha": r["model_sha"]}


def task_train_pairwise_decoder(args: CliArgs, given: set[str], device: str) -> dict:
    from ..ivfsearch.pipeline import train_pairwise_decoder

    output = _require(args, "output", "path of the decoder file to write, e.g. pairwise.pt")
    centroids = _require(args, "ivf_centroids", "the IVF centroids the model was trained with")
    encoded = _require(args, "encoded_trainset", "codes of the training split, from "
                       "`qinco2 task=encode encode_trainset=true ...`")
    ds = _dataset(args)
    x_train, x_val = ds.train_val(_limits(args))
    r = train_pairwise_decoder(centroids, encoded, x_train, x_val, output,
                               n_pairs_per_step=args.n_pairs_per_step, mse_scale=ds.mse_scale,
                               seed=args.seed, progress=args.verbose)
    print_table([["pairwise additive", r["mse"]], ["plain additive (AQ)", r["additive_mse"]]],
                [f"decoder ({r['n_train']} training codes)", f"MSE (mse_scale={ds.mse_scale:g})"])
    print(f"wrote the pairwise decoder ({r['n_tables']} tables) to {output}")
    return {"task": "train_pairwise_decoder", "dataset": ds.name, **r}


def task_build_index(args: CliArgs, given: set[str], device: str) -> dict:
    from ..ivfsearch.pipeline import build_index_file

    output = _require(args, "output", "path of the index file to write, e.g. index.faissindex")
    centroids = _require(args, "ivf_centroids", "the IVF centroids the model was trained with")
    train = _require(args, "encoded_trainset", "codes of the training split, from "
                     "`qinco2 task=encode encode_trainset=true ...`")
    db = _require(args, "encoded_db", "codes of the database, from `qinco2 task=encode ...`")
    ds = _dataset(args)
    x_train, x_val = ds.train_val(_limits(args))
    r = build_index_file(centroids, train, db, x_train, x_val, output, db_rows=args.ds.db,
                         progress=args.verbose)
    print(f"wrote {r['factory']} with {r['n_db']} vectors to {output}")
    return {"task": "build_index", "dataset": ds.name, **r}


def task_demo(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.evaluate import run_demo

    output = args.output or "qinco2-demo.pt"
    start = time.perf_counter()
    r = run_demo(output, device=device, progress=args.verbose)
    q, rq = r["qinco2"], r["rq"]
    print(f"synthetic set: D={r['D']}, {r['n_train']} training / {r['n_val']} validation / "
          f"{r['n_db']} database vectors, {r['n_queries']} queries; {r['M']} x {r['K']} codes")
    print_table([["QINCo2", q["mse"], q["R@1"], q["R@10"], q["R@100"]],
                 [f"faiss RQ (beam {rq['beam']})", rq["mse"], rq["R@1"], rq["R@10"], rq["R@100"]]],
                ["codec", "MSE", "R@1", "R@10", "R@100"])
    print(f"QINCo2 trained {r['epochs_run']} epochs in {r['train_s']} s on {r['device']}; "
          f"model written to {output}; total {time.perf_counter() - start:.0f} s")
    return {"task": "demo", **r}


from .ivfpq_tasks import task_ivfpq_build, task_ivfpq_search  # noqa: E402  (uses the helpers above)

TASKS = {"train": task_train, "eval": task_eval, "eval_valset": task_eval_valset,
         "search": task_search, "ivf_centroids": task_ivf_centroids, "encode": task_encode,
         "train_pairwise_decoder": task_train_pairwise_decoder, "build_index": task_build_index,
         "ivfpq_build": task_ivfpq_build, "ivfpq_search": task_ivfpq_search, "demo": task_demo}


def usage() -> str:
    defaults = CliArgs()
    keys = ", ".join(f"{k}={_fmt(_get(defaults, k))}" for k in _leaf_keys() if k != "task")
    return (f"usage: qinco2 task=<task> [key=value ...]\n  tasks: {', '.join(TASKS)}\n"
            f"  keys and defaults: {keys}")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, bool):
        return str(obj).lower()
    return "null" if obj is None else obj


def run(argv: list[str]) -> dict:
    """Parse ``argv``, run the task and return its result dict (errors are raised)."""
    args, given = parse_args(argv)
    if args.task is None:
        raise ConfigError(f"no task given: add task=<one of {', '.join(TASKS)}>")
    if args.task not in TASKS:
        raise ConfigError(f"unknown task {args.task!r}{_did_you_mean(args.task, TASKS)} "
                          f"(tasks: {', '.join(TASKS)})")
    device = _setup(args)
    return TASKS[args.task](args, given, device)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``qinco2`` and ``python -m qinco2``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    from ..distributed import shutdown

    try:
        result = run(argv)
    except QincoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    shutdown()
    if _workers_rank() == 0:                  # one report per launched job
        _print_result(result)
    return 0


def _workers_rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
