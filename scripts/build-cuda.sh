#!/usr/bin/env bash
# Builds the CUDA binary of distill (`--features cuda`) on a machine WITHOUT a GPU, for a GPU
# machine that has an NVIDIA driver and PyTorch's CUDA libraries (see ../shared/GPU.md).
#
#   scripts/build-cuda.sh [COMPUTE_CAP]          # default 90 (H100/H200); 80 = A100, 89 = L4/4090
#   scripts/build-cuda.sh [COMPUTE_CAP] --nccl   # + data-parallel CUDA ranks (features nccl + mpi)
#
# 1. nvcc, headers and the CUDA libraries from PyPI into .cuda/ (a venv), pinned to CUDA 13.0 so
#    the PTX runs on driver 580 (CUDA 13.0); newer wheels emit PTX that driver cannot load.
# 2. Link stubs: cudarc links libcuda/cublas/curand/nvrtc/cudart dynamically; the linker needs
#    unversioned names, and there is no driver here, so libcuda.so is a generated stub exporting
#    every cu* symbol cudarc's bindings reference (the real driver is used at run time).
# 3. cargo build --release --features cuda into target-cuda/, and copies the binary to .gpu/distill;
#    with --nccl: --features nccl (NCCL between the GPUs, MPI for the rest; links libnccl from the
#    nvidia-nccl-cu13 wheel and OpenMPI's libmpi, so the machine that runs it needs both) into
#    .gpu/distill-nccl, for `mpirun -np N distill --device cuda train ...` on N GPUs.
# 4. Packs it as .gpu/distill.xz (xz -9e): the file scripts/gpu-check.sh unpacks on the GPU
#    machine, which takes at most 64 MiB of carried files (the stripped binary alone does not fit).
#
# Running it on the GPU machine: scripts/run-gpu.sh (sets LD_LIBRARY_PATH to PyTorch's CUDA libs).
# About 15 minutes on 2 cores (mostly ptxas on candle's kernels) and ~1.5 GB of wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
NCCL_BUILD=0
ARGS=()
for a in "$@"; do
    if [ "$a" = "--nccl" ]; then NCCL_BUILD=1; else ARGS+=("$a"); fi
done
CAP="${ARGS[0]:-${CUDA_COMPUTE_CAP:-90}}"
PY="${PYTHON:-python3}"
VENV=.cuda

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-nccl-cu13==2.30.7

ROOT=$(ls -d "$(pwd)"/$VENV/lib/python3*/site-packages/nvidia/cu13 | head -n1)
[ -x "$ROOT/bin/nvcc" ] || { echo "error: nvcc not found under $ROOT/bin" >&2; exit 1; }
echo "CUDA_ROOT=$ROOT ($("$ROOT/bin/nvcc" --version | tail -n2 | head -n1))"

# Link stubs in a folder cudarc searches ($CUDA_ROOT/lib/stubs).
STUBS="$ROOT/lib/stubs"
mkdir -p "$STUBS"
for lib in cublas cublasLt curand nvrtc cudart; do
    f=$(ls "$ROOT"/lib/lib$lib.so.* 2>/dev/null | sort | tail -n1 || true)
    [ -n "$f" ] || { echo "error: lib$lib.so.* missing in $ROOT/lib" >&2; exit 1; }
    ln -sf "$f" "$STUBS/lib$lib.so"
done
# NCCL (data-parallel training on CUDA ranks) comes in its own wheel, outside cu13/.
NCCL=$(ls "$(pwd)"/$VENV/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.* 2>/dev/null | sort | tail -n1 || true)
[ -n "$NCCL" ] || { echo "error: libnccl.so.* missing (the nvidia-nccl-cu13 wheel)" >&2; exit 1; }
ln -sf "$NCCL" "$STUBS/libnccl.so"
# Fetch the crates so cudarc's sources are on disk, then stub every driver symbol they name.
cargo fetch --quiet
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.* | sort | tail -n1)
grep -rhoE '\bcu[A-Z][A-Za-z0-9_]*(_v[0-9]+)?\b' "$CUDARC/src/driver/sys" \
    | sort -u | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$STUBS/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/libcuda_stub.c"
ln -sf libcuda.so "$STUBS/libcuda.so.1"

export CUDA_ROOT="$ROOT" CUDA_PATH="$ROOT" CUDA_COMPUTE_CAP="$CAP" CUDARC_CUDA_VERSION=13000
export PATH="$ROOT/bin:$PATH"
export LIBRARY_PATH="$STUBS:$ROOT/lib:${LIBRARY_PATH:-}"
if [ "$NCCL_BUILD" = 1 ]; then
    # NCCL for the gradients of CUDA ranks, MPI (the default feature) for the rest.
    cargo build --release --features nccl --target-dir target-cuda
    mkdir -p .gpu
    cp target-cuda/release/distill .gpu/distill-nccl
    strip .gpu/distill-nccl || true
    echo "built .gpu/distill-nccl for compute capability $CAP ($(du -h .gpu/distill-nccl | cut -f1)); launch with mpirun -np N .gpu/distill-nccl --device cuda train ..."
    exit 0
fi
# Without the default `mpi` feature: the lent GPU machine has no libmpi.so to load (one GPU: no
# data-parallel ranks there; --nccl builds those).
cargo build --release --no-default-features --features cuda --target-dir target-cuda
mkdir -p .gpu
cp target-cuda/release/distill .gpu/distill
strip .gpu/distill || true
echo "built .gpu/distill for compute capability $CAP ($(du -h .gpu/distill | cut -f1)); run it with scripts/run-gpu.sh"
xz -T2 -9e -k -f .gpu/distill
echo "packed .gpu/distill.xz ($(du -b .gpu/distill.xz | cut -f1) bytes); carry it to the GPU machine for scripts/gpu-check.sh"
bash scripts/gpu-check.sh --check-carry
