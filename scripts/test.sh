#!/usr/bin/env bash
# Install (first run only) with test tools and Fashion-MNIST, lint and type-check, then run the default
# test suite. Extra args go to pytest (e.g. `-m slow` for the long suites).
set -euo pipefail
cd "$(dirname "$0")/.."
TTASERVE_EXTRAS=dev TTASERVE_DATA_APT=1 bash scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check ttaserve tests examples
echo "==> mypy"
.venv/bin/mypy ttaserve examples
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
