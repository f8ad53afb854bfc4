#!/usr/bin/env bash
# The GPU machine's ROS 2: a venv at $GAGA_ROS_VENV (/tmp/gaga_ros_venv) that sees the machine's
# Python packages (torch, numpy, opencv, ...) and holds the cp312 ROS 2 Jazzy wheels carried in .whl/
# (scripts/device_wheels.sh fetches them), this package's interfaces built with colcon against them,
# and this checkout on its path. Idempotent; about 2 minutes the first time. Prints the venv's python.
# Used as: py=$(bash scripts/device_setup.sh) && $py bench/fleet_bench.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GAGA_ROS_VENV:-/tmp/gaga_ros_venv}
PY=$VENV/bin/python
if [[ ! -f $VENV/.gaga_ros_device ]]; then
  BASE_SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m venv "$VENV" >&2
  SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # After the venv's own packages: the machine's (its torch lives in a venv of its own, which
  # --system-site-packages would not reach).
  echo "import site; site.addsitedir('$BASE_SITE')" > "$SITE/zz_device_base.pth"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation \
    .whl/*.whl .whl/*.tar.gz >&2
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
  printf '%s\n%s\n' "$ROOT/install/gaga_ros/lib/python3.12/site-packages" "$ROOT" > "$SITE/gaga_ros.pth"
  "$PY" -c 'import gaga_ros.msg, rclpy, torch' >&2
  if [[ -f .whl/gsplat_cuda.so.xz ]]; then
    # A gsplat extension built on such a machine before (bench/fast_device.sh leaves one): loaded as
    # gsplat's compiled module instead of a JIT build of about 80 s.
    "$PY" -c "import lzma, sys; open(sys.argv[2], 'wb').write(lzma.open(sys.argv[1]).read())" \
      .whl/gsplat_cuda.so.xz "$VENV/gsplat_cuda.so"
    cat > "$SITE/sitecustomize.py" <<PYEOF
import importlib.util, sys
import torch  # noqa: F401  (the extension links against libtorch)
spec = importlib.util.spec_from_file_location("gsplat_cuda", "$VENV/gsplat_cuda.so")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["gsplat.csrc"] = module  # gsplat.cuda._backend tries gsplat.csrc first
PYEOF
  fi
  touch "$VENV/.gaga_ros_device"
fi
echo "$PY"
