"""IVF-PQ benchmark: our torch index against faiss ``IndexIVFPQ`` with the same parameters,
plus refinement by raw vectors and by QINCo2 decoding of compact codes.

For each ``pq_dim`` (8-bit codes) both indexes are built on the database (k-means on the
same ``kmeans_trainset_fraction`` sample, the same iterations, PQ trained on at most
256 points per code), then searched for ``k`` neighbours over a grid of ``n_probes`` with the
same threads. Each operating point is one JSON line of ``--out``: 10-recall@10 (the
fraction of the 10 true neighbours found, cuVS's "recall"), R@1 / R@10 (the true nearest
neighbour among the first 1 / 10), queries per second (median of ``--repeats`` timed runs
after a warm-up, the indexes of one ``n_probes`` timed in turns) and the bytes per vector.

Our index is searched with each ``--cpu-scans`` value (``qinco2.ivfpq.SearchParams.cpu_scan``):
``auto`` (the default: faiss's IVF-PQ scan over our lists on the CPU) and ``torch`` (the torch
scan, as on CUDA) for comparison; rows other than ``auto`` name their scan.

    python benchmarks/bench_ivfpq.py --pq-dims 16 32 64 --qinco-models runs/bench/qinco2-sift-photos-16x8.pt
    python benchmarks/bench_ivfpq.py --pq-dims 8 16 32 64 --cpu-scans auto torch --refine-ratios
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

# isort: split
import faiss
import numpy as np
from bench_codecs import environment

from qinco2 import DataLimits, QincoCodec, ivfpq, resolve_dataset
from qinco2.metrics import neighbor_recall, recall_at

PROBES = (1, 2, 5, 10, 20, 50, 100, 200)


def timed_in_turns(fns, repeats: int) -> list[tuple[object, float]]:
    """Each function's last output and median time over ``repeats`` runs after a warm-up, the
    functions timed in turns (one run of each per round), so that a slow spell of the machine
    falls on all of them alike."""
    outs = [fn() for fn in fns]                                      # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(out, statistics.median(t)) for out, t in zip(outs, times)]


def quality(ids, gt, k: int) -> dict:
    r = recall_at(ids, gt, (1, 10))
    return {f"{k}-recall@{k}": neighbor_recall(ids, gt, k), "R@1": r[1], "R@10": r[10]}


def faiss_factory(d: int, n_lists: int, pq_dim: int) -> str:
    """faiss IVF-PQ; a padded random rotation first when ``d % pq_dim`` (as our index does)."""
    rotation = f"RR{pq_dim * -(-d // pq_dim)}," if d % pq_dim else ""
    return f"{rotation}IVF{n_lists},PQ{pq_dim}x8"


def build_faiss(xb, train_rows, n_lists: int, pq_dim: int, niter: int):
    index = faiss.index_factory(xb.shape[1], faiss_factory(xb.shape[1], n_lists, pq_dim))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.niter = niter
    ivf.pq.cp.niter = niter
    index.train(xb[train_rows])
    index.add(xb)
    return index


def qinco_codes(path: str, xb, work: Path, A: int, B: int) -> tuple[QincoCodec, np.ndarray, float]:
    """The codec and the database codes (cached next to the benchmark's other files)."""
    codec = QincoCodec.load(path)
    cache = work / f"{Path(path).stem}-A{A}B{B}-codes.npy"
    if cache.is_file():
        return codec, np.load(cache), float("nan")
    t0 = time.perf_counter()
    codes = codec.encode(xb, A=A, B=B)
    seconds = time.perf_counter() - t0
    np.save(cache, codes)
    return codec, codes, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--n-lists", type=int, default=1024)
    p.add_argument("--pq-dims", type=int, nargs="+", default=[8, 16, 24, 32, 64])
    p.add_argument("--kmeans-n-iters", type=int, default=20)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--probes", type=int, nargs="+", default=list(PROBES))
    p.add_argument("--refine-ratios", type=float, nargs="*", default=[2, 4], help="none: no refinement rows")
    p.add_argument("--cpu-scans", nargs="+", default=["auto"], choices=["auto", "faiss", "torch"],
                   help="who scans our lists on the CPU (SearchParams.cpu_scan); one row each")
    p.add_argument("--qinco-models", nargs="+", default=[],
                   help="QINCo2 models (PATH or PATH:A:B) whose codes re-rank the indexes of --qinco-pq-dims")
    p.add_argument("--qinco-pq-dims", type=int, nargs="+", default=[8, 16],
                   help="pq_dim of the indexes re-ranked with the QINCo2 codes")
    p.add_argument("--qinco-AB", type=int, nargs=2, default=(8, 4), help="default encoding beam of the models")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/ivfpq_bench")
    p.add_argument("--out", default="benchmarks/results/ivfpq.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ds = resolve_dataset(args.dataset)
    xb = np.ascontiguousarray(ds.database(DataLimits()), dtype=np.float32)
    xq, gt = ds.query_vectors(), ds.ground_truth()
    env = environment(args.threads)
    common = {"bench": "ivfpq", "dataset": args.dataset, "n_db": len(xb), "n_queries": len(xq), "k": args.k,
              "n_lists": args.n_lists, **env}
    out = open(args.out, "a")

    def emit(row: dict) -> None:
        row = {**common, **row}
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"{row['index']:44s} n_probes={row['n_probes']:4d}  {args.k}-recall@{args.k} "
              f"{row[f'{args.k}-recall@{args.k}']:.4f}  R@1 {row['R@1']:.3f}  {row['qps']:9.0f} QPS  "
              f"{row['bytes_per_vector']:.0f} B/vec", flush=True)

    refiners = []
    for spec in args.qinco_models:
        model, *ab = spec.split(":")
        A, B = map(int, ab) if ab else args.qinco_AB
        codec, codes, enc_s = qinco_codes(model, xb, work, A, B)
        cfg = codec.model_config                 # bytes: 8-bit step codes, the IVF id in whole bytes
        nbytes = cfg.M * -(-int(np.log2(cfg.K)) // 8) + (-(-int(np.ceil(np.log2(cfg.ivf_K))) // 8) if cfg.ivf_K else 0)
        refiners.append((model, codec, codes, nbytes, [A, B]))
        print(f"QINCo2 codes {codes.shape} of {model}: {nbytes} bytes per vector ({enc_s:.0f} s to encode)")
    for pq_dim in args.pq_dims:
        params = ivfpq.IndexParams(n_lists=args.n_lists, pq_dim=pq_dim, pq_bits=8,
                                   kmeans_n_iters=args.kmeans_n_iters, conservative_memory_allocation=True)
        t0 = time.perf_counter()
        ours = ivfpq.build(params, xb)
        ours_build = time.perf_counter() - t0
        train_rows = np.sort(np.random.default_rng(0).permutation(len(xb))[:len(xb) // 2])
        t0 = time.perf_counter()
        ref = build_faiss(xb, train_rows, args.n_lists, pq_dim, args.kmeans_n_iters)
        faiss_build = time.perf_counter() - t0
        code_bytes = pq_dim + 8                                   # PQ code + int64 id
        for n_probes in [n for n in args.probes if n <= args.n_lists]:
            sp = ivfpq.SearchParams(n_probes=n_probes)
            fp = faiss.SearchParametersIVF(nprobe=n_probes)
            cells = []                                   # (search function, row): timed in turns
            for cpu_scan in args.cpu_scans:
                sp_scan = ivfpq.SearchParams(n_probes=n_probes, cpu_scan=cpu_scan)
                scan = "" if cpu_scan == "auto" else f" ({cpu_scan} scan)"
                cells.append((lambda sp_scan=sp_scan: ivfpq.search(sp_scan, ours, xq, args.k)[1], {
                    "index": f"qinco2.ivfpq IVF{args.n_lists},PQ{pq_dim}x8{scan}", "impl": "ours", "pq_dim": pq_dim,
                    "cpu_scan": cpu_scan, "n_probes": n_probes, "build_s": ours_build, "index_bytes": ours.nbytes(),
                    "bytes_per_vector": code_bytes}))
            cells.append((lambda: ref.search(xq, args.k, params=fp)[1], {
                "index": f"faiss {faiss_factory(xb.shape[1], args.n_lists, pq_dim)}", "impl": "faiss",
                "pq_dim": pq_dim, "n_probes": n_probes, "build_s": faiss_build, "bytes_per_vector": code_bytes}))
            for ratio in args.refine_ratios:
                cells.append((lambda ratio=ratio: ivfpq.search_and_refine(
                    sp, ours, xq, args.k, refine_ratio=ratio, dataset=xb)[1], {
                    "index": f"qinco2.ivfpq PQ{pq_dim}x8 + refine raw x{ratio:g}", "impl": "ours+raw",
                    "pq_dim": pq_dim, "n_probes": n_probes, "refine_ratio": ratio, "bytes_per_vector": code_bytes,
                    "host_bytes_per_vector": 4 * xb.shape[1]}))
                for model, codec, codes, nbytes, ab in refiners if pq_dim in args.qinco_pq_dims else []:
                    kind = "IVF-QINCo2" if codec.model_config.ivf_K else "QINCo2"
                    cells.append((lambda ratio=ratio, codec=codec, codes=codes: ivfpq.search_and_refine(
                        sp, ours, xq, args.k, refine_ratio=ratio, codec=codec, codes=codes)[1], {
                        "index": f"qinco2.ivfpq PQ{pq_dim}x8 + {kind} {nbytes}B x{ratio:g}", "impl": "ours+qinco2",
                        "pq_dim": pq_dim, "n_probes": n_probes, "refine_ratio": ratio, "qinco_model": model,
                        "qinco_AB": ab, "bytes_per_vector": code_bytes + nbytes}))
            for (_, row), (ids, t) in zip(cells, timed_in_turns([fn for fn, _ in cells], args.repeats)):
                emit({**row, "qps": len(xq) / t, "repeats": args.repeats, **quality(ids, gt, args.k)})

if __name__ == "__main__":
    main()
