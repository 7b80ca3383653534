#!/usr/bin/env bash
# Create .venv and install ttaserve with what it needs; idempotent and quick when done.
#   TTASERVE_EXTRAS=dev   also install test tools (default: none)
#   TTASERVE_DATA_APT=1   also install Fashion-MNIST from Debian (dataset-fashion-mnist)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TTASERVE_VENV:-.venv}
EXTRAS=${TTASERVE_EXTRAS:-}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

# One stamp per (pyproject, extras); a plain install is satisfied by any extras' install.
base=$(sha256sum pyproject.toml | cut -c1-16)
stamp="$VENV/.ttaserve-installed-$base-${EXTRAS:-core}"
installed() {
  [ -f "$stamp" ] || { [ -z "$EXTRAS" ] && compgen -G "$VENV/.ttaserve-installed-$base-*" >/dev/null; }
}
if ! installed; then
  # torch first and pinned: a CPU wheel of 2.13.0 may be on disk; an open range would
  # otherwise pull a multi-GB CUDA build.
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "==> installing torch ${TTASERVE_TORCH:-2.13.0}"
    "$VENV/bin/pip" install -q "torch==${TTASERVE_TORCH:-2.13.0}"
  fi
  echo "==> installing ttaserve${EXTRAS:+[$EXTRAS]}"
  "$VENV/bin/pip" install -q -e ".${EXTRAS:+[$EXTRAS]}"
  find "$VENV" -maxdepth 1 -name '.ttaserve-installed-*' ! -name "*-$base-*" -delete
  touch "$stamp"
fi

if [ "${TTASERVE_DATA_APT:-0}" = "1" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${TTASERVE_DATA:-}" ]; then
  echo "==> installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
