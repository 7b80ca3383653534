#!/usr/bin/env bash
# Install (first run only) and serve the embedded demo model:
# gRPC on 127.0.0.1:8001, Prometheus metrics on 127.0.0.1:8002. Extra args go to `ttaserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ttaserve serve "$@"
