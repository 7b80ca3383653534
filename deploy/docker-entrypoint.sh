#!/bin/sh
# Container entrypoint: `ttaserve serve` on every interface of the container, plus the model
# repository mounted at /models when there is one (the demo model is always served).
# Extra arguments are passed on, e.g. `--policy alpha-bn --state-dir /state`.
set -e
if ls /models/*/config.json >/dev/null 2>&1; then
  set -- --model-repository /models "$@"
fi
exec ttaserve serve --host 0.0.0.0 "$@"
