"""Named expressions and look_at targets as the render and fleet nodes take them: their parameters,
their three subscriptions, and the FaceMixer (gaga_ros.named) that adds them to one avatar's live
driver or shows them on its neutral face. One avatar per FaceInputs: the render node has one, the
fleet node one per namespace it serves, so both follow the same rules (README, "Named expressions
and look_at").
"""

from __future__ import annotations

from typing import Any

from geometry_msgs.msg import PointStamped
from rclpy.node import Node

from gaga_ros.msg import DisplayPoint, NamedExpression
from gaga_ros.named import Display, FaceMixer, LookAt, check_frame
from gaga_ros.nodes import names, qos
from gaga_ros.nodes.expression_msg import named_from_msg
from gaga_ros.nodes.parameters import Param

#: Frames per second of the neutral face showing a named command while no driver is live (the
#: scripted driver's rate); the renderers drop what they cannot keep up with.
IDLE_FPS = 30.0
#: Its inputs, relative to a namespace.
TOPICS = (names.NAMED_EXPRESSION, names.LOOK_AT, names.LOOK_AT_DISPLAY)

PARAMS = (
    Param("display_frame", "display", "frame_id of look_at points: origin at the display's centre, x "
          "right, y up, z toward the viewer, metres (empty frame_id means this frame too)."),
    Param("display_width_m", 0.30, "Width of the face display, metres (maps look_at_display u).",
          low=0.01, high=10.0),
    Param("display_height_m", 0.30, "Height of the face display, metres (maps look_at_display v).",
          low=0.01, high=10.0),
    Param("eye_depth_m", 0.30, "How far behind the display's centre the avatar's eyes are taken to be.",
          low=0.0, high=10.0),
    Param("look_hold_s", 2.0, "How long a look_at holds before the eyes return (repeat it to track).",
          low=0.1, high=60.0),
)


class FaceInputs:
    """One avatar's named commands and look_at targets: subscriptions on `namespace`'s topics (None:
    the node's own, relative names) feeding `mixer`. Malformed input raises in the callback, where
    the node's guard refuses it."""

    def __init__(self, node: Node, p: dict[str, Any], namespace: str | None = None,
                 callback_group: Any = None) -> None:
        self.node, self.display_frame, self.count = node, p["display_frame"], 0
        self.mixer = FaceMixer(lambda: node.get_clock().now().nanoseconds * 1e-9,
                               Display(p["display_width_m"], p["display_height_m"], p["eye_depth_m"]),
                               p["look_hold_s"])
        inputs = ((NamedExpression, names.NAMED_EXPRESSION, self._on_named),
                  (PointStamped, names.LOOK_AT, self._on_look_at),
                  (DisplayPoint, names.LOOK_AT_DISPLAY, self._on_look_at_display))
        self.subscriptions = [
            node.create_subscription(kind, name if namespace is None else names.in_namespace(namespace, name),
                                     callback, qos.EXPRESSIONS, callback_group=callback_group)
            for kind, name, callback in inputs]

    def destroy(self) -> None:
        for sub in self.subscriptions:
            self.node.destroy_subscription(sub)
        self.subscriptions = []

    def _on_named(self, msg: NamedExpression) -> None:
        self.mixer.command(named_from_msg(msg))
        self.count += 1

    def _on_look_at(self, msg: PointStamped) -> None:
        check_frame(msg.header.frame_id, self.display_frame)
        self.mixer.look_at(LookAt(point=(msg.point.x, msg.point.y, msg.point.z)))
        self.count += 1

    def _on_look_at_display(self, msg: DisplayPoint) -> None:
        self.mixer.look_at(LookAt(uv=(msg.u, msg.v)))
        self.count += 1
