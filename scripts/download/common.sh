# Helpers shared by the download scripts (sourced, not run).
# Each helper writes DEST.part first and renames it when complete, and skips a
# DEST that already exists, so an interrupted download can simply be rerun.

QINCO2_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# fetch URL DEST: download a whole file.
fetch() {
  local url=$1 dest=$2
  if [[ -e "$dest" ]]; then echo "exists, skipped: $dest"; return; fi
  echo "downloading $url -> $dest"
  curl -fL --retry 3 -o "$dest.part" "$url"
  mv "$dest.part" "$dest"
}

# fetch_gunzip URL DEST: download a .gz file and store it uncompressed.
fetch_gunzip() {
  local url=$1 dest=$2
  if [[ -e "$dest" ]]; then echo "exists, skipped: $dest"; return; fi
  echo "downloading $url | gunzip -> $dest"
  curl -fL --retry 3 "$url" | gunzip -c > "$dest.part"
  mv "$dest.part" "$dest"
}

# fetch_prefix URL DEST BYTES [gz]: keep only the first BYTES bytes of the
# (optionally gunzipped) stream. head ends the pipe early, so curl/gunzip stop
# on SIGPIPE: their status is ignored and the size is checked instead.
fetch_prefix() {
  local url=$1 dest=$2 bytes=$3 gz=${4:-}
  if [[ -e "$dest" ]]; then echo "exists, skipped: $dest"; return; fi
  echo "downloading the first $bytes bytes of $url -> $dest"
  set +o pipefail
  if [[ "$gz" == gz ]]; then
    curl -sfL "$url" | gunzip -c 2>/dev/null | head -c "$bytes" > "$dest.part"
  else
    curl -sfL "$url" | head -c "$bytes" > "$dest.part"
  fi
  set -o pipefail
  local got
  got=$(wc -c < "$dest.part" | tr -d ' ')
  if [[ "$got" != "$bytes" ]]; then
    echo "error: got $got bytes of $url, expected $bytes" >&2
    return 1
  fi
  mv "$dest.part" "$dest"
}

# fbin_to_fvecs SRC DEST: convert a big-ann-benchmarks .fbin file to .fvecs (written
# atomically by qinco2.formats), then delete SRC.
fbin_to_fvecs() {
  local src=$1 dest=$2
  if [[ -e "$dest" ]]; then echo "exists, skipped: $dest"; return; fi
  echo "converting $src -> $dest"
  PYTHONPATH="$QINCO2_REPO${PYTHONPATH:+:$PYTHONPATH}" python -c \
    'import sys; from qinco2.formats import fbin_to_fvecs; fbin_to_fvecs(sys.argv[1], sys.argv[2], chunk_rows=1_000_000, progress=True)' \
    "$src" "$dest"
  rm -f "$src"
}
