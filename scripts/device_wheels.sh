#!/usr/bin/env bash
# For the GPU machine (CPython 3.12 with torch, no package registry): download the cp312 builds of the
# wheels this venv holds that the machine lacks, for scripts/device_setup.sh to install there: into
# .whl/ the ROS 2 Jazzy wheels (rclpy, messages, rosidl, colcon) and gsplat (about 50 MB), into
# .whl_mp/ mediapipe and the protobuf it needs (about 36 MB; gaga_ros.faces imports it). A call
# carries at most 64 MiB, so the two folders travel in two calls. Run here after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# lark-parser is the old name of lark (the same module): one of them only. The rest are what these
# need beyond the machine's own packages.
.venv/bin/python -m pip freeze --disable-pip-version-check | grep -i -E \
  '^(ros-[^=]*|colcon-[^=]*|catkin-pkg|lark|distlib|notify2|docutils|gsplat|argcomplete|importlib.metadata|lazy-importer|pytest-repeat|pytest-rerunfailures)==' \
  > .whl/wanted.txt
platforms=()
for tag in manylinux_2_17 manylinux_2_28 manylinux_2_34 manylinux_2_35 manylinux_2_39; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl -r .whl/wanted.txt
# EmPy 3 has no wheel: its source, built there without isolation.
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d .whl \
  "$(.venv/bin/python -m pip freeze --disable-pip-version-check | grep -i '^empy==')"
mkdir -p .whl_mp
.venv/bin/python -m pip freeze --disable-pip-version-check | grep -i -E \
  '^(mediapipe|protobuf|sounddevice|cffi|pycparser)==' > .whl_mp/wanted.txt
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl_mp \
  -r .whl_mp/wanted.txt
echo "device_wheels: $(du -sh .whl | cut -f1) in .whl/, $(du -sh .whl_mp | cut -f1) in .whl_mp/"
