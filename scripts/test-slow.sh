#!/usr/bin/env bash
# The slow suites (pytest -m slow). First installs what they drive: from Debian, headless
# Chromium (dashboard test) and Prometheus (scrape + PromQL test); the ray extra (Ray
# Serve; scripts/test.sh, which runs the tests, installs redis-server for its failover
# test); TorchServe and its model archiver in the peers virtualenv (.venv-peers,
# scripts/peers-venv.sh; TorchServe also needs Java 17) when the TorchServe bridge test is
# selected. Extra args go to pytest, e.g.
# `scripts/test-slow.sh tests/e2e` for the monitoring tests only, `tests/deploy` for Ray Serve,
# `tests/handlers` for TorchServe.
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
# The TorchServe test (tests/handlers) runs when no test path is given or one under tests/handlers is.
torchserve=1
for arg in "$@"; do
  case "$arg" in
    tests/handlers*) torchserve=1; break ;;
    tests/*) torchserve=0 ;;
  esac
done
if [ "$torchserve" = 1 ]; then
  command -v java >/dev/null || apt_install --no-install-recommends openjdk-17-jre-headless
  bash scripts/peers-venv.sh
fi
export TTASERVE_EXTRAS=dev,ray
exec bash scripts/test.sh -m slow "$@"
