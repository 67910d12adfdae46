#!/usr/bin/env bash
# Downloads, on a machine that reaches PyPI, the wheels that a lent GPU machine lacks (it has no network),
# into a git-ignored folder that the device tool then carries: see benchmarks/README.md, "On a GPU".
#
#   bash benchmarks/fetch_gpu_wheels.sh [DIR]        # DIR defaults to .whl (ignored by .gitignore)
#
# The GPU machines' image ('cuda') runs Python 3.12 with torch 2.11 (CUDA 13), triton 3.6, numpy, scipy,
# cmake, ninja, pybind11, scikit-build-core and hypothesis; what it lacks is pykeops/keopscore, geomloss,
# flash-sinkhorn and meshio. scikit-build-core, pybind11 and hypothesis travel too, at the versions tested
# here, so that the editable build and the tests do not depend on the image's versions. Never torch,
# triton, numpy or any nvidia-* wheel: the image's own must stay. Versions: those of the CPU venv here.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DIR"

# Wheels for CPython 3.12 on x86-64 Linux (the GPU machine), whatever this machine runs.
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=(geomloss==0.3.1 flash-sinkhorn==0.4.1 meshio==5.3.5 scikit-build-core==1.1.2 pybind11==3.1.0
        hypothesis==6.170.17)
# pykeops and keopscore are published as source archives only; they are pure Python (KeOps compiles its
# kernels at run time), so a wheel built here installs there.
SOURCE_ONLY=(pykeops==2.3 keopscore==2.3)

"$PY" -m pip download --no-deps "${TARGET[@]}" -d "$DIR" "${BINARY[@]}"
"$PY" -m pip wheel --no-deps -w "$DIR" "${SOURCE_ONLY[@]}"

status=0
for whl in "$DIR"/pykeops-*.whl "$DIR"/keopscore-*.whl; do
  case "$whl" in
    *-py3-none-any.whl) ;;
    *) echo "error: $whl is not a pure-Python wheel: it would not install on the GPU machine" >&2; status=1 ;;
  esac
done
# pip refuses a folder holding two versions of one package; and the image's torch & co. must stay.
names=$(for whl in "$DIR"/*.whl; do basename "$whl" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort)
if dup=$(echo "$names" | uniq -d) && [ -n "$dup" ]; then
  echo "error: several versions of: $dup in $DIR (keep one of each)" >&2; status=1
fi
if echo "$names" | grep -E -q '^(torch|triton|numpy|nvidia_.*)$'; then
  echo "error: $DIR holds torch, triton, numpy or nvidia-* wheels: remove them (the GPU image has its own)" >&2
  status=1
fi
ls -l "$DIR"
echo "total: $(du -sk "$DIR" | cut -f1) KiB in $DIR (the device tool carries at most 64 MiB with the repo)"
exit $status
