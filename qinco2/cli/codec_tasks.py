"""The codec tasks of the command line: ``train``, ``eval``, ``eval_valset``, ``encode``,
``convert``, ``demo`` and ``search`` without ``index=`` (exhaustive search over the decoded database).

    qinco2 task=train model_args=qinco2-S db=sift-photos M=8 output=runs/s8.pt
    qinco2 task=eval model=runs/s8.pt db=sift-photos A=16 B=32
    qinco2 task=encode model=runs/s8.pt db=sift-photos output=runs/s8_db.npy
    qinco2 task=convert model=qinco2_L-bigann1M-8x8.pt output=models/qinco2_L-bigann1M-8x8.pt

``eval`` and ``search`` rank the decoded database by the data set's metric (``l2``, or ``ip``
for inner-product sets such as ``wordnet-minilm``), or by ``metric=l2|ip``.

Each task calls :mod:`qinco2.codec` and prints; the library is imported inside the tasks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .common import (
    arch_overrides,
    data_limits,
    launched_rank,
    launched_workers,
    load_codec,
    open_dataset,
    print_table,
    require,
)
from .config import DEMO_OUTPUT, TRAIN_KEYS, CliArgs

log = logging.getLogger(__name__)


def task_train(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.codec import QincoCodec
    from ..formats import read_vectors

    output = require(args, "output", "path of the model file to write, e.g. model.pt")
    arch = arch_overrides(args, given)
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
    codec = QincoCodec.from_preset(preset, device=device, small_data=args.small_data, **arch, **training)
    ds = open_dataset(args)
    x_train, x_val = ds.train_val(data_limits(args))
    ivf = read_vectors(args.ivf_centroids, dtype=np.float32) if args.ivf_centroids else None
    log.info("training %s on %s: %d training and %d validation vectors of D=%d, device %s",
             preset, ds.name, len(x_train), len(x_val), x_train.shape[1], device)
    codec.train(x_train, x_val, mse_scale=ds.mse_scale, output=output, resume=args.resume,
                init_model=args.model, ivf_centroids=ivf, progress=args.progress,
                workers=launched_workers(args))
    state, cfg = codec.train_state_, codec.model_.cfg
    result = {"task": "train", "output": output, "dataset": ds.name, "D": cfg.D, "M": cfg.M,
              "K": cfg.K, "epochs_run": state.epoch, "best_epoch": state.best_epoch,
              "init_val_mse": state.init_mse, "val_mse": state.best_mse,
              "train_s": round(state.elapsed_s, 1)}
    if launched_rank() == 0:
        print_table([[k, v] for k, v in result.items() if k != "task"])
    return result


def search_metric(args: CliArgs, ds) -> str:
    """The metric exhaustive search ranks decoded vectors by: ``metric=``, else the data set's."""
    from ..metrics import METRICS

    metric = args.metric or ds.metric
    if metric not in METRICS:
        raise ConfigError(
            f"metric={metric}: task={args.task} ranks the decoded database by one of "
            f"{', '.join(METRICS)} (l2 distance or inner product); use metric=null for the data "
            f"set's own ({ds.metric} for {ds.name}). The names sqeuclidean, inner_product and "
            "cosine are those of task=ivfpq_build")
    return metric


def task_eval(args: CliArgs, given: set[str], device: str) -> dict:
    """MSE, code usage, prefix MSEs and, when the data set has queries and ground truth,
    R@k of exhaustive search by the data set's metric (or ``metric=``), from one encoding."""
    from ..codec.evaluate import evaluate_codec

    codec = load_codec(args, given, device)
    ds = open_dataset(args)
    search = ds.queries is not None and ds.groundtruth is not None
    metric = search_metric(args, ds)
    queries, gt = (ds.query_vectors(), ds.ground_truth()) if search else (None, None)
    r = evaluate_codec(codec, ds.database(data_limits(args)), ds.mse_scale, queries, gt,
                       metric=metric, progress=args.progress, precision=args.precision)
    print_table([[m + 1, u, h, p] for m, (u, h, p) in
                 enumerate(zip(r["code_usage"], r["entropy_bits"], r["prefix_mse"]))],
                ["step", "used/K", "entropy (bits)", "MSE of prefix"])
    print(f"database MSE ({r['n']} vectors, dataset {ds.name}): {r['mse']:.6g}")
    if search:
        ks = [k for k in r if k.startswith("R@")]
        print_table([[r["metric"], r["n_queries"], *(r[k] for k in ks)]],
                    ["metric", "queries", *ks])
    else:
        log.info("%s has no queries or ground truth: R@k not computed", ds.name)
    return {"task": "eval", "model": args.model, "dataset": ds.name, **r}


