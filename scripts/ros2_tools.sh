#!/usr/bin/env bash
# Test tools, not product dependencies: the ROS 2 command line (`ros2 launch`, `ros2 topic`, ...) and
# the launch system from the upstream sources in ../shared/ros2 (PyPI has no wheels of them), into
# the test venv, so CI runs the tools a ROS user runs. Idempotent: a second run takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GAGA_ROS_VENV:-$ROOT/.venv}
SRC=${GAGA_ROS_ROS2_TOOLS:-$ROOT/../shared/ros2}
PACKAGES=(launch launch_xml launch_yaml launch_ros ros2launch rosidl_runtime_py ros2cli ros2pkg ros2node
          ros2topic ros2param ros2service ros2lifecycle ros2run ros2interface)
[[ -d $SRC ]] || { echo "ros2_tools: $SRC is missing (the upstream ROS 2 tool sources)" >&2; exit 1; }
STAMP=$VENV/.gaga_ros_ros2_tools
# The sources' README lists their upstream commits: a new set changes it.
stamp_of() { sha256sum < "$SRC/README.md" | cut -c1-16; }
if [[ -f $STAMP && "$(cat "$STAMP")" == "$(stamp_of)" ]] && "$VENV/bin/python" -c 'import composition_interfaces.srv' 2>/dev/null; then
  exit 0
fi

t0=$SECONDS
echo "ros2_tools: installing launch, launch_ros and ros2cli with its verbs from $SRC into $VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check osrf-pycommon argcomplete psutil packaging \
  importlib-metadata
# Build from copies: pip writes build/ and egg-info/ beside a setup.py, and $SRC is shared.
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
dirs=()
for p in "${PACKAGES[@]}"; do
  cp -r "$SRC/$p" "$WORK/$p"
  rm -rf "$WORK/$p/build" "$WORK/$p"/*.egg-info
  dirs+=("$WORK/$p")
done
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation "${dirs[@]}"

# launch_ros imports composition_interfaces (a message package): built with colcon like msg/.
echo "ros2_tools: building composition_interfaces with colcon"
mkdir -p log
(
  export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
  "$VENV/bin/colcon" --log-base log build --base-paths "$SRC/composition_interfaces" --build-base build \
    --install-base install --event-handlers console_cohesion- status- --cmake-args \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF > log/colcon-ros2-tools.txt 2>&1
) || { echo "ros2_tools: colcon build failed; see log/colcon-ros2-tools.txt" >&2; tail -30 log/colcon-ros2-tools.txt >&2; exit 1; }
ln -sf "$ROOT"/install/composition_interfaces/lib/libcomposition_interfaces__*.so "$VENV/lib/"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ROOT/install/composition_interfaces/lib/python3.11/site-packages" > "$SITE/composition_interfaces.pth"
"$VENV/bin/python" -c 'import composition_interfaces.srv, launch_ros, ros2cli' \
  || { echo "ros2_tools: the installed tools do not import" >&2; exit 1; }
stamp_of > "$STAMP"
echo "ros2_tools: done in $((SECONDS - t0)) s"
