"""Capture node: a webcam, video file or image folder -> sensor_msgs/Image on /camera/image_raw."""

from __future__ import annotations

import threading
import time

from sensor_msgs.msg import Image

from gaga_ros.capture import CaptureError, FrameSource, RateLimiter
from gaga_ros.nodes import names, qos
from gaga_ros.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.image_msg import to_msg
from gaga_ros.nodes.parameters import Param, declare

PARAMS = (
    Param("source", "0", "Webcam device index (e.g. '0'), a video file, or a folder of images."),
    Param("rate", 30.0, "Publish rate in Hz; 0 uses the video's own frame rate.", low=0.0, high=240.0),
    Param("loop", True, "Restart a video file or image folder at its end."),
    Param("frame_id", "camera", "frame_id written into every image header."),
    Param("width", 0, "Requested webcam width (0: the device's default).", low=0, high=7680),
    Param("height", 0, "Requested webcam height (0: the device's default).", low=0, high=4320),
    Param("retry_seconds", 2.0, "Wait before reopening a webcam that failed or vanished.", low=0.1,
          high=60.0),
)


class CaptureNode(GuardedNode):
    """Publishes frames from one source at a steady rate, stamped at the moment of capture."""

    def __init__(self) -> None:
        super().__init__("gaga_capture")
        self.p = declare(self, PARAMS)
        self.pub = self.create_publisher(Image, names.CAMERA_IMAGE, qos.FRAMES)
        self.meter = RateMeter()
        self.error = ""
        source = FrameSource(self.p["source"], loop=self.p["loop"], width=self.p["width"],
                             height=self.p["height"])  # fail fast: a bad source stops startup
        self.source: FrameSource | None = source  # None while a failed source waits to be reopened
        rate = self.p["rate"] or source.native_fps or 30.0
        self.get_logger().info(f"capturing {source.kind} {self.p['source']!r} at {rate:.1f} Hz")
        self.diagnostics = Diagnostics(self, self._report)
        self._stop = threading.Event()
        self._thread = self.guard.worker("capture", lambda: self._loop(rate))

    def _loop(self, rate: float) -> None:
        pacer = RateLimiter(rate)
        while not self._stop.is_set():
            try:
                if self.source is None:
                    self.source = FrameSource(self.p["source"], loop=self.p["loop"],
                                              width=self.p["width"], height=self.p["height"])
                    self.get_logger().info(f"capture source {self.p['source']!r} reopened")
                stamp = self.get_clock().now().to_msg()
                frame = self.source.read()
            except CaptureError as exc:
                self.error = str(exc)
                self.get_logger().error(f"{exc}; retrying in {self.p['retry_seconds']:.1f} s",
                                        throttle_duration_sec=10.0)
                if self.source is not None:
                    self.source.close()
                    self.source = None
                time.sleep(self.p["retry_seconds"])
                continue
            if frame is None:
                self.get_logger().info("source ended")
                return
            self.error = ""
            self.pub.publish(to_msg(frame, stamp, self.p["frame_id"]))
            self.meter.tick()
            pacer.sleep()

    def _report(self):
        values = {"frame_rate": self.meter.rate, "frames": self.meter.count, "source": self.p["source"]}
        if self.error:
            return ERROR, self.error, values
        if self.meter.rate < 0.5 * (self.p["rate"] or 1.0):
            return WARN, "capturing below the configured rate", values
        return OK, "capturing", values

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        if self.source is not None:
            self.source.close()


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(CaptureNode, args)


if __name__ == "__main__":
    main()
