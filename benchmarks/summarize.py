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
    """The Pareto-optimal operating points of the last run, per index."""
    last = rows[-1]["date"]
    by_index = defaultdict(list)
    for r in rows:
        if r["date"] == last and r["pareto"]:
            by_index[r["index"]].append(r)
    print("| index | parameters | R@1 | R@10 | R@100 | queries/s |")
    print("|---|---|---|---|---|---|")
    for index, runs in by_index.items():
        for r in sorted(runs, key=lambda r: r["recalls"]["1"]):
            params = ", ".join(f"{k}={v}" for k, v in r["parameters"].items())
            print(f"| {index} | {params} | {r['recalls']['1']:.3f} | {r['recalls']['10']:.3f} "
                  f"| {r['recalls']['100']:.3f} | {r['qps']:,.0f} |")


def ivfpq(rows: list[dict]) -> None:
    k = rows[-1]["k"]
    key = f"{k}-recall@{k}"
    latest = {(r["index"], r["n_probes"]): r for r in rows}
    print(f"| index | bytes/vector | n_probes | {key} | R@1 | queries/s |")
    print("|---|---|---|---|---|---|")
    for (index, n_probes), r in sorted(latest.items(), key=lambda kv: (kv[1]["pq_dim"], kv[0][0], kv[0][1])):
        print(f"| {index} | {r['bytes_per_vector']} | {n_probes} | {r[key]:.4f} | {r['R@1']:.3f} | {r['qps']:,.0f} |")


def main(path: str) -> None:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    {"ivf_search": ivf_search, "ivfpq": ivfpq}.get(rows[-1].get("bench"), codecs)(rows)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/codecs.jsonl")
