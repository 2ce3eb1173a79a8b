#!/usr/bin/env bash
# Installs the Python side of the ONNX tests into .venv: `onnx` (its checker validates every model
# the exporter writes) and the `onnxruntime==1.31.1` wheel, whose libonnxruntime.so.1.31.1 the
# `ort` crate loads at run time (load-dynamic), plus numpy.
#
# Idempotent and quiet when everything is already installed. CI runs it before `cargo test`.
# Usage: scripts/setup.sh [PYTHON]   (default: python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-python3}"
VENV=.venv
ORT_VERSION=1.31.1

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    "$PY" -m venv "$VENV"
fi

have() {
    "$VENV/bin/python" - "$ORT_VERSION" <<'PY' 2>/dev/null
import sys
import onnx, onnxruntime, numpy  # noqa: F401
sys.exit(0 if onnxruntime.__version__ == sys.argv[1] else 1)
PY
}

if ! have; then
    echo "installing onnx, onnxruntime==$ORT_VERSION and numpy into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # onnx: any recent version; the exporter avoids GroupNormalization-18 (onnx 1.23's checker
    # rejects it as deprecated), so whichever the index serves works.
    "$VENV/bin/python" -m pip install --quiet onnx "onnxruntime==$ORT_VERSION" numpy
    have || { echo "error: onnx/onnxruntime still not importable from $VENV" >&2; exit 1; }
fi

# The wheel ships only the versioned library name (no libonnxruntime.so symlink).
LIB=$(ls "$(pwd)"/$VENV/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* 2>/dev/null | head -n1 || true)
if [ -z "$LIB" ]; then
    echo "error: libonnxruntime.so* not found under $VENV/lib/python3*/site-packages/onnxruntime/capi" >&2
    exit 1
fi
echo "onnxruntime: $LIB (found automatically; or export ORT_DYLIB_PATH=$LIB)"
