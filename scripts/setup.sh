#!/usr/bin/env bash
# Installs the Python side of the ONNX tests into .venv: `onnx` (its checker validates every model
# the exporter writes) and the `onnxruntime==1.31.1` wheel, whose libonnxruntime.so.1.31.1 the
# `ort` crate loads at run time (load-dynamic), plus numpy.
#
# Also installs, when missing, what the default `mpi` feature (data-parallel training under
# `mpirun`) needs to build and run: Debian's libopenmpi-dev, openmpi-bin and libclang-dev (apt-get,
# through sudo when not root).
#
# Idempotent and quiet when everything is already installed. CI runs it before `cargo test`.
# Usage: scripts/setup.sh [PYTHON]   (default: python3)
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-python3}"

# --- MPI (the default `mpi` cargo feature: OpenMPI through the `mpi` crate, bindings by bindgen).
MPI_PKGS="libopenmpi-dev openmpi-bin libclang-dev"
have_libclang() {
    ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* \
        /usr/lib/aarch64-linux-gnu/libclang*.so* 2>/dev/null | grep -q .
}
if ! command -v mpicc >/dev/null || ! command -v mpirun >/dev/null || ! have_libclang; then
    echo "installing $MPI_PKGS (OpenMPI + libclang for the default mpi feature)"
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null; then SUDO=sudo; else
            echo "error: the default mpi feature needs the Debian packages $MPI_PKGS; not root and no sudo: install them, or build with --no-default-features (single process only)" >&2
            exit 1
        fi
    fi
    if ! command -v apt-get >/dev/null \
        || ! $SUDO apt-get update -qq \
        || ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MPI_PKGS >/dev/null; then
        echo "error: could not install the Debian packages $MPI_PKGS (needed by the default mpi feature); install them (or OpenMPI and libclang by other means), or build with --no-default-features" >&2
        exit 1
    fi
fi
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
