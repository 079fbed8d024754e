"""The first stage of IVF-QINCo2 alone: the shortlist index's scan by the compiled kernel, by
faiss's IVF-PQ scanner with precomputed tables (the fallback without a C compiler), and by
faiss's own IVF-RQ search, timed in turns on the same probes.

    PYTHONPATH=. python benchmarks/bench_shortlist_scan.py --work runs/ivf_cpu --threads 2

Writes one JSON line per (nprobe, quantizer efSearch): milliseconds per ``--queries`` queries
(medians of ``--rounds``) of each scan and of the HNSW probing alone, and how many ids agree
with faiss's search.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

import faiss  # isort: skip
import numpy as np
from bench_codecs import environment

from qinco2 import resolve_dataset
from qinco2.ivfsearch import shortlist_scan
from qinco2.ivfsearch.shortlist import load_index


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/ivf_cpu", help="folder of index.faissindex (bench_ivf_search.py)")
    p.add_argument("--dataset", default="sift-photos")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--efsearch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--k", type=int, default=20, help="shortlist length")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/shortlist_scan.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    index = load_index(Path(args.work) / "index.faissindex")
    xq = np.ascontiguousarray(resolve_dataset(args.dataset).query_vectors()[:args.queries])
    native = shortlist_scan.scanner(index)
    if not isinstance(native, shortlist_scan.NativeScan):
        sys.exit("the compiled scan is not available here (see the log): nothing to compare")
    fallback = shortlist_scan.ShortlistScan(index, index.quantizer.reconstruct_n(0, index.nlist),
                                            faiss.vector_to_array(index.rq.codebooks).reshape(index.rq.M, 256, -1))
    fallback.sync(index)
    common = {"bench": "shortlist_scan", "dataset": args.dataset, "nlist": index.nlist, "ntotal": index.ntotal,
              "M": index.rq.M, "k": args.k, "queries": len(xq), "rounds": args.rounds, **environment(args.threads)}
    for ef in args.efsearch:
        hnsw = faiss.SearchParametersHNSW(efSearch=ef)
        for nprobe in args.nprobe:
            ivf = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=hnsw)
            runs = {"kernel": lambda: native.search(index.quantizer, xq, args.k, nprobe, hnsw),
                    "faiss_ivfpq_scanner": lambda: fallback.search(index.quantizer, xq, args.k, nprobe, hnsw),
                    "faiss_ivfrq_search": lambda: index.search(xq, args.k, params=ivf),
                    "hnsw_only": lambda: index.quantizer.search(xq, nprobe, params=hnsw)}
            times = {key: [] for key in runs}
            for r in range(args.rounds + 1):
                for key, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    if r:
                        times[key].append(time.perf_counter() - t0)
            ids = {key: runs[key]()[1] for key in ("kernel", "faiss_ivfpq_scanner", "faiss_ivfrq_search")}
            ms = {key: 1000 * float(np.median(t)) for key, t in times.items()}
            row = {**common, "nprobe": nprobe, "quantizer_efSearch": ef, "ms": ms,
                   "same_ids_as_faiss": {key: float((v == ids["faiss_ivfrq_search"]).mean()) for key, v in ids.items()},
                   "kernel_speedup": {key: ms[key] / ms["kernel"] for key in ("faiss_ivfpq_scanner", "faiss_ivfrq_search")}}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"ef {ef} nprobe {nprobe}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
