#!/usr/bin/env bash
# Issue 13 on a lent GPU machine (no network there): install the carried wheels, build fastlddmm with its
# CUDA kernels, run the GPU tests, run benchmarks/gpu_distances.py. Logs and results go to $OUT, the folder
# the device tool brings back. How to call it: benchmarks/README.md, "On a GPU".
#
#   bash benchmarks/run_gpu.sh WHEEL_DIR [STAGE ...]     STAGE: setup, test, report, bench (default: setup test bench)
#
# report: benchmarks/kernel_report.py with the machine's own triton (3.6) for sm_90, to check the static
# figures committed from the CPU machine (benchmarks/results/kernel_report.md) against the GPU image's triton.
#
# WHEEL_DIR: the folder benchmarks/fetch_gpu_wheels.sh filled (.whl), carried by the device tool.
# setup is done once per machine: a later stage on the same (warm) machine skips it, a fresh machine redoes
# it (~1-2 min). One device command may run 10 minutes: run "setup test", then "bench", as two calls.
# Environment knobs:
#   OUT                 output folder (set by the device tool; default $TMPDIR/fastlddmm_gpu_out, TMPDIR=/tmp if unset)
#   BENCH_SIZES         N = M values (default "1e4 1e5 1e6")
#   BENCH_BUDGET        seconds the benchmark may start cases in (default 420, to end inside one call)
#   BENCH_ARGS          more gpu_distances.py flags, e.g. "--methods fl-triton flash-sinkhorn --repeat 5"
#   TEST_TIMEOUT        seconds for each of the two pytest runs (default 240)
#   FASTLDDMM_CUDA_ARCH CUDA architectures of the build (default 90: H100 / H200; CMake syntax)
#   FORCE_SETUP=1       redo setup even when it looks done
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${1:?usage: bash benchmarks/run_gpu.sh WHEEL_DIR [setup] [test] [report] [bench]}
shift
STAGES=${*:-setup test bench}
OUT=${OUT:-${TMPDIR:-/tmp}/fastlddmm_gpu_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export FASTLDDMM_CUDA_ARCH=${FASTLDDMM_CUDA_ARCH:-90}
mkdir -p "$OUT"
T0=$SECONDS
log() { echo "[run_gpu +$((SECONDS - T0))s] $*"; }

# KeOps compiles its GPU kernels at run time with nvrtc: it looks for cuda.h / nvrtc.h under CUDA_PATH and
# for libcuda, libnvrtc and libcudart with ctypes.util.find_library (ldconfig's cache).
cuda_env() {
  local nvcc cuda_home
  nvcc=$(command -v nvcc || true)
  if [ -n "$nvcc" ]; then cuda_home=$(dirname "$(dirname "$(readlink -f "$nvcc")")"); else cuda_home=/usr/local/cuda; fi
  for inc in "$cuda_home/include" "$cuda_home/targets/x86_64-linux/include"; do
    if [ -f "$inc/cuda.h" ] && [ -f "$inc/nvrtc.h" ]; then export CUDA_PATH=${CUDA_PATH:-$cuda_home}; break; fi
  done
  # Only on a machine with a GPU (the lent one is bare and given back): never touch a workstation's ldconfig.
  nvidia-smi -L >/dev/null 2>&1 || return 0
  if ! "$PY" -c "import ctypes.util as u, sys; sys.exit(0 if u.find_library('nvrtc') and u.find_library('cudart') else 1)"; then
    local dirs=""
    for d in "$cuda_home/lib64" "$cuda_home/targets/x86_64-linux/lib"; do [ -d "$d" ] && dirs="$dirs$d"$'\n'; done
    if [ -n "$dirs" ] && [ -w /etc/ld.so.conf.d ]; then
      printf '%s' "$dirs" > /etc/ld.so.conf.d/zz-fastlddmm-cuda.conf && ldconfig
      log "added $cuda_home's libraries to ldconfig for KeOps"
    fi
  fi
}

is_set_up() {
  "$PY" - <<EOF 2>/dev/null
import os, sys
import fastlddmm, fastlddmm._C, pykeops, geomloss, flash_sinkhorn, meshio  # noqa: F401
sys.exit(0 if os.path.realpath(fastlddmm.__file__).startswith(os.path.realpath("$PWD")) else 1)
EOF
}

setup() {
  if [ "${FORCE_SETUP:-0}" != 1 ] && is_set_up; then log "setup: already done on this machine"; return 0; fi
  log "setup: installing the carried wheels from $WHEELS"
  ls -l "$WHEELS"/*.whl || { echo "no wheels in $WHEELS: run benchmarks/fetch_gpu_wheels.sh here and carry it"; return 1; }
  # --no-deps: torch, triton and numpy stay the image's own.
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
    "$WHEELS"/*.whl || return 1
  log "setup: building fastlddmm (editable, CUDA architectures $FASTLDDMM_CUDA_ARCH)"
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -v -e . || return 1
  "$PY" -m fastlddmm backends
  log "setup: KeOps self-test on the GPU"
  "$PY" -c "import pykeops; pykeops.test_torch_bindings()" || log "setup: KeOps self-test FAILED (KeOps methods will be skipped with the reason)"
  log "setup: done"
}

environment() {
  {
    date -u; nvidia-smi || true; nvcc --version || true; "$PY" --version
    "$PY" -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|scipy|pykeops|keopscore|geomloss|flash.sinkhorn|fastlddmm|scikit.build.core|pybind11|hypothesis|meshio|pytest) '
    echo "CUDA_PATH=${CUDA_PATH:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  } > "$OUT/environment.txt" 2>&1
}

run_tests() {
  local t=${TEST_TIMEOUT:-240} rc
  log "test: pytest -m gpu (GPU-only tests)"
  timeout "$t" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
  rc=$?; [ $rc = 5 ] && log "test: no test marked gpu was collected"
  # The op files' triton-cuda cases are in the gpu run above (compiled); these check the launchers' tile
  # choices and the dispatch table's rules with a GPU present (on CI they run in the interpreter).
  log "test: launcher-level Triton tests and the dispatch rules with a GPU present"
  timeout "$t" "$PY" -m pytest -m "not gpu" -q -rs -p no:cacheprovider tests/test_triton_gpu.py tests/test_dispatch.py
  log "test: done (exit $?; 124 = over TEST_TIMEOUT)"
}

report() {
  log "report: benchmarks/kernel_report.py --archs 90 with the installed triton"
  "$PY" benchmarks/kernel_report.py --archs 90 --json "$OUT/kernel_report_gpu_machine.json" \
    --markdown "$OUT/kernel_report_gpu_machine.md"
  log "report: done (exit $?)"
}

bench() {
  log "bench: benchmarks/gpu_distances.py --sizes ${BENCH_SIZES:-1e4 1e5 1e6} --budget ${BENCH_BUDGET:-420}"
  # shellcheck disable=SC2086  # sizes and extra flags are word lists on purpose
  "$PY" benchmarks/gpu_distances.py --sizes ${BENCH_SIZES:-1e4 1e5 1e6} --budget "${BENCH_BUDGET:-420}" \
    --output-dir "$OUT" ${BENCH_ARGS:-}
  log "bench: done (exit $?); results in $OUT: copy gpu_distances_*.md/.json into benchmarks/results/"
}

cuda_env
status=0
for stage in $STAGES; do
  case "$stage" in
    setup) setup 2>&1 | tee -a "$OUT/setup.log"; [ "${PIPESTATUS[0]}" = 0 ] || { log "setup failed: see setup.log"; exit 1; } ;;
    test) { setup && run_tests; } 2>&1 | tee -a "$OUT/tests.log" ;;
    report) { setup && report; } 2>&1 | tee -a "$OUT/report.log" ;;
    bench) { setup && bench; } 2>&1 | tee -a "$OUT/bench.log"; status=${PIPESTATUS[0]} ;;
    *) echo "unknown stage $stage (expected setup, test, report or bench)"; exit 2 ;;
  esac
done
environment
log "all done: $(ls "$OUT" | tr '\n' ' ')"
exit $status
