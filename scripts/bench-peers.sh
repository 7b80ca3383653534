#!/usr/bin/env bash
# Benchmark ttaserve against Triton (nvidia-pytriton), MLServer and TorchServe, same model,
# same client, same run. The peers live in their own virtualenv (.venv-peers) so their
# pins never touch ttaserve's .venv. Arguments go to `python -m ttaserve.bench.peers`
# (e.g. --quick, --duration 15, --concurrency 1 4 8, --out DIR).
#   PEERS_VENV   where to create the peers' virtualenv (default .venv-peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_VENV=${PEERS_VENV:-.venv-peers}

# Help installs nothing: the options from an existing .venv, else this summary.
for arg in "$@"; do
  case "$arg" in
    -h|--help)
      echo "usage: scripts/bench-peers.sh [OPTIONS]   (PEERS_VENV=DIR: the peers' virtualenv, default .venv-peers)"
      echo "On first use installs ttaserve[bench] into .venv and the peers into \$PEERS_VENV, then runs"
      echo "python -m ttaserve.bench.peers OPTIONS:"
      echo
      if .venv/bin/python -c "import ttaserve.bench.peers" 2>/dev/null; then
        exec .venv/bin/python -m ttaserve.bench.peers --help
      fi
      cat <<'EOF'
  --out DIR                      output directory (default ttaserve-results/peers)
  --quick                        short runs (smoke test, not publishable)
  --concurrency N [N ...]        client concurrencies (default 1 4 8)
  --duration SECONDS             seconds per measurement (default 15; >= 10 to publish)
  --rounds N                     interleaved rounds (default 2; >= 2 to publish)
  --peers NAME [NAME ...]        ttaserve triton mlserver torchserve (default all)
  --threads N                    torch threads of every server (default 1)
  --allocator {tuned,default}    malloc setting of every server process (default tuned)
  --peers-venv DIR               virtualenv holding the peers
EOF
      exit 0 ;;
  esac
done

if ! .venv/bin/python -c "import ttaserve, tritonclient.grpc, matplotlib, tqdm" 2>/dev/null; then
  TTASERVE_EXTRAS=bench bash scripts/setup.sh
fi

PEERS_VENV="$PEERS_VENV" bash scripts/peers-venv.sh
command -v java >/dev/null || echo "warning: no java on PATH; TorchServe will be reported as failed" >&2

exec .venv/bin/python -m ttaserve.bench.peers --peers-venv "$PEERS_VENV" "$@"
