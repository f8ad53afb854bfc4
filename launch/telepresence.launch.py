"""ros2 launch gaga_ros telepresence.launch.py [profile:=demo] [driver:=scripted|video|webcam] ...

Reads the same graph description (gaga_ros.graph) as `gaga-ros launch telepresence`.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from gaga_ros import graph


def _nodes(context):
    # ros2 launch keeps any name:=value it is given; refuse the unknown ones as `gaga-ros launch` does
    # (a typo would otherwise silently run the defaults).
    unknown = sorted(set(context.launch_configurations) - set(graph.ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown launch arguments {unknown}: known are {sorted(graph.ARGUMENTS)} "
                         "(ros2 launch gaga_ros telepresence.launch.py --show-args)")
    args = {k: LaunchConfiguration(k).perform(context) for k in graph.ARGUMENTS}
    params_file = str(graph.profile_file(args["profile"]))
    actions = [SetEnvironmentVariable(k, v) for k, v in graph.dds_environment(dict(os.environ)).items()]
    for spec in graph.telepresence(args):
        kind = LifecycleNode if spec.lifecycle else Node
        extra = {"namespace": ""} if spec.lifecycle else {}
        actions.append(kind(package="gaga_ros", executable=spec.module, name=spec.name, output="screen",
                            parameters=[params_file, spec.parameters], respawn=True,
                            respawn_delay=graph.RESPAWN_DELAY_S, **extra))
    return actions


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(k, default_value=v[0], description=v[1])
         for k, v in graph.ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)])
