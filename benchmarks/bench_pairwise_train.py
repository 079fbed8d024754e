"""Pairwise decoder training time per round, on synthetic pair-structured codes (JSON lines).

The targets are built from known code pairs, so every round finds a useful table and the
run shows how a round's cost changes with the round number.

    PYTHONPATH=. python benchmarks/bench_pairwise_train.py --rows 300000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codecs import environment  # noqa: E402

from qinco2.ivfsearch.pairwise import PairwiseDecoder  # noqa: E402


class RoundTimes(logging.Handler):
    """Time stamps of the decoder's "pairwise round" log lines."""

    def __init__(self):
        super().__init__()
        self.times = []

    def emit(self, record):
        if record.getMessage().startswith("pairwise round"):
            self.times.append(time.perf_counter())


def pair_data(N: int, M: int, K: int, D: int, C: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.empty((N, 1 + M), dtype=np.int32)
    codes[:, 0], codes[:, 1:] = rng.integers(0, C, N), rng.integers(0, K, (N, M))
    centroids = (3 * rng.normal(size=(C, D))).astype(np.float32)
    x = centroids[codes[:, 0]].copy()
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (1, 5), (2, 7)]:
        x += 0.5 * rng.normal(size=(K * K, D)).astype(np.float32)[codes[:, a] * K + codes[:, b]]
    x += 0.1 * rng.normal(size=x.shape).astype(np.float32)
    return codes, x, centroids


def _commit() -> str:
    """The checkout's commit (``+`` when it has local changes): which code was timed."""
    here = os.path.dirname(os.path.abspath(__file__))
    run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") + ("+" if run("status", "--porcelain", "--", "../qinco2") else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/pairwise_train.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    M, C = 8, 64
    codes, x, centroids = pair_data(args.rows, M, args.K, args.D, C)
    handler = RoundTimes()
    logger = logging.getLogger("qinco2.ivfsearch.pair_tables")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    dec = PairwiseDecoder(K=args.K, n_pairs_per_step=1, ivf_subcode_levels=2)
    dec.train(codes, x, centroids, progress=False, accumulator_bytes=64 << 20)
    total = time.perf_counter() - t0
    starts = [t0] + handler.times[:-1]
    rounds = [b - a for a, b in zip(starts, handler.times)][1:]     # the first includes the set-up
    row = {"bench": "pairwise_train", "rows": args.rows, "M": M, "K": args.K, "D": args.D, "ivf_lists": C,
           "tables": len(dec.pairs_), "round_s": rounds, "total_s": total, "holdout_mse": dec.holdout_mse_[-1],
           "command": " ".join(sys.argv), "commit": _commit(), **environment(args.threads)}
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{len(dec.pairs_)} tables, rounds 2..{len(rounds) + 1}: " + " ".join(f"{s:.2f}" for s in rounds)
          + f" s; total {total:.1f} s; held-out MSE {dec.holdout_mse_[-1]:.5g}")


if __name__ == "__main__":
    main()
