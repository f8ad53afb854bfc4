"""WebRTC bridge node: /avatar/image -> browsers and face displays; operator webcam and JSON
expressions from the page -> ROS topics (raw ones on /avatar/expression, named ones on
/avatar/named_expression, look_at targets on /avatar/look_at or /avatar/look_at_display). The
streaming itself lives in gaga_ros.stream."""

from __future__ import annotations

import os

import numpy as np
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import Image

from gaga_ros.expression import Expression
from gaga_ros.msg import DisplayPoint, NamedExpression
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.named import LookAt, NamedCommand
from gaga_ros.nodes import names, qos, rosout, stamps
from gaga_ros.nodes.diagnostics import OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import named_to_msg
from gaga_ros.nodes.expression_msg import to_msg as expression_to_msg
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.image_msg import from_msg, to_msg
from gaga_ros.nodes.parameters import Param, declare
from gaga_ros.stream import StreamServer

PARAMS = (
    Param("host", "127.0.0.1", "Address to listen on. Anything but loopback needs a token."),
    Param("port", 8080, "TCP port of the viewer and signalling.", low=0, high=65535),
    Param("token_env", "GAGA_ROS_BRIDGE_TOKEN", "Environment variable holding the token remote "
          "viewers must present (kept out of parameters so it never shows in `ros2 param`)."),
    Param("token_on_loopback", False, "Require the token from local clients too (a reverse proxy on "
          "this machine makes every client local); needs the token set."),
    Param("allowed_hosts", [""], "Names browsers may reach the viewer by besides IP addresses and "
          "localhost, e.g. robot.local; other Host headers get 403 (DNS rebinding guard)."),
    Param("allowed_origins", [""], "Page origins allowed besides the bridge's own, e.g. "
          "https://robot.example when a reverse proxy serves the viewer (empty: none)."),
    Param("codec", "VP8", "Video codec: VP8 or H264."),
    Param("bitrate_kbps", 1000, "Target video bitrate; can change live.", read_only=False, low=50,
          high=50000),
    Param("max_fps", 30.0, "Highest frame rate sent to viewers.", low=1.0, high=120.0),
    Param("width", 0, "Output width (0: as rendered).", low=0, high=4096),
    Param("height", 0, "Output height (0: as rendered).", low=0, high=4096),
    Param("certfile", "", "TLS certificate (PEM); with keyfile the bridge serves HTTPS."),
    Param("keyfile", "", "TLS private key (PEM)."),
    Param("ice_servers", [""], "STUN/TURN URLs, e.g. stun:stun.example.org:3478 (empty: none)."),
    Param("image_topic", names.IMAGE, "Frames to stream."),
    Param("upstream_topic", names.OPERATOR_IMAGE, "Where the operator's webcam is republished."),
)

#: The stream server's logger (gaga_ros.stream logs with the standard library); forwarded to /rosout.
STREAM_LOGGER = "gaga_ros.stream"


class BridgeNode(GuardedNode):
    """Feeds the newest avatar frame to the stream server and publishes what the page sends back."""

    def __init__(self) -> None:
        super().__init__("gaga_bridge")
        self.p = declare(self, PARAMS)
        self.log_handler = rosout.forward(self, STREAM_LOGGER)
        self.frames_in = RateMeter()
        self.upstream_in = RateMeter()
        self.expressions_in = 0
        self.pub_upstream = self.create_publisher(Image, self.p["upstream_topic"], qos.FRAMES)
        self.pub_expr = self.create_publisher(ExpressionMsg, names.EXPRESSION, qos.EXPRESSIONS)
        self.pub_named = self.create_publisher(NamedExpression, names.NAMED_EXPRESSION,
                                               qos.EXPRESSIONS)
        self.pub_look = self.create_publisher(PointStamped, names.LOOK_AT, qos.EXPRESSIONS)
        self.pub_look_display = self.create_publisher(DisplayPoint, names.LOOK_AT_DISPLAY,
                                                      qos.EXPRESSIONS)
        size = (self.p["width"], self.p["height"]) if self.p["width"] and self.p["height"] else (None,
                                                                                              None)
        self.server = StreamServer(
            host=self.p["host"], port=self.p["port"], token=os.environ.get(self.p["token_env"]) or None,
            codec=self.p["codec"], bitrate_kbps=self.p["bitrate_kbps"], max_fps=self.p["max_fps"],
            width=size[0], height=size[1], certfile=self.p["certfile"] or None,
            keyfile=self.p["keyfile"] or None, ice_servers=[s for s in self.p["ice_servers"] if s],
            token_on_loopback=self.p["token_on_loopback"],
            allowed_hosts=[h for h in self.p["allowed_hosts"] if h],
            allowed_origins=[o for o in self.p["allowed_origins"] if o],
            on_upstream_frame=self._on_upstream, on_expression=self._on_expression,
            on_named=self._on_named).start()
        self.get_logger().info(f"viewer at {self.server.url} (kiosk: {self.server.url}kiosk)")
        self.create_subscription(Image, self.p["image_topic"], self._on_image, qos.FRAMES)
        self.add_on_set_parameters_callback(self._on_params)
        self.diagnostics = Diagnostics(self, self._report)

    def _on_params(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "bitrate_kbps":
                self.server.set_bitrate(p.value)
        return SetParametersResult(successful=True)

    def _on_image(self, msg: Image) -> None:
        self.server.push_frame(from_msg(msg), stamps.to_ns(msg.header.stamp))  # bad ones: refused
        self.frames_in.tick()

    def _on_upstream(self, rgb: np.ndarray, stamp_ns: int) -> None:
        self.pub_upstream.publish(to_msg(rgb, stamps.from_ns(stamp_ns), "operator_camera"))
        self.upstream_in.tick()

    def _on_expression(self, expr: Expression) -> None:
        self.pub_expr.publish(expression_to_msg(expr, self.get_clock().now().to_msg()))
        self.expressions_in += 1

    def _on_named(self, command: NamedCommand | None, look: LookAt | None) -> None:
        stamp = self.get_clock().now().to_msg()
        if command is not None:
            self.pub_named.publish(named_to_msg(command, stamp))
        if look is not None and look.uv is not None:
            msg = DisplayPoint(u=look.uv[0], v=look.uv[1])
            msg.header.stamp = stamp
            self.pub_look_display.publish(msg)
        elif look is not None:
            msg = PointStamped()
            msg.header.stamp = stamp  # empty frame_id: the display frame (README)
            msg.point.x, msg.point.y, msg.point.z = look.point
            self.pub_look.publish(msg)
        self.expressions_in += 1

    def _report(self):
        stats = self.server.stats()
        values = {"clients": stats["clients"], "frame_rate_in": self.frames_in.rate,
                  "frames_encoded": stats["frames_encoded"], "encode_ms": stats["encode_ms_mean"],
                  "upstream_fps": self.upstream_in.rate, "expressions_in": self.expressions_in,
                  "refused_frames": self.guard.counts[self.resolve_topic_name(self.p["image_topic"])]}
        if self.frames_in.rate == 0.0:
            return WARN, f"no frames on {self.p['image_topic']}", values
        return OK, f"streaming to {stats['clients']} clients", values

    def close(self) -> None:
        self.server.stop()
        rosout.remove(STREAM_LOGGER, self.log_handler)


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(BridgeNode, args)


if __name__ == "__main__":
    main()
