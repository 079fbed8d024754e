r"""The IVF-QINCo2 search tasks of the command line: ``ivf_centroids``,
``train_pairwise_decoder``, ``build_index`` and ``search`` with ``index=``.

    qinco2 task=ivf_centroids ivf_K=4096 db=sift-photos output=runs/ivf4096.npy
    qinco2 task=build_index db=sift-photos ivf_centroids=runs/ivf4096.npy \
        encoded_trainset=runs/ivf_s8_train.npy encoded_db=runs/ivf_s8_db.npy output=runs/ivf.index
    qinco2 task=search db=sift-photos model=runs/ivf_s8.pt index=runs/ivf.index \
        encoded_db=runs/ivf_s8_db.npy nprobe=[4,16,64] nshort=[10,100,1000]

``index=`` may also be the folder of a saved :class:`~qinco2.ivfsearch.index.IVFQincoIndex`
(``index.save(path)``), which holds its codes, ids, metric and pairwise decoder.

Each task calls :mod:`qinco2.ivfsearch.pipeline` (or :mod:`qinco2.ivf`) and prints.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import ConfigError
from .common import data_limits, load_codec, open_dataset, print_table, require
from .config import GRID_KEYS, CliArgs

ENCODE_TRAINSET = "codes of the training split, from `qinco2 task=encode encode_trainset=true ...`"
CENTROIDS = "the IVF centroids the model was trained with"


def task_ivf_centroids(args: CliArgs, given: set[str], device: str) -> dict:
    from ..formats import write_vectors
    from ..ivf import assign_to_centroids, train_ivf_centroids
    from ..metrics import mse

    output = require(args, "output", "path of the centroid file to write, e.g. centroids.npy")
    K = require(args, "ivf_K", "number of IVF centroids, e.g. 65536")
    if Path(output).suffix.lower() not in (".npy", ".fvecs", ".fbin"):  # fail before k-means
        raise ConfigError(f"output={output}: centroids are float32; write them to a .npy "
                          "(or .fvecs, .fbin) file")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    ds = open_dataset(args)
    x_train, _ = ds.train_val(data_limits(args))
    start = time.perf_counter()
    if args.niter < 1:
        raise ConfigError(f"niter={args.niter}: k-means needs at least one iteration")
    centroids = train_ivf_centroids(x_train, K, niter=args.niter, seed=args.seed, progress=args.progress,
                                    device=device)
    train_s = time.perf_counter() - start
    write_vectors(output, centroids)
    x_eval = x_train[::max(1, -(-len(x_train) // 100_000))]  # MSE on at most 100k training rows
    err = mse(x_eval, centroids[assign_to_centroids(x_eval, centroids)], ds.mse_scale)
    result = {"task": "ivf_centroids", "output": output, "dataset": ds.name, "ivf_K": K, "niter": args.niter,
              "D": int(x_train.shape[1]), "n_train": len(x_train), "train_s": round(train_s, 1),
              "mse": err, "mse_rows": len(x_eval)}
    print_table([[k, v] for k, v in result.items() if k != "task"])
    return result


def task_train_pairwise_decoder(args: CliArgs, given: set[str], device: str) -> dict:
    from ..ivfsearch.pipeline import train_pairwise_decoder

    output = require(args, "output", "path of the decoder file to write, e.g. pairwise.pt")
    centroids = require(args, "ivf_centroids", CENTROIDS)
    encoded = require(args, "encoded_trainset", ENCODE_TRAINSET)
    ds = open_dataset(args)
    x_train, x_val = ds.train_val(data_limits(args))
    r = train_pairwise_decoder(centroids, encoded, x_train, x_val, output,
                               n_pairs_per_step=args.n_pairs_per_step, mse_scale=ds.mse_scale,
                               seed=args.seed, progress=args.progress)
    print_table([["pairwise additive", r["mse"]], ["plain additive (AQ)", r["additive_mse"]],
                 ["IVF centroids only", r["centroids_mse"]]],
                [f"decoder ({r['n_train']} training codes)",
                 f"MSE on {r['n_holdout']} held-out rows (mse_scale={ds.mse_scale:g})"])
    print(f"wrote the pairwise decoder ({r['n_tables']} tables) to {output}")
    return {"task": "train_pairwise_decoder", "dataset": ds.name, **r}


def task_build_index(args: CliArgs, given: set[str], device: str) -> dict:
    from ..ivfsearch.pipeline import build_index_file

    output = require(args, "output", "path of the index file to write, e.g. index.faissindex")
    centroids = require(args, "ivf_centroids", CENTROIDS)
    train = require(args, "encoded_trainset", ENCODE_TRAINSET)
    db = require(args, "encoded_db", "codes of the database, from `qinco2 task=encode ...`")
    ds = open_dataset(args)
    x_train, x_val = ds.train_val(data_limits(args))
    r = build_index_file(centroids, train, db, x_train, x_val, output, db_rows=args.ds.db,
                         progress=args.progress)
    print(f"wrote {r['factory']} with {r['n_db']} vectors to {output}")
    return {"task": "build_index", "dataset": ds.name, **r}


def task_search_index(args: CliArgs, given: set[str], device: str) -> dict:
    """``task=search`` with ``index=``: a sweep of the IVF-QINCo2 pipeline over the grid keys."""
    from ..ivfsearch.pipeline import search_index

    if args.encoded_db is None and not Path(args.index).is_dir():     # a saved IVFQincoIndex holds its codes
        raise ConfigError("task=search with index= needs encoded_db=<codes of the database>: "
                          "produce it with `qinco2 task=encode model=<model.pt> db=<vectors> "
                          "output=db_codes.npy`")
    if args.resume and args.output is None:
        raise ConfigError("resume=true continues a search log: add output=<log.json>")
    codec = load_codec(args, given, device)
    ds = open_dataset(args)
    grid = {k: v if isinstance(v, list) else [v] for k in GRID_KEYS
            if (v := getattr(args, k)) is not None}
    r = search_index(codec, args.index, args.encoded_db, ds.query_vectors(), ds.ground_truth(),
                     grid=grid, pairwise_decoder=args.pairwise_decoder, output=args.output,
                     resume=args.resume, threads=args.threads, db_rows=args.ds.db,
                     metric=args.metric if "metric" in given else None, progress=args.progress,
                     decode_precision=args.precision)
    columns = [*GRID_KEYS, "R@1", "R@10", "R@100", "qps"]
    print_table([[p[c] for c in columns] for p in r["pareto"]], columns)
    print(f"{r['n_runs']} settings in the log ({r['n_new_runs']} new); Pareto front above"
          + (f"; log {r['log']}, plot {r['plot']}" if r["log"] else ""))
    return {"task": "search", "model": args.model, "index": args.index, "dataset": ds.name, **r}
