"""IVF search benchmark: the multi-stage IVF-QINCo2 pipeline against faiss IVF indexes.

Stages (each cached under ``--work``, so a re-run continues where the last one stopped):
IVF centroids -> IVF-QINCo2 training -> encoding of a training slice and of the database ->
pairwise decoder -> IVF-AQ shortlist index -> parameter sweeps with and without the pairwise
decoder. Then faiss ``IVF{C},PQ{M}x8``, ``IVF{C},RQ{M}x8_Nqint8`` and ``IVF{C},PQ{2M}x4fsr``
are built with the same number of lists and searched over ``nprobe`` (no refinement), all
with the same threads. Every operating point becomes one JSON line of ``--out``; the Pareto
fronts are drawn together in ``--plot``.

    python benchmarks/bench_ivf_search.py --ivf-K 2048 --M 8 --qinco-minutes 35
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from bench_codecs import QINCO_SETTINGS, environment

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.codec.codes_io import encode_to_file, load_encoded, model_sha
from qinco2.ivf import train_ivf_centroids
from qinco2.ivfsearch.multistage import pareto_front, plot_pareto, sweep
from qinco2.ivfsearch.pairwise import PairwiseDecoder
from qinco2.ivfsearch.shortlist import build_index, factory_string, load_index, save_index
from qinco2.metrics import knn, mse, recall_at

log = logging.getLogger("bench_ivf_search")

OUR_GRID = {"nprobe": [1, 2, 4, 8, 16, 32, 64], "quantizer_efSearch": [16, 32, 64, 128],
            "nshort": [1, 2, 5, 10, 20, 50, 100, 200], "nmid_short": [2, 4, 8, 16]}
FAISS_FACTORIES = {"IVF{C},PQ{M}x8": "PQ8x8", "IVF{C},RQ{M}x8_Nqint8": "RQ8x8_Nqint8",
                   "IVF{C},PQ{M2}x4fsr": "PQ16x4fsr"}


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def stage_log(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_stage_log(path: Path, info: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, path)


def prepare(args, ds, xt_raw, xv_raw, xb, xq, gt) -> dict:
    """The cached pipeline files under ``args.work``; returns the stage timings and figures."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    info_path = work / "stages.json"
    info = stage_log(info_path)
    centroids_path = work / f"centroids{args.ivf_K}.npy"
    if not centroids_path.is_file():
        x = np.ascontiguousarray(xt_raw, dtype=np.float32)
        c, info["centroids_s"] = timed(train_ivf_centroids, x, args.ivf_K)
        np.save(centroids_path, c)
        save_stage_log(info_path, info)
    centroids = np.load(centroids_path)

    model_path = work / "model.pt"
    if "train_s" not in info:
        preset, overrides, _ = QINCO_SETTINGS["qinco2"]
        codec = QincoCodec.from_preset(preset, **{**overrides, "M": args.M, "max_time_s": args.qinco_minutes * 60})
        _, info["train_s"] = timed(codec.train, xt_raw, xv_raw, mse_scale=ds.mse_scale, output=model_path,
                                   resume=True, ivf_centroids=centroids, progress=False)
        st = codec.train_state_
        info.update(epochs_run=st.epoch, val_mse_init=st.init_mse, val_mse_best=st.best_mse,
                    preset=preset, overrides={**overrides, "M": args.M})
        save_stage_log(info_path, info)
    codec = QincoCodec.load(model_path)

    A, B = args.eval_AB
    for name, x in (("train", xt_raw[:args.n_encode_train]), ("db", xb)):
        path = work / f"codes_{name}.npy"
        if not path.is_file():
            _, info[f"encode_{name}_s"] = timed(encode_to_file, codec, x, path, A=A, B=B, batch=4096)
            info[f"encode_{name}_us"] = 1e6 * info[f"encode_{name}_s"] / len(x)
            save_stage_log(info_path, info)
    train_codes = load_encoded(work / "codes_train.npy", require_ivf=True)["codes"]
    db_codes = load_encoded(work / "codes_db.npy", require_ivf=True)["codes"]
    x_enc = np.asarray(xt_raw[:len(train_codes)], dtype=np.float32)

    if "exhaustive" not in info:         # the codec alone: exact search over the decoded database
        xr = codec.decode(db_codes)
        info["exhaustive"] = {"mse": mse(xb, xr, ds.mse_scale),
                              **{f"R@{k}": v for k, v in recall_at(knn(xq, xr, 100), gt).items()}}
        save_stage_log(info_path, info)

    pairwise_path = work / "pairwise.pt"
    if not pairwise_path.is_file():
        dec = PairwiseDecoder(n_pairs_per_step=args.n_pairs_per_step, K=codec.model_config.K)
        _, info["pairwise_train_s"] = timed(dec.train, train_codes, x_enc, centroids, progress=False)
        info["pairwise_mse_train"] = mse(x_enc, dec.decode(train_codes), ds.mse_scale)
        info["additive_mse_train"] = dec.additive_baseline_mse(train_codes, x_enc) * ds.mse_scale
        info["pairwise_mse_db"] = mse(xb, dec.decode(db_codes), ds.mse_scale)
        dec.save(pairwise_path)
        save_stage_log(info_path, info)

    index_path = work / "index.faissindex"
    if not index_path.is_file():
        index, info["index_build_s"] = timed(build_index, centroids, train_codes, x_enc, db_codes,
                                             K=codec.model_config.K, progress=False)
        save_index(index, index_path, model_sha=model_sha(codec))
        save_stage_log(info_path, info)
    info["factory"] = factory_string(args.ivf_K, args.M)
    return info


