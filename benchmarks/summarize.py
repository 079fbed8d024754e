"""Print the latest codec benchmark rows of a JSON-lines file as a markdown table.

    python benchmarks/summarize.py benchmarks/results/codecs.jsonl
"""

import json
import sys


def main(path: str) -> None:
    latest = {}
    for line in open(path):
        row = json.loads(line)
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


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/codecs.jsonl")
