"""Per-node health on /diagnostics at about 1 Hz, plus the rate meter the nodes feed it with."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node

from gaga_ros.nodes import names

OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR


class RateMeter:
    """Events per second over a sliding window, cheap enough to call per frame."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()
        self.count = 0

    def tick(self) -> None:
        now = time.monotonic()
        self._times.append(now)
        self.count += 1
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()

    @property
    def rate(self) -> float:
        if len(self._times) < 2:
            return 0.0
        span = time.monotonic() - self._times[0]
        return (len(self._times) - 1) / span if span > 0 else 0.0


Report = tuple[int, str, dict[str, object]]


class Diagnostics:
    """Publishes the node's status from `report()` -> (level, message, values) once per period.

    On a guarded node (gaga_ros.nodes.guard) the node's refusals are folded in: WARN with the latest
    reason while it is recent, ERROR when a worker died (published at once, before the exit).
    """

    def __init__(self, node: Node, report: Callable[[], Report], period_s: float = 1.0) -> None:
        self._node = node
        self._report = report
        self._pub = node.create_publisher(DiagnosticArray, names.DIAGNOSTICS, 10)
        self._timer = node.create_timer(period_s, self._publish)
        self._guard = getattr(node, "guard", None)
        if self._guard is not None:
            self._guard.on_fatal.append(self._publish)

    def _publish(self) -> None:
        level, message, values = self._report()
        if self._guard is not None:
            level, message = self._guard.assess(level, message)
            values = {**values, "refused_inputs": self._guard.total}
        # Named by the node's qualified name (namespace included): /diagnostics is shared by every
        # namespace, and two graphs' gaga_render must stay apart there.
        name = self._node.get_fully_qualified_name().lstrip("/")
        status = DiagnosticStatus(level=level, name=f"gaga_ros: {name}",
                                  hardware_id=self._node.get_fully_qualified_name(), message=message)
        status.values = [KeyValue(key=k, value=_fmt(v)) for k, v in values.items()]
        array = DiagnosticArray(status=[status])
        array.header.stamp = self._node.get_clock().now().to_msg()
        self._pub.publish(array)


def _fmt(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
