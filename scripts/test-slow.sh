#!/usr/bin/env bash
# The slow suites (pytest -m slow). First installs from Debian what they drive: headless
# Chromium (dashboard test), Prometheus (scrape + PromQL test) and redis-server (Ray Serve
# failover test), and the ray extra (Ray Serve). Extra args go to pytest, e.g.
# `scripts/test-slow.sh tests/e2e` for the monitoring tests only, `tests/deploy` for Ray Serve.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_install() {  # apt-get install, once per run, quietly
  echo "==> apt-get install $*"
  [ -n "${updated:-}" ] || { $SUDO apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
command -v chromium >/dev/null || apt_install chromium chromium-driver
# Without the recommended node exporter; the tests start their own Prometheus on a free port.
command -v prometheus >/dev/null || apt_install --no-install-recommends prometheus
command -v redis-server >/dev/null || apt_install redis-server
export TTASERVE_EXTRAS=dev,ray
exec bash scripts/test.sh -m slow "$@"
