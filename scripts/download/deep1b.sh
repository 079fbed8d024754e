#!/usr/bin/env bash
# Deep1B (96-d float32 CNN descriptors) -> ROOT/deep1b/, for deep1M and deep1B.
# The vectors come as .fbin files from Yandex storage and are converted to .fvecs;
# the ground truth files are the ones published with QINCo.
#
# usage: bash scripts/download/deep1b.sh [-small] [ROOT]      (ROOT defaults to "data")
#   full:   learn.fvecs (350M), base.fvecs (1B), deep1B_queries.fvecs (10k),
#           deep1M_groundtruth.ivecs, deep1B_groundtruth.ivecs; about 520 GB, and the
#           conversion needs the .fbin file and the .fvecs file on disk at once
#   -small: the first 10,010,000 learn vectors, the first 1,000,000 base vectors,
#           the queries and deep1M_groundtruth.ivecs: enough for deep1M (about 4.3 GB)
set -euo pipefail

small=0
if [[ "${1:-}" == "-small" ]]; then small=1; shift; fi
if [[ $# -gt 1 || "${1:-}" == -* ]]; then
  echo "usage: bash $0 [-small] [ROOT]" >&2
  exit 2
fi
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

dir="${1:-data}/deep1b"
yandex=https://storage.yandexcloud.net/yandex-research/ann-datasets/DEEP
qinco=https://dl.fbaipublicfiles.com/QINCo/datasets/deep1b
dim=96
mkdir -p "$dir"

# fbin_prefix URL DEST ROWS: the first ROWS vectors of a remote .fbin file, with
# the row count in its 8-byte header (uint32 n, uint32 d) set to ROWS.
fbin_prefix() {
  local url=$1 dest=$2 rows=$3
  fetch_prefix "$url" "$dest" $((8 + rows * dim * 4))
  python -c 'import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.write(struct.pack("<I", int(sys.argv[2])))' "$dest" "$rows"
}

if [[ ! -e "$dir/deep1B_queries.fvecs" ]]; then
  fetch "$yandex/query.public.10K.fbin" "$dir/query.public.10K.fbin"
  fbin_to_fvecs "$dir/query.public.10K.fbin" "$dir/deep1B_queries.fvecs"
fi
fetch "$qinco/deep1M_groundtruth.ivecs" "$dir/deep1M_groundtruth.ivecs"

if [[ $small == 1 ]]; then
  if [[ ! -e "$dir/learn.fvecs" ]]; then
    fbin_prefix "$yandex/learn.350M.fbin" "$dir/learn.10M.fbin" 10010000
    fbin_to_fvecs "$dir/learn.10M.fbin" "$dir/learn.fvecs"
  fi
  if [[ ! -e "$dir/base.fvecs" ]]; then
    fbin_prefix "$yandex/base.1B.fbin" "$dir/base.1M.fbin" 1000000
    fbin_to_fvecs "$dir/base.1M.fbin" "$dir/base.fvecs"
  fi
else
  fetch "$qinco/deep1B_groundtruth.ivecs" "$dir/deep1B_groundtruth.ivecs"
  if [[ ! -e "$dir/learn.fvecs" ]]; then
    fetch "$yandex/learn.350M.fbin" "$dir/learn.350M.fbin"
    fbin_to_fvecs "$dir/learn.350M.fbin" "$dir/learn.fvecs"
  fi
  if [[ ! -e "$dir/base.fvecs" ]]; then
    fetch "$yandex/base.1B.fbin" "$dir/base.1B.fbin"
    fbin_to_fvecs "$dir/base.1B.fbin" "$dir/base.fvecs"
  fi
fi
echo "done: $dir"
