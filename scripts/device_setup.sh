#!/usr/bin/env bash
# The GPU machine's ROS 2: a venv at $GAGA_ROS_VENV (/tmp/gaga_ros_venv) that sees the machine's
# Python packages (torch, numpy, opencv, ...) and holds the cp312 wheels carried in the folders given
# (default .whl/; scripts/device_wheels.sh fetches them here), this package's interfaces built with
# colcon against the ROS 2 wheels, and this checkout on its path. Prints the venv's python.
# A call's carry holds at most 64 MiB: the ROS wheels (.whl, ~50 MB) and mediapipe (.whl_mp, ~36 MB)
# travel in two calls made back to back (the machine keeps the venv in /tmp and the colcon build in
# install/ while it stays warm, 30 s); each call runs this with the folder it carried:
#   call 1, carry [".whl"]:    bash scripts/device_setup.sh .whl
#   call 2, carry [".whl_mp"]: py=$(bash scripts/device_setup.sh .whl_mp) && $py bench/fleet_bench.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GAGA_ROS_VENV:-/tmp/gaga_ros_venv}
PY=$VENV/bin/python
if [[ ! -x $PY ]]; then
  BASE_SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m venv "$VENV" >&2
  # After the venv's own packages, the machine's (its torch lives in a venv of its own, which
  # --system-site-packages would not reach).
  echo "import site; site.addsitedir('$BASE_SITE')" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz_device_base.pth"
fi
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for dir in "${@:-.whl}"; do
  shopt -s nullglob
  wheels=("$dir"/*.whl "$dir"/*.tar.gz)
  shopt -u nullglob
  if (( ${#wheels[@]} )); then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation "${wheels[@]}" >&2
  fi
  if [[ -f $dir/gsplat_cuda.so.xz && ! -f $SITE/sitecustomize.py ]]; then
    # A gsplat extension built on such a machine before (bench/fast_device.sh leaves one): loaded as
    # gsplat's compiled module instead of a JIT build of about 80 s.
    "$PY" -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" \
      "$dir/gsplat_cuda.so.xz" "$VENV/gsplat_cuda.so"
    cat > "$SITE/sitecustomize.py" <<PYEOF
import importlib.util, sys
import torch  # noqa: F401  (the extension links against libtorch)
spec = importlib.util.spec_from_file_location("gsplat_cuda", "$VENV/gsplat_cuda.so")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["gsplat.csrc"] = module  # gsplat.cuda._backend tries gsplat.csrc first
PYEOF
  fi
done
if [[ ! -f $VENV/.gaga_ros_interfaces || ! -d install/gaga_ros ]]; then
  # The ROS wheels' CMake exports name their build machine's Python paths; point them at this one.
  "$PY" - <<'PYEOF'
import pathlib, re, sys, sysconfig, numpy
subs = [(r"/opt/python/cp3\d+-cp3\d+/lib/python3\.\d+/site-packages/numpy/_core/include", numpy.get_include()),
        (r"/opt/python/cp3\d+-cp3\d+/include/python3\.\d+", sysconfig.get_paths()["include"])]
for f in (pathlib.Path(sys.prefix) / "share").glob("*/cmake/*.cmake"):
    text = f.read_text()
    if "/opt/python/cp3" in text:
        for old, new in subs:
            text = re.sub(old, new, text)
        f.write_text(text)
PYEOF
  rm -rf build/gaga_ros install/gaga_ros
  mkdir -p log
  (
    export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV PATH=$VENV/bin:$PATH
    "$VENV/bin/colcon" --log-base log build --base-paths "$ROOT" --build-base build --install-base install \
      --event-handlers console_cohesion- status- --cmake-args -DPython3_EXECUTABLE="$PY" \
      -DBUILD_TESTING=OFF -DGAGA_ROS_INSTALL_PYTHON=OFF > log/colcon-build.txt 2>&1
  ) || { tail -40 log/colcon-build.txt >&2; exit 1; }
  ln -sf "$ROOT"/install/gaga_ros/lib/libgaga_ros__*.so "$VENV/lib/"
  # The checkout first: its gaga_ros spans the generated msg/srv as well (gaga_ros/__init__.py).
  printf '%s\n%s\n' "$ROOT" "$ROOT/install/gaga_ros/lib/python3.12/site-packages" > "$SITE/gaga_ros.pth"
  "$PY" -c 'import gaga_ros.msg, gaga_ros.graph, rclpy, torch' >&2
  touch "$VENV/.gaga_ros_interfaces"
fi
echo "$PY"
