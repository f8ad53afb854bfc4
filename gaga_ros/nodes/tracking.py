"""Tracking node: /camera/image_raw -> /avatar/expression (mesh or FLAME mode) and /tracking/status.

Each expression carries the capture stamp of its camera frame. Tracking runs on a worker over a
one-slot mailbox, so a slow frame skips stale camera frames instead of queueing them.
"""

from __future__ import annotations

import time

from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import CompressedImage, Image
from std_srvs.srv import Trigger

from gaga_ros.errors import InputError
from gaga_ros.mailbox import Mailbox
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.msg import TrackingStatus
from gaga_ros.nodes import names, qos, stamps
from gaga_ros.nodes.diagnostics import OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import to_msg as expression_to_msg
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.image_msg import to_rgb
from gaga_ros.nodes.parameters import Param, declare
from gaga_ros.tracking.smoothing import FACE_SMOOTHING, OneEuroSettings
from gaga_ros.tracking.tracker import Tracker, make_tracker, resolve_mode

#: image_transport's names: raw images on the camera topic, JPEG/PNG on its /compressed sub-topic.
CAMERA_TOPICS = {"raw": (names.CAMERA_IMAGE, Image),
                 "compressed": (names.CAMERA_IMAGE_COMPRESSED, CompressedImage)}

PARAMS = (
    Param("camera_transport", "raw", "Camera input: raw (sensor_msgs/Image on /camera/image_raw) or "
          "compressed (JPEG/PNG CompressedImage on /camera/image_raw/compressed)."),
    Param("mode", "auto", "Face model: mesh (mediapipe, no assets), flame (needs a FLAME model in "
          "models_dir; see `gaga-ros assets`) or auto (flame when that model is present, else mesh)."),
    Param("models_dir", "", "Folder of the licensed model files (empty: $GAGA_ROS_MODELS or ./models)."),
    Param("flame_steps", 3, "FLAME mode: most Levenberg-Marquardt iterations per frame (it stops "
          "early once converged; more only cost time).", low=1, high=500),
    Param("min_confidence", 0.5, "Detections below this confidence count as no face.", low=0.0,
          high=1.0),
    Param("reference_frames", 15, "Frames averaged into the driver's neutral reference.", low=1,
          high=300),
    Param("min_cutoff", FACE_SMOOTHING.min_cutoff, "One Euro filter of the expression (landmark) motion, "
          "mesh mode: cutoff (Hz) for a still face; lower = steadier. The head pose and the eyelids have "
          "their own filters (gaga_ros/tracking/smoothing.py).", read_only=False, low=0.01, high=30.0),
    Param("beta", FACE_SMOOTHING.beta, "One Euro filter: how fast the cutoff opens with speed; "
          "higher = less lag.", read_only=False, low=0.0, high=100.0),
    Param("d_cutoff", FACE_SMOOTHING.d_cutoff, "One Euro filter: cutoff (Hz) of the speed estimate; "
          "higher = the speed term opens sooner.", read_only=False, low=0.01, high=30.0),
    Param("silent_after_s", 1.0, "No camera frame for this long: the status says the camera is silent "
          "(no face), so an idle driver takes over; the next frames start a new neutral reference (a "
          "new operator may be in front of it).", low=0.1, high=60.0),
)

SMOOTHING = ("min_cutoff", "beta", "d_cutoff")


