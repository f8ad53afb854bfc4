#!/usr/bin/env bash
# The test command: set up (idempotent), make sure Chromium is there for the WebRTC tests, run pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k webrtc).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    echo "test: installing Debian's chromium for the WebRTC browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "test: could not install chromium; the browser tests will fail" >&2
  else
    echo "test: chromium is missing; install it (apt-get install chromium) for the browser tests" >&2
  fi
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
