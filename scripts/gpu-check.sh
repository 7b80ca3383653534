#!/usr/bin/env bash
# The GPU check (ttaserve/bench/gpu_check.py), under 5 minutes, on a machine with a CUDA GPU
# where torch, triton, onnxruntime-gpu and grpcio are installed and nothing can be
# downloaded. Prints: the Triton kernels against their torch references, their timings, every
# policy's engine stream on the GPU against the CPU, and ONNX Runtime (CUDA provider) against
# torch on CUDA. Runs ttaserve from this checkout (no install).
#   scripts/gpu-check.sh [--json out.json]     on the GPU machine
#   scripts/gpu-check.sh --cpu                 dry run of the same code paths on a CPU
#   PYTHON=/path/to/python                     interpreter to use (default: .venv's if it has torch, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# What the check imports; nothing can be installed on the GPU machine, so say what is missing.
missing=$("$PYTHON" - <<'PY'
import importlib.util
need = ["torch", "numpy", "onnx", "onnxruntime", "safetensors"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu-check: missing Python packages: $missing (install them, or set PYTHON to an interpreter that has them)" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 300 "$PYTHON" -m ttaserve.bench.gpu_check "$@"
