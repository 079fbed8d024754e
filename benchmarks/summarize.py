"""Print the latest benchmark rows of a JSON-lines file as markdown tables.

    python benchmarks/summarize.py benchmarks/results/codecs.jsonl
    python benchmarks/summarize.py benchmarks/results/ivf_search.jsonl
    python benchmarks/summarize.py benchmarks/results/ivfpq.jsonl
    python benchmarks/summarize.py benchmarks/results/scale.jsonl
"""

import json
import sys
from collections import defaultdict


def codecs(rows: list[dict]) -> None:
    latest = {}
    for row in rows:
        label = row["codec"]
        if "preset" in row:                             # one of ours
            label = f"ours: {row['preset']} (A={row['eval_A']}, B={row['eval_B']})"
        beam = (row.get("flags") or {}).get("max_beam_size")
        if beam and "beam" not in label:
            label += f" beam {beam}"
        latest[(row["bytes"], label)] = row            # later lines win
    print("| bytes | codec | MSE | R@1 | R@10 | R@100 | train vectors | train s | encode µs/vec | decode µs/vec |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (nbytes, codec), r in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[1]["mse"] * -1)):
        print(f"| {nbytes} | {codec} | {r['mse']:.4f} | {r['R@1']:.3f} | {r['R@10']:.3f} | {r['R@100']:.3f} "
              f"| {r['n_train']:,} | {r['train_s']:.0f} | {r['encode_us']:.1f} | {r['decode_us']:.2f} |")


def ivf_search(rows: list[dict]) -> None:
    """Per index of the last run: best R@1 at any speed and the highest queries/s reaching
    given R@1 levels (the faiss indexes' best R@1 among them)."""
    last = rows[-1]["date"]
    by_index = defaultdict(list)
    for r in rows:
        if r["date"] == last:
            by_index[r["index"]].append(r)
    best = {index: max(r["recalls"]["1"] for r in runs) for index, runs in by_index.items()}
    faiss_best = max(v for k, v in best.items() if "," in k)      # faiss factory strings
    levels = sorted({0.2, 0.3, round(faiss_best, 3), 0.5})
    print("| index | best R@1 | " + " | ".join(f"queries/s at R@1 >= {v:.3f}" for v in levels) + " |")
    print("|---|---|" + "---|" * len(levels))
    for index, runs in by_index.items():
        cells = []
        for level in levels:
            qps = [r["qps"] for r in runs if r["recalls"]["1"] >= level - 1e-9]
            cells.append(f"{max(qps):,.0f}" if qps else "not reached")
        print(f"| {index} | {best[index]:.3f} | " + " | ".join(cells) + " |")


def ivfpq(rows: list[dict], probes=(1, 5, 20, 100, 200)) -> None:
    """One row per index: k-recall@k / queries per second at a few ``n_probes``."""
    k = rows[-1]["k"]
    key = f"{k}-recall@{k}"
    latest = {(r["index"], r["n_probes"]): r for r in rows}
    indexes = sorted({i for i, _ in latest}, key=lambda i: (latest[(i, probes[0])]["pq_dim"],
                                                             latest[(i, probes[0])]["bytes_per_vector"], i))
    print("| index | bytes/vector | " + " | ".join(f"n_probes={n}" for n in probes) + " |")
    print("|---|---|" + "---|" * len(probes))
    for index in indexes:
        cells = [f"{latest[(index, n)][key]:.3f} / {latest[(index, n)]['qps'] / 1000:.1f}k"
                 if (index, n) in latest else "" for n in probes]
        print(f"| {index} | {latest[(index, probes[0])]['bytes_per_vector']} | " + " | ".join(cells) + " |")


def scale(rows: list[dict]) -> None:
    """Per stage: µs per vector and peak memory (process-owned / all resident) at each N,
    and the growth of the per-vector time from the smallest to the largest N."""
    latest = {(r["stage"], r["N"]): r for r in rows if r.get("result") and r["stage"] != "encode_kivf"}
    sizes = sorted({n for _, n in latest})
    print("| stage | " + " | ".join(f"N={n:.0e}" for n in sizes) + " | µs per vector, largest N / smallest N |")
    print("|---|" + "---|" * (len(sizes) + 1))
    for stage in dict.fromkeys(s for s, _ in latest):
        cells, times = [], []
        for n in sizes:
            r = latest.get((stage, n))
            if r is None:
                cells.append("")
                continue
            times.append(r["result"]["us_per_vector"])
            cells.append(f"{times[-1]:.3g} µs, {r['peak_anon_mb']:.0f} / {r['peak_rss_mb']:.0f} MB")
        print(f"| {stage} | " + " | ".join(cells) + f" | {times[-1] / times[0]:.2f} |")
    for r in rows:
        if r["stage"] == "encode_kivf" and r.get("result"):
            for k in r["result"]:
                print(f"- encode, qinco2-S A=16 B=32, ivf_K={k['ivf_K']}: {k['us_per_vector'] / 1e3:.1f} ms per vector "
                      f"({k['n']} vectors)")


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    {"ivf_search": ivf_search, "ivfpq": ivfpq, "scale": scale}.get(rows[-1].get("bench"), codecs)(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/codecs.jsonl")
