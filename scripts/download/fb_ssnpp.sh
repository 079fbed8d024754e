#!/usr/bin/env bash
# FB-ssnpp (256-d, integer values 0..255 in .npy), published with QINCo -> ROOT/fb_ssnpp/,
# for FB_ssnpp1M: training_set10010k.npy (10.01M rows), database1M.npy, queries.npy
# (10k) and ground_truth1M.npy.
#
# usage: bash scripts/download/fb_ssnpp.sh [ROOT]      (ROOT defaults to "data")
set -euo pipefail

if [[ $# -gt 1 || "${1:-}" == -* ]]; then
  echo "usage: bash $0 [ROOT]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dir="${1:-data}/fb_ssnpp"
url=https://dl.fbaipublicfiles.com/QINCo/datasets/FB_ssnpp
mkdir -p "$dir"
for f in queries.npy ground_truth1M.npy database1M.npy training_set10010k.npy; do
  fetch "$url/$f" "$dir/$f"
done
echo "done: $dir"
