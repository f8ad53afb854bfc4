#!/usr/bin/env bash
# The test command: set up (idempotent), make sure Chromium is there for the WebRTC tests and the
# ROS 2 command-line tools for the workspace tests, run pytest.
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
bash scripts/ros2_tools.sh  # ros2 launch / ros2 topic / ... for tests/test_workspace.py (test tools only)
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
