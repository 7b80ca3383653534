#!/usr/bin/env bash
# Benchmark ttaserve against Triton (nvidia-pytriton), MLServer and TorchServe, same model,
# same client, same run. The peers live in their own virtualenv (.venv-peers) so their
# pins never touch ttaserve's .venv. Arguments go to `python -m ttaserve.bench.peers`
# (e.g. --quick, --duration 15, --concurrency 1 4 8, --out DIR).
#   PEERS_VENV   where to create the peers' virtualenv (default .venv-peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_VENV=${PEERS_VENV:-.venv-peers}
PYTHON=${PYTHON:-python3}

if ! .venv/bin/python -c "import ttaserve, tritonclient.grpc, matplotlib, tqdm" 2>/dev/null; then
  TTASERVE_EXTRAS=bench bash scripts/setup.sh
fi

stamp="$PEERS_VENV/.peers-installed-$(sha256sum "$0" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  [ -x "$PEERS_VENV/bin/python" ] || "$PYTHON" -m venv "$PEERS_VENV"
  "$PEERS_VENV/bin/pip" install -q --upgrade pip
  # torch first and pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
  "$PEERS_VENV/bin/pip" install -q "torch==${TTASERVE_TORCH:-2.13.0}"
  # pyyaml: TorchServe's Python worker imports it but its package does not require it.
  # uvloop<0.22: MLServer 1.7's parallel workers call asyncio.get_event_loop(), which
  # newer uvloop policies refuse outside a running loop (workers die at start).
  "$PEERS_VENV/bin/pip" install -q nvidia-pytriton mlserver torchserve torch-model-archiver \
    pyyaml "tritonclient[grpc]" safetensors numpy "uvloop<0.22"
  rm -f "$PEERS_VENV"/.peers-installed-*
  touch "$stamp"
fi
command -v java >/dev/null || echo "warning: no java on PATH; TorchServe will be reported as failed" >&2

exec .venv/bin/python -m ttaserve.bench.peers --peers-venv "$PEERS_VENV" "$@"