def task_eval_valset(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.evaluate import evaluate_mse

    codec = load_codec(args, given, device)
    ds = open_dataset(args)
    _, x_val = ds.train_val(data_limits(args))
    r = evaluate_mse(codec, x_val, ds.mse_scale, progress=args.progress, precision=args.precision)
    print(f"validation MSE ({r['n']} vectors, dataset {ds.name}): {r['mse']:.6g}")
    return {"task": "eval_valset", "model": args.model, "dataset": ds.name, **r}


def task_search_exhaustive(args: CliArgs, given: set[str], device: str) -> dict:
    """``task=search`` without ``index=``: the queries against the whole decoded database."""
    from ..codec.evaluate import evaluate_search

    codec = load_codec(args, given, device)
    ds = open_dataset(args)
    r = evaluate_search(codec, ds.database(data_limits(args)), ds.query_vectors(),
                        ds.ground_truth(), metric=search_metric(args, ds), progress=args.progress,
                        precision=args.precision)
    print_table([[k, v] for k, v in r.items()])
    return {"task": "search", "model": args.model, "dataset": ds.name, **r}


def task_encode(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.codes_io import encode_to_file

    output = require(args, "output", "path of the codes file to write (.npy; its .npy.json sidecar goes beside it)")
    codec = load_codec(args, given, device)
    ds = open_dataset(args)
    limits = data_limits(args)
    parts = ds.train_val(limits) if args.encode_trainset else (ds.database(limits),)
    r = encode_to_file(codec, parts, output, progress=args.progress, shard_rows=args.shard_rows,
                      workers=launched_workers(args), precision=args.precision)
    what = "training set (training then validation rows)" if args.encode_trainset else "database"
    if launched_rank() == 0:
        print(f"wrote codes {tuple(r['shape'])} of the {what} of {ds.name} to {output}")
    return {"task": "encode", "output": output, "dataset": ds.name, "split": what,
            "shape": r["shape"], "model_sha": r["model_sha"]}


def task_convert(args: CliArgs, given: set[str], device: str) -> dict:
    """``task=convert``: a model file of the reference QINCo release into a qinco2 model file."""
    from ..codec.codec import QincoCodec

    source = require(args, "model", "path of a model file of the reference QINCo release")
    output = require(args, "output", "path of the qinco2 model file to write, e.g. models/converted.pt")
    codec = QincoCodec.from_reference(source)
    codec.save(output)
    cfg = codec.model_.cfg
    result = {"task": "convert", "model": source, "output": output, "D": cfg.D, "M": cfg.M, "K": cfg.K,
              "L": cfg.L, "de": cfg.E, "dh": cfg.dh, "A": cfg.A, "B": cfg.B, "ivf_K": cfg.ivf_K,
              "codeword_skip": cfg.codeword_skip, "double_skip": cfg.double_skip}
    print_table([[k, v] for k, v in result.items() if k != "task"])
    print(f"wrote {output}; use it as model={output} (task=eval, encode, search)")
    return result


def demo_verdict(r: dict) -> str:
    """One line on what the demo's numbers mean, from the numbers themselves."""
    q, rq = r["qinco2"], r["rq"]
    nbytes = r["M"] * (int(r["K"]).bit_length() - 1) / 8
    mse_words = f"{q['mse'] / rq['mse']:.2f}x the squared error of faiss RQ"
    gain = 100 * (q["R@1"] - rq["R@1"])
    r1_words = f"finds the true nearest neighbour first {abs(gain):.1f} points {'more' if gain >= 0 else 'less'} often"
    return (f"At {nbytes:g} byte{'' if nbytes == 1 else 's'} per vector, QINCo2 rebuilds the vectors with "
            f"{mse_words} (lower is better) and {r1_words} (R@1) when searching the decoded vectors.")


def task_demo(args: CliArgs, given: set[str], device: str) -> dict:
    from ..codec.evaluate import run_demo

    output = args.output or DEMO_OUTPUT
    start = time.perf_counter()
    r = run_demo(output, device=device, progress=args.progress)
    q, rq = r["qinco2"], r["rq"]
    print(f"synthetic set: D={r['D']}, {r['n_train']} training / {r['n_val']} validation / "
          f"{r['n_db']} database vectors, {r['n_queries']} queries; {r['M']} x {r['K']} codes")
    print_table([["QINCo2", q["mse"], q["R@1"], q["R@10"], q["R@100"]],
                 [f"faiss RQ (beam {rq['beam']})", rq["mse"], rq["R@1"], rq["R@10"], rq["R@100"]]],
                ["codec", "MSE", "R@1", "R@10", "R@100"])
    print(f"QINCo2 trained {r['epochs_run']} epochs in {r['train_s']} s on {r['device']}; "
          f"model written to {output}; total {time.perf_counter() - start:.0f} s")
    print(demo_verdict(r))
    return {"task": "demo", **r}
