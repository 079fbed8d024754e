"""Encoding trade-off of a trained model: MSE, R@1/10/100 and encoding µs/vector for each (A, B).

For every ``--A`` (candidates pre-selected per beam and step; 0: all K, exhaustive) and
``--B`` (beam width), the database of ``--dataset`` is encoded with
``QincoCodec.load(model, device=...).encode(xb, A=A, B=B, precision=...)``, decoded, and
measured as ``bench_codecs.py`` does (its ``quality``: MSE in the set's units, R@k of an exact
search of the queries over the decoded database by the set's metric). With ``--db-rows`` the
ground truth is recomputed by exact search of the raw vectors over the rows kept
(``qinco2.metrics.knn``, as ``bench_vqtorch.py``; ``gt`` in the row says which). Timing: one
warm-up encode of a few rows per (A, B), then the encode of the first ``--time-rows`` rows
(default: the whole database; the rest is then encoded untimed). Combinations the model cannot
run (A > K, A > 0 on a model trained with A = 0) are skipped with a note. One JSON line per
(A, B) is appended to ``--out`` (machine, threads, device, versions, command), then a markdown
table (rows A, columns B, cells "MSE / R@1 / µs") is printed.

    PYTHONPATH=. python benchmarks/bench_encode_grid.py --model runs/bench/qinco2-sift-photos-8x8.pt \\
        --dataset sift-photos --A 4 8 16 --B 1 2 4 8 16 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codecs import environment, quality

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.codec.precision import PRECISIONS, check_precision
from qinco2.errors import InputError
from qinco2.metrics import knn

WARMUP_ROWS = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="trained model file (QincoCodec.save)")
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--A", type=int, nargs="+", default=[4, 8, 16], help="pre-selected candidates (0: all K)")
    p.add_argument("--B", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="beam widths")
    p.add_argument("--db-rows", type=int, default=None, help="first database rows only (ground truth recomputed)")
    p.add_argument("--time-rows", type=int, default=None, help="rows whose encoding is timed (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--out", default="benchmarks/results/encode_grid.jsonl")
    args = p.parse_args(argv)
    if min(args.A) < 0 or min(args.B) < 1:
        p.error(f"need A >= 0 and B >= 1, got --A {args.A} --B {args.B}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    try:
        check_precision(args.precision, args.device)
    except InputError as exc:
        p.error(str(exc))
    return args


def load_data(args):
    """Database (float32), queries, ground truth and where the ground truth comes from."""
    ds = resolve_dataset(args.dataset)
    xb_all = ds.database(DataLimits())
    xb = np.ascontiguousarray(xb_all[:args.db_rows] if args.db_rows else xb_all, dtype=np.float32)
    xq, gt, gt_kind = ds.query_vectors(), ds.ground_truth(), "file"
    if len(xb) < len(xb_all):
        gt, gt_kind = knn(xq, xb, 100, metric=ds.metric), f"recomputed on the first {len(xb)} base rows"
    return ds, xb, xq, gt, gt_kind


def skip_reason(codec: QincoCodec, A: int) -> str | None:
    cfg = codec.model_config
    if A > cfg.K:
        return f"A={A} > K={cfg.K} (A=0 is the exhaustive search)"
    if A > 0 and cfg.A == 0:
        return f"A={A}: the model was trained with A=0 (no pre-selection codebooks), it encodes with A=0 only"
    return None


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def encode_timed(codec: QincoCodec, xb: np.ndarray, A: int, B: int, args) -> tuple[np.ndarray, float, int]:
    """Codes of all of ``xb``, the seconds the first ``time_rows`` took, and that row count."""
    n_time = min(args.time_rows or len(xb), len(xb))
    codec.encode(xb[:WARMUP_ROWS], A=A, B=B, precision=args.precision)
    sync(args.device)
    t0 = time.perf_counter()
    codes = codec.encode(xb[:n_time], A=A, B=B, precision=args.precision)
    sync(args.device)
    seconds = time.perf_counter() - t0
    if n_time < len(xb):
        codes = np.concatenate([codes, codec.encode(xb[n_time:], A=A, B=B, precision=args.precision)])
    return codes, seconds, n_time


def table(results: dict, As: list[int], Bs: list[int]) -> str:
    lines = ["| A \\ B | " + " | ".join(str(B) for B in Bs) + " |", "|---" * (len(Bs) + 1) + "|"]
    for A in As:
        cells = []
        for B in Bs:
            r = results.get((A, B))
            cells.append(f"{r['mse']:.4g} / {r['R@1']:.3f} / {r['encode_us']:.1f}" if r else "-")
        lines.append(f"| {A} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    ds, xb, xq, gt, gt_kind = load_data(args)
    codec = QincoCodec.load(args.model, device=args.device)
    cfg = codec.model_config
    base = {"bench": "encode_grid", "dataset": args.dataset, "model_file": args.model, "bytes": codec.code_size,
            "model": {k: getattr(cfg, k) for k in ("D", "M", "K", "L", "de", "dh", "A", "B")},
            "precision": args.precision, "mse_scale": ds.mse_scale, "n_db": len(xb), "n_queries": len(xq),
            "gt": gt_kind, **environment(args.threads, device=args.device)}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = {}
    for A in args.A:
        if (why := skip_reason(codec, A)) is not None:
            print(f"skipped: {why}", flush=True)
            continue
        for B in args.B:
            codes, seconds, n_time = encode_timed(codec, xb, A, B, args)
            xr = codec.decode(codes)
            row = {**base, "A": A, "B": B, "time_rows": n_time, "encode_s": seconds,
                   "encode_us": 1e6 * seconds / n_time, **quality(xb, xr, xq, gt, ds.mse_scale, ds.metric)}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            results[(A, B)] = row
            print(f"A={A:3d} B={B:3d}  MSE {row['mse']:.4f}  R@1 {row['R@1']:.3f}  R@10 {row['R@10']:.3f}  "
                  f"R@100 {row['R@100']:.3f}  enc {row['encode_us']:.1f}us ({n_time} rows)", flush=True)
    print(f"\n{args.dataset}, {len(xb)} rows, {args.model}, {args.device}, {args.threads} threads, "
          f"{args.precision}: MSE / R@1 / encode us per vector\n")
    print(table(results, args.A, args.B))


if __name__ == "__main__":
    main()
