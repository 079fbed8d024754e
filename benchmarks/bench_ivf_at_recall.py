"""IVF-QINCo2 against faiss indexes at each faiss index's best R@1, timed in turns.

A sweep (``bench_ivf_search.py``) times each of our settings once (1,000 queries, 25-70 ms):
the same setting measured in two sweeps differed by up to 1.7x on a 2-core machine, and the
Pareto front picks the lucky draws. Here, for each faiss baseline, its best-R@1 setting (from
the last faiss rows of ``--results``) and our ``--candidates`` fastest settings that reached
that R@1 in the last sweep of each of our configurations are searched in turns, ``--rounds``
rounds after a warm-up, and the medians compared. Writes one JSON line per (baseline, ours).

    PYTHONPATH=. python benchmarks/bench_ivf_at_recall.py --work runs/ivf_cpu --threads 2

``--pairwise-targets R1 ...`` compares our configurations with and without the pairwise decoder
instead, at those R@1 (same candidates rule, same turns).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch  # before faiss: one OpenMP runtime for both (qinco2.openmp)

import faiss  # isort: skip
import numpy as np
from bench_codecs import environment
from bench_ivf_search import build_faiss, search_params

from qinco2 import DataLimits, QincoCodec, resolve_dataset
from qinco2.codec.codes_io import load_encoded, model_sha
from qinco2.ivfsearch.multistage import SearchParams, multistage_search
from qinco2.ivfsearch.pairwise import PairwiseDecoder
from qinco2.ivfsearch.shortlist import load_index
from qinco2.metrics import recall_at

log = logging.getLogger("bench_ivf_at_recall")
OURS = {"IVF-QINCo2": (False, "fp32"), "IVF-QINCo2 + pairwise": (True, "fp32"),
        "IVF-QINCo2, bf16 decoding": (False, "bf16"), "IVF-QINCo2 + pairwise, bf16 decoding": (True, "bf16")}


def last_rows(path: Path) -> tuple[dict, dict]:
    """Rows of the last run of each index in ``path``: faiss's and ours, by index label."""
    latest: dict[str, list] = {}
    for row in map(json.loads, path.read_text().splitlines()):
        runs = latest.setdefault(row["index"], [])
        if runs and runs[0]["date"] != row["date"]:
            runs.clear()
        runs.append(row)
    return ({k: v for k, v in latest.items() if k not in OURS}, {k: v for k, v in latest.items() if k in OURS})


def best_setting(runs: list[dict]) -> dict:
    """The run of the highest R@1 (ties: the fastest)."""
    return max(runs, key=lambda r: (r["recalls"]["1"], r["qps"]))


def candidates(runs: list[dict], r1: float, n: int) -> list[dict]:
    """The ``n`` fastest of ``runs`` that reached R@1 ``r1``."""
    return sorted((r for r in runs if r["recalls"]["1"] >= r1 - 1e-9), key=lambda r: -r["qps"])[:n]


