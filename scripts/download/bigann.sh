#!/usr/bin/env bash
# BigANN (texmex ANN_SIFT1B, 128-d uint8 SIFT) -> ROOT/bigann/, for bigann1M and bigann1B.
#
# usage: bash scripts/download/bigann.sh [-small] [ROOT]      (ROOT defaults to "data")
#   full:   bigann_learn.bvecs (100M), bigann_base.bvecs (1B), bigann_query.bvecs (10k),
#           gnd/idx_*.ivecs (ground truth for 1M ... 1000M); about 150 GB uncompressed
#   -small: the first 10,010,000 learn vectors, the first 1,000,000 base vectors,
#           the queries and gnd/idx_1M.ivecs: enough for bigann1M (about 1.5 GB)
set -euo pipefail

small=0
if [[ "${1:-}" == "-small" ]]; then small=1; shift; fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
  echo "usage: bash $0 [-small] [ROOT]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dir="${1:-data}/bigann"
texmex=ftp://ftp.irisa.fr/local/texmex/corpus
qinco=https://dl.fbaipublicfiles.com/QINCo/datasets/bigann
record=132  # bytes per .bvecs record: int32 dimension + 128 uint8
mkdir -p "$dir/gnd"

fetch_gunzip "$texmex/bigann_query.bvecs.gz" "$dir/bigann_query.bvecs"

if [[ $small == 1 ]]; then
  fetch_prefix "$texmex/bigann_learn.bvecs.gz" "$dir/bigann_learn.bvecs" $((10010000 * record)) gz
  fetch_prefix "$texmex/bigann_base.bvecs.gz" "$dir/bigann_base.bvecs" $((1000000 * record)) gz
  fetch "$qinco/gnd/idx_1M.ivecs" "$dir/gnd/idx_1M.ivecs"
else
  fetch_gunzip "$texmex/bigann_learn.bvecs.gz" "$dir/bigann_learn.bvecs"
  fetch_gunzip "$texmex/bigann_base.bvecs.gz" "$dir/bigann_base.bvecs"
  if [[ ! -e "$dir/gnd/idx_1000M.ivecs" ]]; then
    # the archive holds idx_<size>.ivecs (neighbour ids) and dis_<size>.fvecs (distances)
    # for size 1M ... 1000M, inside a gnd/ folder; move them to $dir/gnd/ whatever the layout
    echo "downloading $texmex/bigann_gnd.tar.gz -> $dir/gnd/"
    rm -rf "$dir/gnd.part" && mkdir -p "$dir/gnd.part"
    curl -fL --retry 3 "$texmex/bigann_gnd.tar.gz" | tar -xz -C "$dir/gnd.part"
    find "$dir/gnd.part" -type f \( -name '*.ivecs' -o -name '*.fvecs' \) -exec mv {} "$dir/gnd/" \;
    rm -rf "$dir/gnd.part"
  fi
  for f in idx_1M.ivecs idx_1000M.ivecs; do
    [[ -e "$dir/gnd/$f" ]] || { echo "error: $dir/gnd/$f missing after extraction" >&2; exit 1; }
  done
fi
echo "done: $dir"
