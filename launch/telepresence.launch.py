"""ros2 launch gaga_ros telepresence.launch.py [profile:=demo] [driver:=scripted|video|webcam] ...

Reads the same graph description (gaga_ros.graph) as `gaga-ros launch telepresence`; `--show-args`
lists every argument. Nodes are named gaga_<what> (gaga_render, gaga_bridge, ...). With
`namespace:=robot1` every node and topic moves under /robot1 (/robot1/avatar/image,
/robot1/gaga_render); a second launch with another namespace and bridge `port:=` runs a second
avatar beside it in the same ROS graph, each with its own source, driver and kiosk page:

    ros2 launch gaga_ros telepresence.launch.py namespace:=robot1 port:=8081
    ros2 launch gaga_ros telepresence.launch.py namespace:=robot2 port:=8082 source:=/photos/b.jpg

The profiles in config/ set parameters by node name in any namespace (`/**/gaga_render`); remap
topics as usual with `--ros-args -r` on a node, or with launch_ros' SetRemap around an include.
"""

import os

from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    LogInfo,
    OpaqueFunction,
    RegisterEventHandler,
    SetEnvironmentVariable,
    TimerAction,
)
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from gaga_ros import graph
from gaga_ros.nodes.runtime import EXIT_CANNOT_START


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
        actions += _node(spec, params_file)
    return actions


def _node(spec: graph.NodeSpec, params_file: str) -> list:
    """One node, started again RESPAWN_DELAY_S after it fails while launch runs.

    Not launch's own `respawn`: that also restarts a node which the terminal's Ctrl-C stopped before
    launch handled the Ctrl-C itself, and the restarted node then never gets a SIGINT (launch expects
    the terminal's to have reached it). Here a clean exit (0) and one that cannot start (2, which would
    only fail again) are final, as in `gaga-ros launch`.
    """
    kind = LifecycleNode if spec.lifecycle else Node
    action = kind(package="gaga_ros", executable=spec.module, name=spec.name, namespace=spec.namespace,
                  output="screen", parameters=[params_file, spec.parameters])

    def again(context):
        return None if context.is_shutdown else _node(spec, params_file)

    def on_exit(event, context):
        if context.is_shutdown or event.returncode in (0, EXIT_CANNOT_START):
            return None
        return [LogInfo(msg=f"{spec.qualified} exited with code {event.returncode}; starting it again in "
                            f"{graph.RESPAWN_DELAY_S:.0f} s"),
                TimerAction(period=graph.RESPAWN_DELAY_S, actions=[OpaqueFunction(function=again)])]

    return [action, RegisterEventHandler(OnProcessExit(target_action=action, on_exit=on_exit))]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(k, default_value=v[0], description=v[1])
         for k, v in graph.ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)])
