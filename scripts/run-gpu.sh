#!/usr/bin/env bash
# Runs the CUDA binary built by scripts/build-cuda.sh on a GPU machine that has the NVIDIA driver
# and PyTorch (cu13): the CUDA libraries (cuBLAS, cuRAND, NVRTC, cudart) come from PyTorch's
# environment, so nothing else is installed or copied.
#
#   scripts/run-gpu.sh train teacher --device cuda --precision bf16 ...
#   scripts/run-gpu.sh bench --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${DISTILL_BIN:-.gpu/distill}"
[ -x "$BIN" ] || { echo "error: $BIN not found: build it with scripts/build-cuda.sh" >&2; exit 1; }
PY="${PYTHON:-python3}"
NV=$("$PY" -c "import nvidia, os; print(os.path.dirname(nvidia.__file__))" 2>/dev/null || true)
[ -n "$NV" ] || { echo "error: no PyTorch CUDA libraries (python package 'nvidia') for $PY" >&2; exit 1; }
# Newer wheels keep everything in nvidia/cu13/lib; older ones one lib/ per package.
LIBS=$(find "$NV" -maxdepth 3 -type d -name lib | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
exec "$BIN" "$@"