def in_turns(searches: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each search, one of each per round, ``rounds`` rounds after one warm-up round."""
    times = {k: [] for k in searches}
    for r in range(rounds + 1):
        for key, fn in searches.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[key].append(time.perf_counter() - t0)
    return times


def our_searches(our_runs: dict, labels, r1: float, n: int, index, codec, db_codes, pairwise, xq) -> dict:
    """For each configuration in ``labels``, its ``n`` fastest settings that reached R@1 ``r1`` in
    the sweeps: ``{key: (label, parameters, search)}``, ``search()`` running the setting."""
    out = {}
    for label in labels:
        use_pairwise, precision = OURS[label]
        for run in candidates(our_runs[label], r1, n):
            sp = SearchParams(**run["parameters"])
            out[f"{label} {run['parameters']}"] = (label, run["parameters"], (
                lambda sp=sp, pw=pairwise if use_pairwise else None, pr=precision:
                multistage_search(index, codec, db_codes, xq, sp, pairwise=pw, decode_precision=pr)))
    return out


def pairwise_vs_plain(args, our_runs, index, codec, db_codes, pairwise, xq, gt, common) -> None:
    """At each R@1 of ``--pairwise-targets`` and each decoding precision, our fastest settings
    with and without the pairwise decoder (from the sweeps) searched in turns: one JSON line
    per (target, precision) with the best median of each side."""
    for r1 in args.pairwise_targets:
        for precision in ("fp32", "bf16"):
            labels = [label for label, (_, pr) in OURS.items() if pr == precision and label in our_runs]
            ours = our_searches(our_runs, labels, r1, args.candidates, index, codec, db_codes, pairwise, xq)
            searches = {key: fn for key, (_, _, fn) in ours.items()}
            settings = {key: OURS[label][0] for key, (label, _, _) in ours.items()}
            if len(set(settings.values())) < 2:
                log.info("R@1 %.3f %s: reached by one side only in the sweeps", r1, precision)
                continue
            times = in_turns(searches, args.rounds)
            best = {}
            for key, use_pairwise in settings.items():
                qps = len(xq) / float(np.median(times[key]))
                r1_got = recall_at(searches[key]()[0], gt)[1]
                if r1_got >= r1 - 1e-9 and qps > best.get(use_pairwise, ("", 0.0, 0.0))[1]:
                    best[use_pairwise] = (key, qps, r1_got)
            if len(best) < 2:
                continue
            row = {**common, "target_R@1": r1, "precision": precision, "rounds": args.rounds,
                   "plain": dict(zip(("setting", "qps_median", "R@1"), best[False])),
                   "pairwise": dict(zip(("setting", "qps_median", "R@1"), best[True])),
                   "pairwise_over_plain": best[True][1] / best[False][1]}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.info("R@1 >= %.3f %s: plain %.0f QPS, + pairwise %.0f QPS: %.2fx", r1, precision, best[False][1],
                     best[True][1], row["pairwise_over_plain"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/ivf_cpu")
    p.add_argument("--results", default="benchmarks/results/ivf_search.jsonl")
    p.add_argument("--baselines", nargs="+", default=["pq", "pqfs", "rabitq", "rabitqfs"])
    p.add_argument("--candidates", type=int, default=3, help="our fastest settings per configuration")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ivf_at_recall.jsonl")
    p.add_argument("--pairwise-targets", type=float, nargs="*", default=None, metavar="R1",
                   help="instead of faiss: the pipeline with and without the pairwise decoder at these R@1")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    faiss_runs, our_runs = last_rows(Path(args.results))
    first = next(iter(faiss_runs.values()))[0]
    ds = resolve_dataset(first["dataset"])
    xq, gt = ds.query_vectors(), ds.ground_truth()
    work = Path(args.work)
    codec = QincoCodec.load(work / "model.pt")
    db_codes = load_encoded(work / "codes_db.npy", require_ivf=True)["codes"]
    index = load_index(work / "index.faissindex", model_sha=model_sha(codec), n_db=len(db_codes))
    pairwise = PairwiseDecoder.load(work / "pairwise.pt")
    if args.pairwise_targets is not None:
        common = {"bench": "ivf_pairwise_vs_plain", "dataset": ds.name, **environment(args.threads),
                  "command": " ".join(sys.argv)}
        return pairwise_vs_plain(args, our_runs, index, codec, db_codes, pairwise, xq, gt, common)
    build_args = argparse.Namespace(ivf_K=first["ivf_K"], M=first["M"], faiss_train=first["meta"]["n_train"])
    common = {"bench": "ivf_at_recall", "dataset": first["dataset"], **environment(args.threads),
              "command": " ".join(sys.argv)}
    xt, _ = ds.train_val(DataLimits(valset=10_000))           # for the faiss indexes only
    xt_f = np.ascontiguousarray(xt[:build_args.faiss_train], dtype=np.float32)
    xb = np.ascontiguousarray(ds.database(DataLimits()), dtype=np.float32)
    for name in args.baselines:
        fidx, meta = build_faiss(name, build_args, xt_f, xb)
        target = best_setting(faiss_runs[meta["factory"]])
        r1, fparams = target["recalls"]["1"], search_params(target["parameters"])
        ours = our_searches(our_runs, list(our_runs), r1, args.candidates, index, codec, db_codes, pairwise, xq)
        searches = {"faiss": lambda: fidx.search(xq, 100, params=fparams),
                    **{key: fn for key, (_, _, fn) in ours.items()}}
        settings = {key: (label, params) for key, (label, params, _) in ours.items()}
        times = in_turns(searches, args.rounds)
        f_ids = searches["faiss"]()[1]
        f_med = float(np.median(times["faiss"]))
        f_r1 = recall_at(f_ids, gt)[1]
        with open(args.out, "a") as f:
            for key, (label, params) in settings.items():
                ids = searches[key]()[0]
                med = float(np.median(times[key]))
                row = {**common, "baseline": meta["factory"], "baseline_parameters": target["parameters"],
                       "baseline_R@1": f_r1, "baseline_qps_median": len(xq) / f_med, "index": label,
                       "parameters": params, "R@1": recall_at(ids, gt)[1], "qps_median": len(xq) / med,
                       "speed_ratio": f_med / med, "rounds": args.rounds,
                       "qps_all": [len(xq) / t for t in times[key]],
                       "baseline_qps_all": [len(xq) / t for t in times["faiss"]]}
                f.write(json.dumps(row) + "\n")
                log.info("%s R@1 %.3f %.0f QPS | %s R@1 %.3f %.0f QPS: %.2fx", meta["factory"], f_r1,
                         len(xq) / f_med, key, row["R@1"], row["qps_median"], row["speed_ratio"])


if __name__ == "__main__":
    main()
