#!/usr/bin/env bash
# GPU readiness check: prints nvidia-smi, runs the CUDA tests, then a short GPU benchmark
# (benchmarks/bench_gpu.py: QINCo2-S/-L encoding at A=16 B=32 and training steps/s, IVF-PQ
# build and search at 10^6), each part under a time limit so that the whole takes under
# 8 minutes. Results are appended as JSON lines (the CUDA tests' outcome first).
#
#   bash benchmarks/gpu_check.sh                        # CUDA; appends to benchmarks/results/gpu_check.jsonl
#   bash benchmarks/gpu_check.sh --out FILE             # another results file
#   bash benchmarks/gpu_check.sh --dry-run [--out FILE] # CPU, tiny sizes, seconds (default: a new temporary file)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh    # the same as --dry-run
#   bash benchmarks/gpu_check.sh -- --parts encode      # arguments after -- go to bench_gpu.py
#
# Works from any directory on a copied working tree: the repository root is put on
# PYTHONPATH, so `pip install -e .` is not needed as long as torch, numpy, faiss-cpu, tqdm,
# omegaconf and pytest are installed. $PYTHON chooses the interpreter (default: python).
# GPU_CHECK_TOTAL_S (default 450) is the time the parts share.
# Exit status: 0 all passed; 1 a CUDA test failed (the benchmark still runs); 2 qinco2 or its
# dependencies cannot be imported; 3 no CUDA device; 124 a part ran out of time; else the
# benchmark's status.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

DRY="${GPU_CHECK_DRY_RUN:-0}"
OUT_FILE=""
BENCH_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --out) OUT_FILE="$2"; shift 2 ;;
        --out=*) OUT_FILE="${1#--out=}"; shift ;;
        --) shift; BENCH_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done
[[ "$DRY" == 0 || "$DRY" == "" ]] && DRY=0 || DRY=1

TOTAL_S="${GPU_CHECK_TOTAL_S:-450}"
TESTS_S=120
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
if [[ $DRY == 1 ]]; then
    DEVICE=cpu; SCALE=tiny
    [[ -n "$OUT_FILE" ]] || OUT_FILE="$(mktemp "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX.jsonl")"
else
    DEVICE=cuda; SCALE=full
    [[ -n "$OUT_FILE" ]] || OUT_FILE="benchmarks/results/gpu_check.jsonl"
fi
mkdir -p "$(dirname "$OUT_FILE")"

# run "$@" for at most $1 seconds (no limit where coreutils' timeout is missing)
limit() {
    local seconds=$1; shift
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=15 "$seconds" "$@"
    else
        "$@"
    fi
}
left() { echo $((TOTAL_S - SECONDS)); }
section() { printf '\n== %s (%ds elapsed)\n' "$1" "$SECONDS"; }

section "gpu_check: $([[ $DRY == 1 ]] && echo 'DRY RUN on the CPU, tiny sizes' || echo 'CUDA') -> $OUT_FILE"
echo "host $(hostname 2>/dev/null || echo '?'), $(date '+%Y-%m-%dT%H:%M:%S'), repository $ROOT"
if command -v nvidia-smi >/dev/null 2>&1; then
    limit 30 nvidia-smi || echo "nvidia-smi failed (status $?)"
else
    echo "nvidia-smi: not found"
fi

section "imports"
if ! "$PY" -c "
import faiss, numpy, torch
import qinco2
print(f'qinco2 {qinco2.__version__} from {qinco2.__file__}')
print(f'torch {torch.__version__} (CUDA build {torch.version.cuda}), cuda available: {torch.cuda.is_available()}'
      + (f', {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}' if torch.cuda.is_available() else ''))
print(f'numpy {numpy.__version__}, faiss {faiss.__version__}')
"; then
    echo "gpu_check.sh: cannot import qinco2 or its dependencies with $PY (see the error above)." >&2
    echo "  Install them first, e.g. from the repository root: $PY -m pip install -e '.[test]'" >&2
    echo "  (or, with torch/numpy/faiss already present: $PY -m pip install --no-deps -e .)" >&2
    exit 2
fi
if [[ $DRY == 0 ]] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: torch sees no CUDA device (a CPU build of torch, or no driver); nothing to check." >&2
    echo "  Use --dry-run for the CPU check." >&2
    exit 3
fi

section "CUDA tests (at most ${TESTS_S}s)"
# the test files that use CUDA (not this check's own test), their tests whose name says cuda
mapfile -t TEST_FILES < <(grep -l "cuda" tests/test_*.py | grep -v "test_gpu_check.py" || true)
JUNIT="$WORK/cuda_tests.xml"
tests_rc=0
if [[ ${#TEST_FILES[@]} -eq 0 ]]; then
    echo "no test file mentions cuda"; tests_rc=5
elif ! "$PY" -m pytest --version >/dev/null 2>&1; then
    echo "pytest is not installed: CUDA tests not run ($PY -m pip install pytest)"; tests_rc=4
else
    echo "pytest -k cuda ${TEST_FILES[*]}"
    limit "$TESTS_S" "$PY" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -k cuda \
        --junitxml="$JUNIT" "${TEST_FILES[@]}" || tests_rc=$?
fi
echo "CUDA tests: status $tests_rc"

BENCH_S=$(( $(left) - 15 ))
(( BENCH_S >= 30 )) || BENCH_S=30
section "benchmark (at most ${BENCH_S}s)"
bench_rc=0
limit "$BENCH_S" "$PY" benchmarks/bench_gpu.py --device "$DEVICE" --scale "$SCALE" --tf32 both \
    --out "$OUT_FILE" --tests-junit "$JUNIT" --tests-rc "$tests_rc" --budget-s $(( BENCH_S * 3 / 4 )) \
    "${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}" || bench_rc=$?

section "done"
lines=0
[[ -f "$OUT_FILE" ]] && lines=$(wc -l < "$OUT_FILE")
echo "results: $OUT_FILE ($lines lines in all); CUDA tests status $tests_rc, benchmark status $bench_rc"
if (( bench_rc != 0 )); then exit "$bench_rc"; fi
if (( tests_rc != 0 )); then exit 1; fi
exit 0
