"""Render node: newest /avatar/expression + cached avatar -> /avatar/image (stamp = expression's).

The avatar arrives once on /avatar/model (latched) and stays on the device; per frame only the
expression moves it. Rendering runs on its own thread over a one-slot mailbox: a slow frame makes
the next one skip stale expressions instead of queueing them. Named expressions and look_at targets
(gaga_ros.named) are added on top of each live expression, or shown on the neutral face while no
driver is live.
"""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from gaga_ros.avatar.backends import RENDER_SIDES, render_device, renderer_for
from gaga_ros.avatar.base import Avatar, AvatarBackend
from gaga_ros.errors import GagaError
from gaga_ros.expression import Expression
from gaga_ros.mailbox import Mailbox
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.msg import GaussianAvatar, TrackingStatus
from gaga_ros.nodes import face_inputs, names, qos, stamps
from gaga_ros.nodes.avatar_msg import from_msg as avatar_from_msg
from gaga_ros.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import from_msg as expression_from_msg
from gaga_ros.nodes.image_msg import to_msg as image_to_msg
from gaga_ros.nodes.managed import ManagedNode
from gaga_ros.nodes.parameters import COMPILE, Param

PARAMS = (
    Param("device", "auto", "Where the avatar lives and renders: auto (cuda when present), cuda, cpu."),
    Param("size", 512, "Output image side in pixels.", read_only=False, low=RENDER_SIDES[0],
          high=RENDER_SIDES[1]),
    Param("cpu_threads", 1, "CPU rendering: threads of the numba rasterizer. 1 is fastest when other "
          "processes share the cores (the whole graph on one machine: 21 ms a frame against 67 ms with "
          "2 threads, 2 cores, one other busy process); more for a render node with cores of its own.",
          low=1, high=256),
    Param("jpeg_quality", 85, "Quality of /avatar/image/compressed (JPEG).", read_only=False, low=10,
          high=100),
    Param("frame_id", "avatar_camera", "frame_id of the published images."),
    Param("models_dir", "", "Folder of the licensed model files (gagavatar avatars need them)."),
    Param("gagavatar_config", "full", "GAGAvatar size: full (published) or tiny (tests)."),
    Param("fast_path", True, "GAGAvatar on CUDA: CUDA graphs + fp16 refiner (about 5x faster, ~55 dB "
          "from the fp32 path); false renders the fp32 reference path."),
    COMPILE,
    *face_inputs.PARAMS,
)


