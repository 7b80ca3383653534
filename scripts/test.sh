#!/usr/bin/env bash
# Install (first run only) with test tools, Fashion-MNIST and redis-server, lint and type-check, then run the default
# test suite. Extra args go to pytest (e.g. `-m slow` for the long suites).
set -euo pipefail
cd "$(dirname "$0")/.."
TTASERVE_EXTRAS=${TTASERVE_EXTRAS:-dev} TTASERVE_DATA_APT=1 bash scripts/setup.sh
# The state-store tests start a real redis-server on a loopback port.
if ! command -v redis-server >/dev/null; then
  echo "==> apt-get install redis-server"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "==> ruff"
.venv/bin/ruff check ttaserve tests examples
echo "==> mypy"
.venv/bin/mypy ttaserve examples
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