class TrackingNode(GuardedNode):
    """Runs the mesh tracker on the newest camera frame."""

    executor_threads = 1  # its callbacks fill a mailbox; tracking runs on the worker thread

    def __init__(self) -> None:
        super().__init__("gaga_tracking")
        self.p = declare(self, PARAMS)
        self.tracker = self._make_tracker()
        if self.p["camera_transport"] not in CAMERA_TOPICS:
            raise InputError(f"camera_transport {self.p['camera_transport']!r}: accepted are "
                             f"{', '.join(CAMERA_TOPICS)}")
        self.mailbox: Mailbox[Image | CompressedImage] = Mailbox()
        self.meter = RateMeter()
        self.pub = self.create_publisher(ExpressionMsg, names.EXPRESSION, qos.EXPRESSIONS)
        self.pub_status = self.create_publisher(TrackingStatus, names.TRACKING_STATUS, qos.LATCHED)
        self.camera_topic, msg_type = CAMERA_TOPICS[self.p["camera_transport"]]
        self.create_subscription(msg_type, self.camera_topic, self.mailbox.put, qos.FRAMES)
        self.create_service(Trigger, names.RESET_REFERENCE, self._on_reset)
        self.add_on_set_parameters_callback(self._on_params)
        self.diagnostics = Diagnostics(self, self._report)
        self.create_timer(1.0, self._publish_status)
        self._last_found: bool | None = None
        self.last_frame: float | None = None  # monotonic time of the newest camera frame
        self.silent = False
        self.create_timer(0.25, self._watch_camera)
        self.worker = self.guard.serve("tracking", self.resolve_topic_name(self.camera_topic), self.mailbox,
                                       self._track)

    def _make_tracker(self) -> Tracker:
        models_dir = self.p["models_dir"] or None
        mode = resolve_mode(self.p["mode"], models_dir)
        if self.p["mode"] == "auto":
            self.get_logger().info(f"tracking mode auto: {mode} (FLAME model "
                                   f"{'found' if mode == 'flame' else 'not found'})")
        return make_tracker(mode, models_dir, min_confidence=self.p["min_confidence"],
                            flame_steps=self.p["flame_steps"], smoothing=self._smoothing(),
                            reference_frames=self.p["reference_frames"])

    def _smoothing(self) -> OneEuroSettings:
        return OneEuroSettings(**{k: self.p[k] for k in SMOOTHING})

    def _on_params(self, params) -> SetParametersResult:
        changed = {p.name: p.value for p in params if p.name in SMOOTHING}
        if changed:
            self.p.update(changed)
            self.tracker.set_smoothing(self._smoothing())
        return SetParametersResult(successful=True)

    def _on_reset(self, request, response):
        self.tracker.reset_reference()
        response.success, response.message = True, "collecting a new neutral reference"
        return response

    def _watch_camera(self) -> None:
        if not self.silent and self.last_frame is not None and \
                time.monotonic() - self.last_frame > self.p["silent_after_s"]:
            self.silent = True
            self.get_logger().info(f"camera silent for {self.p['silent_after_s']:g} s")
            self._publish_status()

    def _track(self, msg: Image | CompressedImage) -> None:
        """One camera frame -> one expression (or a status change); a bad image raises (refused)."""
        self.last_frame = time.monotonic()
        if self.silent:
            self.silent = False
            self.tracker.reset_reference()
        expr = self.tracker.update(to_rgb(msg), stamps.to_ns(msg.header.stamp))
        if expr is None:
            self.get_logger().info(f"no face: {self.tracker.status.message}", throttle_duration_sec=5.0)
        else:
            expr.frame_id = msg.header.frame_id
            self.pub.publish(expression_to_msg(expr, msg.header.stamp))
            self.meter.tick()
        if self.tracker.status.face_found != self._last_found:
            self._publish_status()

    def _publish_status(self) -> None:
        s = self.tracker.status
        if self.silent and self.last_frame is not None:  # silent only after a first frame
            lost = time.monotonic() - self.last_frame
            msg = TrackingStatus(face_found=False, confidence=0.0, face_lost_seconds=float(lost),
                                 message="camera silent")
        else:
            msg = TrackingStatus(face_found=s.face_found, confidence=float(s.confidence),
                                 face_lost_seconds=float(s.face_lost_seconds), message=s.message)
        self._last_found = msg.face_found
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub_status.publish(msg)

    def _report(self):
        s = self.tracker.status
        values = {"frame_rate": self.meter.rate, "expressions": self.meter.count,
                  "confidence": s.confidence, "face_lost_seconds": s.face_lost_seconds,
                  "dropped_frames": self.mailbox.dropped,
                  "refused_images": self.guard.counts[self.resolve_topic_name(self.camera_topic)]}
        if self.silent:
            return WARN, f"camera silent ({self.camera_topic} sends no frames)", values
        if not s.face_found:
            return WARN, s.message, values
        return OK, "tracking", values

    def close(self) -> None:
        self.mailbox.close()
        self.worker.join(timeout=2)
        self.tracker.close()


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(TrackingNode, args)


if __name__ == "__main__":
    main()
