"""Training steps/s and quality in float32 and in bfloat16 (``TrainConfig.cpu_bf16``) on the CPU.

Each precision trains the benchmark's CPU recipe (``bench_codecs.QINCO_SETTINGS["qinco2"]``:
`qinco2-S`, A=4 B=2, batch 256, the schedule spread over the time budget) from the same seed
for ``--minutes``, in turns when ``--rounds`` > 1. A JSON line per run: training steps/s
(steps over the time spent in epochs, the initialisation left out), the best validation MSE,
and the database MSE encoded at A=16 B=8 in float32, so both models are judged alike.

    PYTHONPATH=. python benchmarks/bench_train_precision.py --dataset sift-photos --minutes 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import numpy as np
from bench_codecs import QINCO_SETTINGS, environment

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.metrics import mse


def run(precision: str, xt, xv, xb, mse_scale: float, args) -> dict:
    preset, overrides, (A, B) = QINCO_SETTINGS["qinco2"]
    codec = QincoCodec.from_preset(preset, **{**overrides, "M": args.M, "max_time_s": args.minutes * 60,
                                              "cpu_bf16": precision == "bf16", "seed": args.seed,
                                              **({"batch": args.batch} if args.batch else {})})
    t0 = time.perf_counter()
    codec.train(xt, xv, mse_scale=mse_scale, progress=False)
    train_s = time.perf_counter() - t0
    st = codec.train_state_
    xr = codec.decode(codec.encode(xb, A=A, B=B))
    return {"bench": "train_precision", "precision": precision, "M": args.M, "minutes": args.minutes,
            "batch": codec.train_config.batch,
            "steps": st.step, "epochs": st.epoch, "elapsed_s": st.elapsed_s, "train_s": train_s,
            "steps_per_s": st.step / st.elapsed_s, "val_mse_init": st.init_mse, "val_mse_best": st.best_mse,
            "best_epoch": st.best_epoch, "db_mse": mse(xb, xr, mse_scale), "eval_A": A, "eval_B": B,
            "architecture": {k: getattr(codec.model_config, k) for k in ("L", "de", "dh", "A", "B")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--M", type=int, default=8)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the recipe's, 256)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=1, help="every precision this many times, in turns")
    p.add_argument("--db-rows", type=int, default=20_000, help="database rows encoded for the MSE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/train_precision.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = resolve_dataset(args.dataset)
    xt, xv = ds.train_val(DataLimits())
    xb = np.ascontiguousarray(ds.database(DataLimits(db=args.db_rows)), dtype=np.float32)
    env = {**environment(args.threads), "dataset": args.dataset}
    with open(args.out, "a") as f:
        for _ in range(args.rounds):
            for precision in args.precisions:
                row = {**run(precision, xt, xv, xb, ds.mse_scale, args), **env}
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{precision}: {row['steps_per_s']:.2f} steps/s ({row['steps']} steps), validation MSE "
                      f"{row['val_mse_init']:.4g} -> {row['val_mse_best']:.4g}, database MSE {row['db_mse']:.4g}",
                      flush=True)


if __name__ == "__main__":
    main()
