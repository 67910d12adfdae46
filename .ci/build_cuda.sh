#!/usr/bin/env bash
# Proves that the CUDA path of fastlddmm._C compiles and links, on a machine with nvcc but no GPU (CI).
# The default `pip install .` there stays CPU-only (see CMakeLists.txt), so this script builds the module
# with FASTLDDMM_CUDA=1 through the project's own CMakeLists.txt in a scratch directory (never touching
# the installed package), for sm_80 and sm_90, then imports it and checks that has_cuda() is True.
# ptxas runs with -v: a kernel instantiation that spills registers (any "N bytes spill stores/loads" with
# N > 0, for either architecture) fails the script, with the offending kernels listed.
#
# Usage: .ci/build_cuda.sh [BUILD_DIR]       (run from anywhere, with the project's Python environment active)
# Env:   FASTLDDMM_CUDA_ARCH (default "80-real;90-real"), CUDACXX (default: nvcc on PATH)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${1:-$(mktemp -d -t fastlddmm-cuda-build.XXXXXX)}"
ARCHS="${FASTLDDMM_CUDA_ARCH:-80-real;90-real}"
PYTHON="${PYTHON:-python}"

command -v "${CUDACXX:-nvcc}" >/dev/null || { echo "build_cuda.sh: nvcc not found (set CUDACXX or PATH)" >&2; exit 2; }
"${CUDACXX:-nvcc}" --version | tail -n 2

PYBIND11_DIR="$("$PYTHON" -m pybind11 --cmakedir)"
echo "== configure (FASTLDDMM_CUDA=1, archs ${ARCHS}) in ${BUILD_DIR}"
FASTLDDMM_CUDA=1 cmake -S "$ROOT" -B "$BUILD_DIR" \
  -DSKBUILD_PROJECT_NAME=fastlddmm \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" \
  -DCMAKE_CUDA_FLAGS="--threads 0 -Xptxas -v" \
  -Dpybind11_DIR="$PYBIND11_DIR" \
  -DPython_EXECUTABLE="$(command -v "$PYTHON")"

echo "== build"
# --clean-first: ptxas reports only what it compiles, so an up-to-date object would hide its spills.
cmake --build "$BUILD_DIR" --parallel "$(nproc)" --clean-first 2>&1 | tee "$BUILD_DIR/build.log"

echo "== register spills (ptxas -v)"
"$PYTHON" - "$BUILD_DIR/build.log" <<'PY'
import re
import sys

log = open(sys.argv[1], errors="replace").read()
# ptxas -v: "Compiling entry function '<name>' for 'sm_XX'" ... "N bytes stack frame, S bytes spill stores, L bytes spill loads"
entries = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'(.*?)bytes spill stores, (\d+) bytes spill loads", log, re.S)
if not entries:
    sys.exit("build_cuda.sh: no ptxas -v report in the build log (was -Xptxas -v passed to nvcc?)")
bad = []
for name, arch, body, loads in entries:
    stores = re.findall(r"(\d+)\s*$", body.strip())
    if (stores and int(stores[-1])) or int(loads):
        bad.append(f"{arch} {name}: {stores[-1] if stores else '?'} bytes spill stores, {loads} bytes spill loads")
# Belt and braces: any spill figure in the log (a device function's, say) fails too, attributed or not.
stray = [m for m in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log) if int(m[0]) or int(m[1])]
if stray and not bad:
    bad.append(f"{len(stray)} ptxas reports with spills outside the entry functions' reports")
print(f"build_cuda.sh: {len(entries)} kernel compilations checked, {len(bad)} with register spills")
if bad:
    print("\n".join(bad))
    sys.exit(1)
PY

MODULE="$(ls "$BUILD_DIR"/_C*.so)"
echo "== built ${MODULE}"
# Every architecture asked for must be embedded in the fat binary. cuobjdump: the CUDA toolkit's, else the one
# bundled in the triton wheel (when triton is installed).
CUOBJDUMP="$(command -v cuobjdump || "$PYTHON" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))' 2>/dev/null || true)"
if [ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ]; then
  ELFS="$("$CUOBJDUMP" --list-elf "$MODULE")"
  echo "$ELFS"
  for a in ${ARCHS//;/ }; do
    grep -q "sm_${a%%-*}" <<<"$ELFS" || { echo "build_cuda.sh: sm_${a%%-*} missing from the fat binary" >&2; exit 1; }
  done
else
  echo "build_cuda.sh: no cuobjdump (CUDA toolkit or triton wheel): the fat binary's architectures are not checked"
fi
# Importing needs no GPU (the static CUDA runtime loads the driver only on first use).
PYTHONPATH="$BUILD_DIR" "$PYTHON" - <<'PY'
import importlib

mod = importlib.import_module("_C")
assert mod.has_cuda(), "module was built without the CUDA kernels"
for name in ("euler_flow_forward_cuda", "euler_flow_backward_cuda", "euler_flow_forward_cpu"):
    assert hasattr(mod, name), name
print("build_cuda.sh: OK, has_cuda() =", mod.has_cuda(), "CUDA_MAX_DIM =", mod.CUDA_MAX_DIM)
PY
