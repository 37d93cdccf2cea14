#!/usr/bin/env bash
# The device check: one prepared script for a lent GPU (an H200: fresh machine, no network,
# python3 with torch 2.11 + CUDA 13, triton 3.6, nvcc, pytest, pytest-benchmark, hypothesis).
#
#   bash bench/gpu_check.sh --prepare-deps   # HERE, with network: wheels of the Python test/bench
#                                            # dependencies into bench/.gpu_deps (git-ignored), to carry
#   bash bench/gpu_check.sh                  # THERE, from the repository root: everything below
#
# Steps, each under its own time limit inside one overall deadline (GPU_CHECK_SECONDS, default
# 465 s, so that the whole call fits 8 minutes):
#   1. environment (nvidia-smi, versions); carried wheels installed if a dependency is missing
#   2. build seqkern._C with the CUDA kernels (SEQKERN_CUDA=1, MAX_JOBS = cores)
#   3. pytest tests -m cuda (the GPU tests of every family), then the attention ones with
#      SEQKERN_ATTN_MMA=1 (the opt-in tensor-core kernels of csrc/cuda/attention_mma.cu; their own
#      tests, tests/test_attention_cuda_mma.py, compare them with the reference and the SIMT kernel)
#   4. the GPU benchmark sizes of the family issues (bench/test_bench_*.py --bench-size gpu),
#      one pytest run per family (attention in two: D=128, then D=64), most important first;
#      after attention D=128, its seqkern-cuda and torch-flash cases again with SEQKERN_ATTN_MMA=1
#   5. the report (markdown) of every JSON that came out
# Files under $OUT (at most 8, flat: what the device tool brings back):
#   log.txt, bench_attention_d128.json, bench_attention_d128_mma.json, bench_attention_d64.json,
#   bench_rnn.json, bench_wkv.json, bench_rotary.json, report.md
# Back here, the plots and bench/results/h200/ come from the JSONs:
#   python bench/report.py <files_at>/bench_*.json --out bench/results/h200
# A step that fails or runs out of time is logged and the next one still runs; the exit
# status is that of the first failed step (0 if none).
# GPU_CHECK_DRY=1 rehearses the flow on a machine without a GPU: no build (the existing
# seqkern._C is kept), tests -m cuda (all skipped), benchmarks on the CPU at the quick sizes.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEPS=bench/.gpu_deps

if [ "${1:-}" = "--prepare-deps" ]; then
  # Pure-Python wheels only (no platform tags needed); --no-deps: each needed one is named.
  mkdir -p "$DEPS"
  $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEPS" \
      pytest pluggy iniconfig packaging pytest-benchmark py-cpuinfo hypothesis sortedcontainers attrs || exit 1
  ls -l "$DEPS"
  echo "carry bench/.gpu_deps with the device call (it is git-ignored)"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_SECONDS:-465}))
STATUS=0
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET SEQKERN_BACKEND  # real Triton on the GPU; automatic backend choice

say() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME MAX_SECONDS RESERVE_SECONDS CMD...: runs CMD with a limit of
# min(MAX, time left - RESERVE) seconds (SIGINT first, so pytest still writes its JSON;
# killed 15 s later), output appended to the log.
step() {
  local name=$1 max=$2 reserve=$3
  shift 3
  local lim=$(( $(left) - reserve ))
  [ "$lim" -gt "$max" ] && lim=$max
  if [ "$lim" -lt 10 ]; then
    say "SKIP $name: no time left"
    [ "$STATUS" = 0 ] && STATUS=124
    return 124
  fi
  say "BEGIN $name (limit ${lim}s)"
  set -o pipefail
  timeout -s INT -k 15 "$lim" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  set +o pipefail
  say "END $name rc=$rc"
  if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then STATUS=$rc; fi
  return $rc
}

# 1. environment -----------------------------------------------------------
say "repository $ROOT, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), python $(command -v $PY)"
step env 30 400 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; \
  nvcc --version | tail -2; \
  $PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; \
  $PY -c 'import triton; print(\"triton\", triton.__version__)'"
missing=$($PY - <<'EOF'
import importlib.util
print(" ".join(m for m in ("pytest", "pytest_benchmark", "hypothesis") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  if ls $DEPS/*.whl >/dev/null 2>&1; then
    say "missing: $missing; installing the carried wheels of $DEPS into /tmp/seqkern_site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/seqkern_site $DEPS/*.whl >>"$LOG" 2>&1
    export PYTHONPATH=/tmp/seqkern_site${PYTHONPATH:+:$PYTHONPATH}
  else
    say "missing: $missing and no wheels in $DEPS (run bench/gpu_check.sh --prepare-deps here and carry $DEPS)"
  fi
fi

# 2. build -----------------------------------------------------------------
DEVICE=cuda SIZE=gpu
if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
  DEVICE=cpu SIZE=quick
  say "dry run: no build, benchmarks on the CPU at the quick sizes"
else
  export SEQKERN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  rm -f seqkern/_C*.so  # never a stale CPU-only build carried from elsewhere
  step build 240 180 $PY setup.py build_ext --inplace
fi
$PY -c "import seqkern, json; from seqkern import backends as B; print('cuda kernels built:', B.extension_has_cuda()); print(json.dumps(seqkern.backends(), indent=1))" 2>&1 | tee -a "$LOG"

# 3. GPU tests -------------------------------------------------------------
step tests 90 150 $PY -m pytest tests -m cuda -k "not attention_mma" -q -p no:cacheprovider -o addopts= -rfE \
  --durations=10
# tests/test_attention_cuda_mma.py sets SEQKERN_ATTN_MMA itself (MMA against reference and SIMT)
step "tests mma" 45 140 env SEQKERN_ATTN_MMA=1 $PY -m pytest tests -m cuda -k "attention or sdpa" -q \
  -p no:cacheprovider -o addopts= -rfE --durations=5

# 4. benchmarks: the family issues' GPU sizes ------------------------------
bench() {  # bench NAME MAX RESERVE FAMILY [extra seqkern-bench args]
  local name=$1 max=$2 reserve=$3 fam=$4
  shift 4
  # the -k filters name GPU-size cases (D128, D64) that the quick CPU sizes do not have
  [ "${GPU_CHECK_DRY:-0}" = 1 ] && set --
  step "bench $name" "$max" "$reserve" $PY -m seqkern.cli bench --family "$fam" --device $DEVICE --size $SIZE \
    --max-time "${GPU_CHECK_MAX_TIME:-0.05}" --min-rounds 2 --no-report --out /tmp/seqkern_bench_$name \
    --json "$OUT/bench_$name.json" "$@"
}
bench attention_d128 70 105 attention -k D128
SEQKERN_ATTN_MMA=1 bench attention_d128_mma 45 80 attention -k "D128 and (seqkern-cuda or torch-flash)"
bench rnn 50 60 rnn
bench wkv 50 45 wkv
bench attention_d64 35 25 attention -k D64
bench rotary 25 5 rotary

# 5. report ----------------------------------------------------------------
jsons=$(ls "$OUT"/bench_*.json 2>/dev/null)
if [ -n "$jsons" ]; then
  $PY bench/report.py $jsons --out /tmp/seqkern_report --no-plots >/dev/null 2>>"$LOG" \
    && cp /tmp/seqkern_report/report.md "$OUT/report.md"
fi
say "done, status $STATUS; files: $(ls "$OUT" | tr '\n' ' ')"
if [ -f "$OUT/report.md" ]; then
  sed -n '/^## Headline/,/^## /p' "$OUT/report.md"
fi
exit $STATUS
