"""Codec benchmark: faiss PQ / OPQ / RQ / LSQ against qinco2 codecs on one data set.

Trains each codec on the training split, measures MSE on the database, R@1/10/100 by exact
search of the queries over the decoded database, training time and encode/decode time per
vector. Each codec appends one JSON line (with machine, threads, versions and the command)
to ``--out`` as soon as it is done, so an interrupted run keeps what it measured.

    python benchmarks/bench_codecs.py --bytes 8 --codecs pq opq rq1 rq32 lsq qinco2 qinco1

``--device cuda`` trains, encodes and decodes the qinco2 codecs on the GPU (faiss codecs stay
on the CPU); every line records the device (and the GPU's name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.metrics import code_usage, knn, mse, recall_at

FAISS_FACTORIES = {
    "pq": "PQ{M}x8",
    "opq": "OPQ{M},PQ{M}x8",
    "rq1": "RQ{M}x8",
    "rq32": "RQ{M}x8",
    "lsq": "LSQ{M}x8",
}


def cpu_info() -> dict:
    """The CPU's model name and its bf16 matrix extensions (Linux ``/proc/cpuinfo``; else unknown)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"cpu_model": name, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags}


def environment(threads: int, device="cpu") -> dict:
    device = torch.device(device)
    gpu = {"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}
    return {
        **cpu_info(),
        "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "threads": threads, "device": str(device), **gpu,
        "python": platform.python_version(), "torch": torch.__version__,
        "faiss": faiss.__version__, "numpy": np.__version__,
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def quality(xb, xr, xq, gt, mse_scale, metric) -> dict:
    """MSE over the database; R@k of the queries searched over the decoded database by the
    data set's metric (``ip`` for embedding sets)."""
    ids = knn(xq, xr, 100, metric=metric)
    rec = recall_at(ids, gt)
    return {"mse": mse(xb, xr, mse_scale), "metric": metric, "R@1": rec[1], "R@10": rec[10], "R@100": rec[100]}


def run_faiss(name: str, M: int, xt, xb, xq, gt, mse_scale, metric, n_train: int) -> dict:
    index = faiss.index_factory(xt.shape[1], FAISS_FACTORIES[name].format(M=M))
    flags = {}
    if name.startswith("rq"):
        index.rq.max_beam_size = int(name[2:])
        flags = {"max_beam_size": index.rq.max_beam_size, "train_type": int(index.rq.train_type)}
    _, t_train = timed(index.train, xt[:n_train])
    codes, t_enc = timed(index.sa_encode, xb)
    xr, t_dec = timed(index.sa_decode, codes)
    label = f"faiss {FAISS_FACTORIES[name].format(M=M)}" + (f" beam {flags['max_beam_size']}" if flags else "")
    return {"codec": label, "flags": flags, "n_train": min(n_train, len(xt)),
            "train_s": t_train, "encode_us": 1e6 * t_enc / len(xb), "decode_us": 1e6 * t_dec / len(xb),
            **quality(xb, xr, xq, gt, mse_scale, metric)}


def run_qinco(name: str, M: int, xt, xv, xb, xq, gt, mse_scale, metric, args) -> dict:
    preset, overrides, eval_AB = QINCO_SETTINGS[name]
    overrides = {**overrides, "M": M, "max_time_s": args.qinco_minutes * 60,
                 **({"init_refine": args.init_refine} if args.init_refine else {}),
                 **({"cpu_bf16": True} if args.cpu_bf16 else {})}
    codec = QincoCodec.from_preset(preset, device=getattr(args, "device", "cpu"), **overrides)
    out = os.path.join(args.model_dir, f"{name}-{args.dataset}-{M}x8.pt")
    _, t_train = timed(lambda: codec.train(xt, xv, mse_scale=mse_scale, output=out, progress=False))
    A, B = args.eval_AB or eval_AB
    codes, t_enc = timed(lambda: codec.encode(xb, A=A, B=B))
    xr, t_dec = timed(codec.decode, codes)
    st = codec.train_state_
    usage, entropy = code_usage(codes, [codec.model_config.K] * codes.shape[1])
    arch = {k: getattr(codec.model_config, k) for k in ("L", "de", "dh", "A", "B")}
    training = {k: getattr(codec.train_config, k)                 # after the small-data rule
                for k in ("weight_decay", "patience", "neighbour_mix", "neighbour_k", "train_noise", "cpu_bf16")}
    return {"codec": f"ours: {preset} (A={A}, B={B})", "preset": preset, "overrides": overrides,
            "eval_A": A, "eval_B": B, "architecture": arch, "training": training,
            "n_train": len(xt), "n_val": len(xv), "epochs_run": st.epoch,
            "best_epoch": st.best_epoch, "val_mse_init": st.init_mse, "val_mse_best": st.best_mse,
            "usage_per_step": [round(float(u), 3) for u in usage],
            "entropy_per_step": [round(float(e), 2) for e in entropy],
            "train_s": t_train, "encode_us": 1e6 * t_enc / len(xb), "decode_us": 1e6 * t_dec / len(xb),
            "model_file": out, **quality(xb, xr, xq, gt, mse_scale, metric)}


# name -> (preset, field overrides, (A, B) used to encode the database)
QINCO_SETTINGS = {
    # QINCo2-S architecture; trained with a cheap search (A=4, B=2), a smaller batch and a
    # higher lr to fit the CPU budget (short tuning runs: benchmarks/README.md); evaluated
    # with a wider search. The warm-up + cosine schedule spans the time budget.
    "qinco2": ("qinco2-S", dict(A=4, B=2, lr=2e-3, batch=256, loop=250_000, epochs=20, ramp_epochs=1,
                               time_schedule=True), (16, 8)),
    # QINCo1 options (no skip, no projection, exhaustive encoding, Adam, plateau); L=1, dh=128
    # so that exhaustive encoding of the database fits the CPU budget.
    "qinco1": ("qinco1", dict(L=1, dh=128, loop=20_000, full_epochs=False), (0, 1)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--bytes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--codecs", nargs="+", default=list(FAISS_FACTORIES) + list(QINCO_SETTINGS))
    p.add_argument("--faiss-train", type=int, default=500_000, help="training vectors for PQ/OPQ/RQ1")
    p.add_argument("--slow-train", type=int, default=100_000, help="training vectors for RQ32/LSQ")
    p.add_argument("--qinco-minutes", type=float, default=30.0)
    p.add_argument("--init-refine", type=int, default=0,
                   help="rounds of joint refinement of the RQ initialisation (TrainConfig.init_refine; its time "
                        "counts against --qinco-minutes)")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="train the qinco2 codecs in bfloat16 autocast on the CPU (TrainConfig.cpu_bf16)")
    p.add_argument("--eval-AB", type=int, nargs=2, default=None, metavar=("A", "B"),
                   help="A and B used to encode the database (default: per codec, see QINCO_SETTINGS)")
    p.add_argument("--train-rows", type=int, default=None, help="use only the first rows of the training split")
    p.add_argument("--valset", type=int, default=DataLimits.valset,
                   help="validation rows taken from the end of the training split (the CLI's ds.valset); "
                        "every codec trains on the rows before them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="device of the qinco2 codecs (faiss codecs stay on the CPU)")
    p.add_argument("--model-dir", default="runs/bench")
    p.add_argument("--out", default="benchmarks/results/codecs.jsonl")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    os.makedirs(args.model_dir, exist_ok=True)
    ds = resolve_dataset(args.dataset)
    xt_raw, xv_raw = ds.train_val(DataLimits(valset=args.valset))
    xt_raw = xt_raw[:args.train_rows] if args.train_rows else xt_raw
    xt = np.ascontiguousarray(xt_raw, dtype=np.float32)
    xb = np.ascontiguousarray(ds.database(DataLimits()), dtype=np.float32)
    xq, gt = ds.query_vectors(), ds.ground_truth()
    env_cpu, env_dev = environment(args.threads), environment(args.threads, device=args.device)
    for M in args.bytes:
        for name in args.codecs:
            if name in FAISS_FACTORIES:
                n_train = args.slow_train if name in ("rq32", "lsq") else args.faiss_train
                row = run_faiss(name, M, xt, xb, xq, gt, ds.mse_scale, ds.metric, n_train)
            else:
                row = run_qinco(name, M, xt_raw, xv_raw, xb, xq, gt, ds.mse_scale, ds.metric, args)
            env = env_cpu if name in FAISS_FACTORIES else env_dev
            row = {"bench": "codecs", "dataset": args.dataset, "bytes": M, "mse_scale": ds.mse_scale, **row, **env}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{M:3d} B  {row['codec']:28s} MSE {row['mse']:.4f}  R@1 {row['R@1']:.3f}  "
                  f"R@10 {row['R@10']:.3f}  R@100 {row['R@100']:.3f}  train {row['train_s']:.0f}s  "
                  f"enc {row['encode_us']:.1f}us  dec {row['decode_us']:.1f}us", flush=True)


if __name__ == "__main__":
    main()
