"""pip install path (no ROS install needed); ROS 2 workspaces build with colcon and CMakeLists.txt."""

from setuptools import find_packages, setup

setup(
    name="gaga_ros",
    version="0.1.0",
    description="Live photoreal Gaussian telepresence heads for robots, in ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["gaga_ros", "gaga_ros.*"]),
    package_data={"gaga_ros": ["stream/static/*", "faces/data/*"]},
    entry_points={"console_scripts": ["gaga-ros = gaga_ros.cli:main"]},
)
