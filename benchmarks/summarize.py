"""Print the latest benchmark rows of a JSON-lines file as markdown tables.

    python benchmarks/summarize.py benchmarks/results/codecs.jsonl
    python benchmarks/summarize.py benchmarks/results/ivf_search.jsonl
    python benchmarks/summarize.py benchmarks/results/ivfpq.jsonl
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


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    {"ivf_search": ivf_search, "ivfpq": ivfpq}.get(rows[-1].get("bench"), codecs)(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/codecs.jsonl")