class RenderNode(ManagedNode):
    """Keeps the avatar on the device and renders each newest expression."""

    executor_threads = 1  # its callbacks fill a mailbox; rendering runs on the worker thread

    def __init__(self) -> None:
        super().__init__("gaga_render", PARAMS)
        self.device = "cpu"
        self.avatar: Avatar | None = None
        self.backend: AvatarBackend | None = None
        self.lock = threading.Lock()
        self.mailbox: Mailbox[Expression] = Mailbox()
        self.worker: threading.Thread | None = None
        self.meter = RateMeter()
        self.latency_ms = 0.0
        self.render_ms = 0.0
        self.error = ""
        self.tracking: TrackingStatus | None = None
        self.pub = self.create_publisher(Image, names.IMAGE, qos.FRAMES)
        self.pub_jpeg = self.create_publisher(CompressedImage, names.IMAGE_COMPRESSED, qos.FRAMES)
        self.avatar_sub = None  # made on configure: a fresh transient-local reader gets the avatar back
        self.face = face_inputs.FaceInputs(self, self.p)
        self.create_subscription(ExpressionMsg, names.EXPRESSION, self._on_expression,
                                 qos.EXPRESSIONS)
        self.create_timer(1.0 / face_inputs.IDLE_FPS, self._idle_frame)
        self.create_subscription(TrackingStatus, names.TRACKING_STATUS,
                                 lambda m: setattr(self, "tracking", m), qos.LATCHED)
        self.diagnostics = Diagnostics(self, self._report)
        self.start()

    def configure(self) -> None:
        self.device = render_device(self.p["device"])
        self.avatar_sub = self.create_subscription(GaussianAvatar, names.MODEL, self._on_avatar,
                                                   qos.LATCHED)

    def activate(self) -> None:
        self.mailbox.reopen()
        self.worker = self.guard.serve("render", self.resolve_topic_name(names.EXPRESSION), self.mailbox,
                                       self._render_newest)

    def deactivate(self) -> None:
        self.mailbox.close()
        if self.worker is not None:
            self.worker.join(timeout=5)
            self.worker = None

    def cleanup(self) -> None:
        self.deactivate()
        if self.avatar_sub is not None:
            self.destroy_subscription(self.avatar_sub)
            self.avatar_sub = None
        self.avatar, self.backend = None, None
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _on_avatar(self, msg: GaussianAvatar) -> None:
        if self.avatar is not None and self.avatar.avatar_id == msg.avatar_id:
            return
        try:
            avatar = avatar_from_msg(msg, self.device)
            backend = (self.backend if self.backend is not None and self.backend.name == avatar.backend
                       else renderer_for(avatar.backend, self.device, self.p["models_dir"] or None,
                                         self.p["gagavatar_config"], self.p["fast_path"], self.p["compile"]))
        except GagaError as exc:
            self.error = f"avatar refused: {exc}"  # ERROR while there is no avatar to keep serving
            raise  # the guard logs it; diagnostics WARN while a previous avatar keeps serving
        with self.lock:
            self.avatar, self.backend, self.error = avatar, backend, ""
        self.get_logger().info(f"avatar {avatar.avatar_id} ({avatar.backend}, {len(avatar)} Gaussians) "
                               f"cached on {self.device}")

    def _on_expression(self, msg: ExpressionMsg) -> None:
        # A malformed one raises: the guard refuses it.
        self.mailbox.put(self.face.mixer.apply(expression_from_msg(msg)))

    def _idle_frame(self) -> None:
        """The neutral face with a named command or look_at while no live driver carries them."""
        if self.worker is not None:
            expr = self.face.mixer.idle()
            if expr is not None:
                self.mailbox.put(expr)

    def _render_newest(self, expr: Expression) -> None:
        if self.device == "cpu":  # numba's thread count is per calling thread: this worker's
            import numba

            most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at import, untyped
            numba.set_num_threads(min(self.p["cpu_threads"], most))
        with self.lock:
            avatar, backend = self.avatar, self.backend
        if avatar is not None:
            self._render(avatar, backend, expr)

    def _render(self, avatar: Avatar, backend, expr: Expression) -> None:
        t0 = time.perf_counter()
        image = backend.render(avatar, expr, size=int(self.get_parameter("size").value))
        self.render_ms = (time.perf_counter() - t0) * 1e3
        stamp = stamps.from_ns(expr.stamp_ns)
        self.pub.publish(image_to_msg(image, stamp, self.p["frame_id"]))
        if self.pub_jpeg.get_subscription_count() > 0:
            self._publish_jpeg(image, stamp)
        now_ns = self.get_clock().now().nanoseconds
        self.latency_ms = (now_ns - expr.stamp_ns) / 1e6
        self.meter.tick()

    def _publish_jpeg(self, image: np.ndarray, stamp) -> None:
        quality = int(self.get_parameter("jpeg_quality").value)
        ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            msg = CompressedImage(format="jpeg", data=data.tobytes())
            msg.header.stamp, msg.header.frame_id = stamp, self.p["frame_id"]
            self.pub_jpeg.publish(msg)

    def _report(self):
        refused = {t: self.guard.counts[self.resolve_topic_name(t)] for t in (
            names.EXPRESSION, *face_inputs.TOPICS)}
        values = {"frame_rate": self.meter.rate, "frames": self.meter.count,
                  "latency_ms": self.latency_ms, "render_ms": self.render_ms,
                  "dropped_expressions": self.mailbox.dropped,
                  "rejected_expressions": refused.pop(names.EXPRESSION),
                  "named_commands": self.face.count,
                  "rejected_named": sum(refused.values()),
                  "device": self.device}
        if self.device == "cuda":
            import torch

            values["gpu_memory_mb"] = torch.cuda.memory_allocated() / 2**20
        if self.tracking is not None:
            values["face_found"] = self.tracking.face_found
            values["face_lost_seconds"] = self.tracking.face_lost_seconds
        if self.avatar is None and self.error:
            return ERROR, self.error, values
        if self.avatar is None:
            return WARN, f"waiting for an avatar on {self.resolve_topic_name(names.MODEL)}", values
        if self.tracking is not None and not self.tracking.face_found:
            if self.meter.rate > 0:  # another driver keeps the face moving (the loop's idle driver)
                return OK, f"rendering; tracking: {self.tracking.message}", values
            return WARN, f"driver: {self.tracking.message}", values
        return OK, "rendering", values


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(RenderNode, args)


if __name__ == "__main__":
    main()
