"""Scripted driver node: a built-in, deterministic performance on /avatar/expression.

Speaking, smiling, blinking, nodding and turning in a loop, so the demo needs no camera.
"""

from __future__ import annotations

from gaga_ros.driver import ScriptedDriver
from gaga_ros.msg import Expression as ExpressionMsg
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
)


class DriverNode(GuardedNode):
    """Publishes the scripted driver's expression for the current time at a fixed rate."""

    def __init__(self) -> None:
        super().__init__("gaga_driver")
        self.p = declare(self, PARAMS)
        self.driver = ScriptedDriver(fps=self.p["rate"], seed=self.p["seed"])
        self.pub = self.create_publisher(ExpressionMsg, names.EXPRESSION, qos.EXPRESSIONS)
        self.meter = RateMeter()
        self.t0: int | None = None  # the node clock (ns) at the first tick: /clock's under use_sim_time
        self.timer = self.create_timer(1.0 / self.p["rate"], self._tick)
        self.diagnostics = Diagnostics(self, lambda: (OK, "driving", {"frame_rate": self.meter.rate,
                                                                      "frames": self.meter.count}))

    def _tick(self) -> None:
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
