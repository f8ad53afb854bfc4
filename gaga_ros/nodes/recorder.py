"""Recorder node: /avatar/image -> an H.264 mp4 file, so a run can be watched without a viewer."""

from __future__ import annotations

import threading
from fractions import Fraction
from pathlib import Path

import av
from rclpy.node import Node
from sensor_msgs.msg import Image

from gaga_ros.nodes import qos, stamps
from gaga_ros.nodes.diagnostics import ERROR, OK, Diagnostics, RateMeter
from gaga_ros.nodes.image_msg import ImageMessageError, from_msg
from gaga_ros.nodes.parameters import Param, declare

PARAMS = (
    Param("path", "out/avatar.mp4", "mp4 file to write; its folder is created. Overwritten at start."),
    Param("topic", "/avatar/image", "Image topic to record."),
    Param("max_seconds", 600.0, "Stop writing after this much recorded time (bounds the file).",
          low=1.0, high=86400.0),
)


class RecorderNode(Node):
    """Encodes every received frame, timed by its header stamp (variable frame rate)."""

    def __init__(self) -> None:
        super().__init__("recorder")
        self.p = declare(self, PARAMS)
        self.path = Path(self.p["path"]).expanduser().resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container: av.container.OutputContainer | None = av.open(str(self.path), mode="w")
        # close() runs on the main thread while an executor thread may be encoding a frame: the
        # encoder must not be flushed and freed under it (a segfault at Ctrl-C, seen).
        self.lock = threading.Lock()
        self.stream = None
        self.t0: int | None = None
        self.last_pts = -1
        self.error = ""
        self.meter = RateMeter()
        self.create_subscription(Image, self.p["topic"], self._on_image, qos.FRAMES)
        self.diagnostics = Diagnostics(self, lambda: (ERROR if self.error else OK,
                                                      self.error or f"recording to {self.path}",
                                                      {"frames": self.meter.count}))
        self.get_logger().info(f"recording {self.p['topic']} to {self.path}")

    def _on_image(self, msg: Image) -> None:
        try:
            rgb = from_msg(msg)
        except ImageMessageError as exc:
            self.error = str(exc)
            return
        with self.lock:
            if self.container is not None:
                self._encode(rgb, stamps.to_ns(msg.header.stamp))

    def _encode(self, rgb, stamp: int) -> None:
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=30)
            self.stream.width, self.stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.time_base = Fraction(1, 1000)
            self.stream.codec_context.time_base = Fraction(1, 1000)
            self.t0 = stamp
        pts = (stamp - self.t0) // 1_000_000
        if pts <= self.last_pts or pts > self.p["max_seconds"] * 1000:
            return  # out of order, duplicate, or past the bound
        frame = av.VideoFrame.from_ndarray(rgb[: self.stream.height, : self.stream.width], format="rgb24")
        frame.pts, frame.time_base = pts, Fraction(1, 1000)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.last_pts = pts
        self.meter.tick()

    def close(self) -> None:
        with self.lock:
            if self.container is None:
                return
            if self.stream is not None:
                for packet in self.stream.encode():
                    self.container.mux(packet)
            self.container.close()
            self.container = None
        self.get_logger().info(f"wrote {self.meter.count} frames to {self.path}")


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(RecorderNode, args)


if __name__ == "__main__":
    main()
