#!/usr/bin/env bash
# For the GPU machine (CPython 3.12 with torch, no package registry): download into .whl/ the cp312
# builds of the ROS 2 Jazzy wheels this venv holds (rclpy, messages, rosidl, colcon) and gsplat, which
# scripts/device_setup.sh installs there. Run here after scripts/setup.sh; about 45 MB, 20 s.
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
echo "device_wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1) in .whl/"
