#!/usr/bin/env bash
# Create (first run only) the virtualenv of the peer servers: Triton (nvidia-pytriton),
# MLServer and TorchServe with torch-model-archiver. Their pins never touch ttaserve's .venv.
# Used by scripts/bench-peers.sh (peer benchmark) and scripts/test-slow.sh (TorchServe bridge test).
#   PEERS_VENV   where to create it (default .venv-peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_VENV=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}

stamp="$PEERS_VENV/.peers-installed-$(sha256sum "$0" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "==> installing the peer servers into $PEERS_VENV"
  [ -x "$PEERS_VENV/bin/python" ] || "$PYTHON" -m venv "$PEERS_VENV"
  "$PEERS_VENV/bin/pip" install -q --upgrade pip
  # torch first and pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
  "$PEERS_VENV/bin/pip" install -q "torch==${TTASERVE_TORCH:-2.13.0}"
  # pyyaml: TorchServe's Python worker imports it but its package does not require it.
  # uvloop<0.22: MLServer 1.7's parallel workers call asyncio.get_event_loop(), which
  # newer uvloop policies refuse outside a running loop (workers die at start).
  # safetensors, numpy, tqdm: what a ttaserve archive's handler imports in the worker.
  "$PEERS_VENV/bin/pip" install -q nvidia-pytriton mlserver torchserve torch-model-archiver \
    pyyaml "tritonclient[grpc]" safetensors numpy tqdm "uvloop<0.22"
  rm -f "$PEERS_VENV"/.peers-installed-*
  touch "$stamp"
fi
