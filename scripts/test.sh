#!/usr/bin/env bash
# The test command: set up (idempotent), make sure Chromium and Janus are there for the WebRTC and SFU
# tests and the ROS 2 command-line tools for the workspace tests, run pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k webrtc).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests start (as the user, nothing of them needs root at run time):
# chromium for the WebRTC browser tests, janus (an SFU) for tests/test_sfu.py.
install() {  # install <command> <package> <what for>
  command -v "$1" >/dev/null && return
  if [[ $(id -u) == 0 ]]; then
    echo "test: installing Debian's $2 for $3"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null) \
      || echo "test: could not install $2; $3 will fail" >&2
  else
    echo "test: $2 is missing; install it (apt-get install $2) for $3" >&2
  fi
}
install chromium chromium "the WebRTC browser tests"
install janus janus "the SFU tests (tests/test_sfu.py)"
bash scripts/setup.sh
bash scripts/ros2_tools.sh  # ros2 launch / ros2 topic / ... for tests/test_workspace.py (test tools only)
exec .venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
