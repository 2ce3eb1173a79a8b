#!/usr/bin/env bash
# Installs PyTorch (CPU use; the default wheel also ships CUDA libraries, ~4 GB) plus
# safetensors, numpy, diffusers, transformers and peft into .venv-bench, for `distill bench` to compare candle with
# PyTorch and for scripts/make-diffusers-fixtures.py (the diffusers parity fixtures).
# Bench-only: CI and the main build never need torch.
#
# Usage: scripts/setup-bench.sh [PYTHON]   (default: python3)
# Afterwards `distill bench` finds .venv-bench/bin/python automatically; point
# DISTILL_TORCH_PYTHON at another interpreter to use a different torch.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${1:-python3}"
VENV=.venv-bench

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
# Plain `pip install torch`: `--no-deps` leaves torch unable to import.
"$VENV/bin/python" -m pip install torch safetensors numpy diffusers transformers peft
"$VENV/bin/python" - <<'PY'
import torch, safetensors, numpy, diffusers, transformers, peft
print(f"torch {torch.__version__} (threads {torch.get_num_threads()}), "
      f"safetensors {safetensors.__version__}, numpy {numpy.__version__}, "
      f"diffusers {diffusers.__version__}")
PY
echo "ok: $(pwd)/$VENV/bin/python"
