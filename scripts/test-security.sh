#!/usr/bin/env bash
# The security suite alone (tests/security: ownership, limits, memory and disk bounds, signed
# state, truthful shutdown), against real servers on loopback. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
TTASERVE_EXTRAS=dev bash scripts/setup.sh
exec .venv/bin/python -m pytest tests/security -q "$@"