def run_ours(args, work: Path, xq, gt) -> dict[str, list[dict]]:
    codec = QincoCodec.load(work / "model.pt")
    db_codes = load_encoded(work / "codes_db.npy", require_ivf=True)["codes"]
    index = load_index(work / "index.faissindex", model_sha=model_sha(codec), n_db=len(db_codes))
    pairwise = PairwiseDecoder.load(work / "pairwise.pt")
    out = {}
    for label, pw in (("IVF-QINCo2", None), ("IVF-QINCo2 + pairwise", pairwise)):
        log_path = work / f"sweep_{'pairwise' if pw else 'plain'}.json"
        grid = dict(OUR_GRID, nprobe=[p for p in OUR_GRID["nprobe"] if p <= args.ivf_K])
        out[label] = sweep(index, codec, db_codes, xq, gt, grid, pairwise=pw, log_path=log_path,
                           resume=True, threads=args.threads, progress=True)
    return out


def run_faiss(factory: str, args, xt, xb, xq, gt) -> tuple[list[dict], dict]:
    d = xb.shape[1]
    key = factory.format(C=args.ivf_K, M=args.M, M2=2 * args.M)
    index = faiss.index_factory(d, key)
    _, t_train = timed(index.train, xt[:args.faiss_train])
    _, t_add = timed(index.add, xb)
    runs = []
    nprobes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if p <= args.ivf_K]
    index.search(xq[:8], 100)                                       # warm-up
    for nprobe in nprobes:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        reps, t_total = 0, 0.0
        while reps < 3 or t_total < 0.5:                          # fast settings: average repeats
            (_, ids), t = timed(index.search, xq, 100, params=params)
            reps, t_total = reps + 1, t_total + t
        recalls = {str(k): v for k, v in recall_at(ids, gt).items()}
        runs.append({"parameters": {"nprobe": nprobe}, "recalls": recalls, "n_queries": len(xq),
                     "t_total": t_total / reps, "qps": len(xq) * reps / t_total, "repeats": reps})
        log.info("%s nprobe=%d R@1=%.4f %.0f QPS", key, nprobe, recalls["1"], runs[-1]["qps"])
    code_bytes = index.code_size
    return runs, {"factory": key, "train_s": t_train, "add_s": t_add, "code_bytes": code_bytes,
                  "n_train": min(len(xt), args.faiss_train)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--ivf-K", type=int, default=2048)
    p.add_argument("--M", type=int, default=8, help="QINCo2 steps after the IVF step = bytes per vector")
    p.add_argument("--qinco-minutes", type=float, default=35.0)
    p.add_argument("--eval-AB", type=int, nargs=2, default=(16, 8), metavar=("A", "B"))
    p.add_argument("--n-encode-train", type=int, default=50_000,
                   help="training rows encoded to fit the AQ tables and the pairwise decoder")
    p.add_argument("--n-pairs-per-step", type=float, default=2)
    p.add_argument("--faiss-train", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages-only", action="store_true", help="build the pipeline files, search nothing")
    p.add_argument("--work", default="runs/ivf_bench")
    p.add_argument("--out", default="benchmarks/results/ivf_search.jsonl")
    p.add_argument("--plot", default="benchmarks/results/ivf_search.png")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ds = resolve_dataset(args.dataset)
    xt_raw, xv_raw = ds.train_val(DataLimits())
    xb = np.ascontiguousarray(ds.database(DataLimits()), dtype=np.float32)
    xq, gt = ds.query_vectors(), ds.ground_truth()
    env = environment(args.threads)
    info = prepare(args, ds, xt_raw, xv_raw, xb, xq, gt)
    print(json.dumps(info, indent=1))
    if args.stages_only:
        return
    work = Path(args.work)
    curves = run_ours(args, work, xq, gt)
    meta = {label: {"pipeline": info, "code_bytes": args.M, "shortlist_code_bytes": args.M + 1}
            for label in curves}
    xt = np.ascontiguousarray(xt_raw[:args.faiss_train], dtype=np.float32)
    for factory in FAISS_FACTORIES:
        runs, m = run_faiss(factory, args, xt, xb, xq, gt)
        curves[m["factory"]], meta[m["factory"]] = runs, m
    common = {"bench": "ivf_search", "dataset": args.dataset, "ivf_K": args.ivf_K, "M": args.M,
              "n_db": len(xb), "n_queries": len(xq), **env}
    with open(args.out, "a") as f:
        for label, runs in curves.items():
            front = {id(r) for r in pareto_front(runs)}
            for r in runs:
                row = {**common, "index": label, "pareto": id(r) in front, **r, "meta": meta[label]}
                f.write(json.dumps(row) + "\n")
    plot_pareto(curves, args.plot, title=f"{args.dataset}: {len(xb):,} vectors, {args.M} bytes, "
                                         f"{args.ivf_K} lists, {args.threads} threads")
    for label, runs in curves.items():
        print(label)
        for r in pareto_front(runs):
            print(f"   {r['parameters']}  R@1 {r['recalls']['1']:.3f}  R@10 {r['recalls']['10']:.3f}  "
                  f"{r['qps']:.0f} QPS")


if __name__ == "__main__":
    main()
