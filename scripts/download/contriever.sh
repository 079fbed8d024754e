#!/usr/bin/env bash
# Contriever embeddings (768-d, float16 .npy), published with QINCo -> ROOT/contriever/,
# for contriever1M: training_set.npy (about 20M rows), database1M.npy, queries.npy
# (10k) and ground_truth1M.npy.
#
# usage: bash scripts/download/contriever.sh [ROOT]      (ROOT defaults to "data")
set -euo pipefail

if [[ $# -gt 1 || "${1:-}" == -* ]]; then
  echo "usage: bash $0 [ROOT]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dir="${1:-data}/contriever"
url=https://dl.fbaipublicfiles.com/QINCo/datasets/ContrieverEmb
mkdir -p "$dir"
for f in queries.npy ground_truth1M.npy database1M.npy training_set.npy; do
  fetch "$url/$f" "$dir/$f"
done
echo "done: $dir"
