"""Scripted driver node: a built-in, deterministic performance on avatar/expression.

Speaking, smiling, blinking, nodding and turning in a loop, so the demo needs no camera; or, as
the telepresence loop's idle driver (yield_to_tracking), a calm idle face that stops while the
tracking node follows a face (the operator's) and resumes when tracking loses it.
"""

from __future__ import annotations

from gaga_ros.driver import PERFORMANCES, ScriptedDriver
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.msg import TrackingStatus
from gaga_ros.nodes import names, qos
from gaga_ros.nodes.diagnostics import OK, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import to_msg
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.parameters import Param, declare

PARAMS = (
    Param("rate", 30.0, "Expressions per second.", low=1.0, high=240.0),
    Param("seed", 0, "Seed of the scripted performance (same seed, same performance).", low=0,
          high=2**31 - 1),
    Param("frame_id", "scripted_driver", "frame_id of the published expressions."),
    Param("performance", "show", f"What it performs: {' or '.join(PERFORMANCES)} (blinks, sway, a faint "
          "smile)."),
    Param("yield_to_tracking", False, "Stay quiet while tracking/status says a face is tracked (the "
          "operator drives), resume when it is lost or the camera goes silent."),
)


class DriverNode(GuardedNode):
    """Publishes the scripted driver's expression for the current time at a fixed rate."""

    executor_threads = 1  # one timer

    def __init__(self) -> None:
        super().__init__("driver")
        self.p = declare(self, PARAMS)
        self.driver = ScriptedDriver(fps=self.p["rate"], seed=self.p["seed"],
                                     performance=self.p["performance"])
        self.pub = self.create_publisher(ExpressionMsg, names.EXPRESSION, qos.EXPRESSIONS)
        self.meter = RateMeter()
        self.yielding = False
        if self.p["yield_to_tracking"]:
            self.create_subscription(TrackingStatus, names.TRACKING_STATUS, self._on_tracking, qos.LATCHED)
        self.t0: int | None = None  # the node clock (ns) at the first tick: /clock's under use_sim_time
        self.timer = self.create_timer(1.0 / self.p["rate"], self._tick)
        self.diagnostics = Diagnostics(self, lambda: (
            OK, "yielding to tracking" if self.yielding else "driving",
            {"frame_rate": self.meter.rate, "frames": self.meter.count}))

    def _on_tracking(self, msg: TrackingStatus) -> None:
        self.yielding = msg.face_found

    def _tick(self) -> None:
        if self.yielding:
            return
        now = self.get_clock().now()
        self.t0 = now.nanoseconds if self.t0 is None else self.t0
        expr = self.driver.expression_at((now.nanoseconds - self.t0) * 1e-9)
        expr.frame_id = self.p["frame_id"]
        self.pub.publish(to_msg(expr, now.to_msg()))
        self.meter.tick()


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(DriverNode, args)


if __name__ == "__main__":
    main()
