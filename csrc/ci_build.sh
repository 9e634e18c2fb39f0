#!/usr/bin/env bash
# CI build of the kernels (called by .ci/run). Exits non-zero on any failure.
#  1. compiles and links every csrc/*.cu with nvcc for sm_80 and sm_90 into the CUDA library
#     (no GPU needed) and checks that it exports the C API with the expected ABI version;
#  2. builds the CPU library (g++ -O3 -fopenmp -shared -fPIC) and runs tests/test_kernels.py,
#     which checks it bit for bit against the PyTorch reference (CUDA tests skip without a GPU).
# Set DISTRAIN_CI_SKIP_CUDA=1 only on a runner that has no CUDA toolkit at all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [ "${DISTRAIN_CI_SKIP_CUDA:-0}" != "1" ]; then
  if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ]; then
    echo "ci_build: nvcc not found (install the CUDA toolkit or set CUDA_HOME)" >&2
    exit 1
  fi
  echo "== CUDA library (sm_80, sm_90) =="
  "$PY" -m distrain.comm.kernels.build --cpu=no --cuda=yes --arch 80,90 --force --verbose
  "$PY" - <<'PYEOF'
import ctypes
from distrain.comm.kernels import _lib, build
lib = ctypes.CDLL(str(build.lib_dir() / build.CUDA_LIB))
for name in _lib._SIGNATURES["cuda"]:
    getattr(lib, name)  # AttributeError if a symbol is missing
assert lib.dl_abi_version() == _lib.ABI_VERSION, "ABI version mismatch"
print("cuda library: all symbols present, ABI", _lib.ABI_VERSION)
PYEOF
fi

echo "== CPU library =="
"$PY" -m distrain.comm.kernels.build --cpu=yes --cuda=no --force --verbose
