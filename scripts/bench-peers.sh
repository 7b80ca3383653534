#!/usr/bin/env bash
# Benchmark ttaserve against Triton (nvidia-pytriton), MLServer and TorchServe, same model,
# same client, same run. The peers live in their own virtualenv (.venv-peers) so their
# pins never touch ttaserve's .venv. Arguments go to `python -m ttaserve.bench.peers`
# (e.g. --quick, --duration 15, --concurrency 1 4 8, --out DIR).
#   PEERS_VENV   where to create the peers' virtualenv (default .venv-peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_VENV=${PEERS_VENV:-.venv-peers}

if ! .venv/bin/python -c "import ttaserve, tritonclient.grpc, matplotlib, tqdm" 2>/dev/null; then
  TTASERVE_EXTRAS=bench bash scripts/setup.sh
fi

PEERS_VENV="$PEERS_VENV" bash scripts/peers-venv.sh
command -v java >/dev/null || echo "warning: no java on PATH; TorchServe will be reported as failed" >&2

exec .venv/bin/python -m ttaserve.bench.peers --peers-venv "$PEERS_VENV" "$@"
