"""Reconstruction node: a source photo -> a Gaussian avatar on /avatar/model (latched).

The photo comes from the `source_path` parameter at start (built-in astronaut when empty), from
/avatar/source_image (sensor_msgs/Image) or from the /avatar/set_source service. A photo without a
usable face is refused with the reason, and the previous avatar keeps serving.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from sensor_msgs.msg import Image

from gaga_ros.avatar.base import Avatar
from gaga_ros.errors import GagaError, InputError, UnavailableError
from gaga_ros.msg import GaussianAvatar
from gaga_ros.nodes import names, qos
from gaga_ros.nodes.avatar_msg import to_msg
from gaga_ros.nodes.diagnostics import ERROR, OK, WARN, Diagnostics
from gaga_ros.nodes.image_msg import from_msg as image_from_msg
from gaga_ros.nodes.managed import ManagedNode
from gaga_ros.nodes.parameters import Param
from gaga_ros.source import default_source, load_image
from gaga_ros.srv import SetSource

PARAMS = (
    Param("backend", "auto", "Avatar backend: auto (gagavatar when its weights and FLAME are in "
          "models_dir, else geometric), geometric (asset-free) or gagavatar."),
    Param("models_dir", "", "Folder of the licensed model files (empty: $GAGA_ROS_MODELS or ./models)."),
    Param("gagavatar_config", "full", "GAGAvatar size: full (published) or tiny (tests)."),
    Param("source_path", "", "Source photo read at start, relative to source_dir when that is set, "
          "else to the working directory; empty: the built-in astronaut."),
    Param("source_dir", "", "Folder that photo paths must lie in (empty: the folder of source_path, "
          "else the working directory). Paths outside it are refused; the service's relative paths "
          "are read from it."),
    Param("device", "cpu", "Device to reconstruct on: cpu, cuda or auto."),
    Param("grid", 192, "Geometric backend: lifted pixels per side of the head crop.", low=32, high=512),
)


class ReconstructionNode(ManagedNode):
    """Builds avatars from photos and publishes the current one, reliable and transient-local."""

    def __init__(self) -> None:
        super().__init__("gaga_reconstruction", PARAMS)
        self.backend: Any = None  # GeometricAvatar or GagaAvatarBackend, chosen on configure
        self.avatar: Avatar | None = None
        self.error = ""
        self._lock = threading.Lock()
        self.pub = self.create_publisher(GaussianAvatar, names.MODEL, qos.LATCHED)
        group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(Image, names.SOURCE_IMAGE, self._on_image, 1, callback_group=group)
        self.create_service(SetSource, names.SET_SOURCE, self._on_service, callback_group=group)
        self.diagnostics = Diagnostics(self, self._report)
        self.start()

    def source_dir(self) -> Path:
        if self.p["source_dir"]:
            return Path(self.p["source_dir"]).expanduser().resolve()
        if self.p["source_path"]:
            return Path(self.p["source_path"]).expanduser().resolve().parent
        return Path.cwd().resolve()

    def start_path(self) -> Path:
        """source_path as the user meant it: relative to source_dir when set, else to the working
        directory (whose folder of the photo is then source_dir), confined like any other path."""
        path = Path(self.p["source_path"]).expanduser()
        return self.confined(str(path if self.p["source_dir"] else path.resolve()))

    def confined(self, path: str) -> Path:
        """`path` resolved inside source_dir (a relative one from there); InputError for anything
        outside it."""
        root = self.source_dir()
        full = (root / Path(path).expanduser()).resolve()
        if not full.is_relative_to(root):
            raise InputError(f"{path!r} lies outside source_dir {root}; photos are only read there")
        return full

    def configure(self) -> None:
        from gaga_ros.avatar.backends import choose_backend, make_backend, resolve_device

        models_dir = self.p["models_dir"] or None
        name, note = choose_backend(self.p["backend"], models_dir)
        if note:
            self.get_logger().info(note)
        # the geometric avatar lifts a photo on the CPU whatever the device (numpy, once per photo)
        device = "cpu" if name == "geometric" else resolve_device(self.p["device"])
        self.backend = make_backend(name, device, models_dir, self.p["gagavatar_config"], self.p["grid"])

    def activate(self) -> None:
        if self.avatar is None:
            label = self.p["source_path"] or "built-in astronaut"
            try:
                photo = load_image(self.start_path()) if self.p["source_path"] else default_source()
                self.build(photo, label)
            except GagaError as exc:  # the activation fails; diagnostics (and so the pages) say why
                self.error = f"{label}: {exc}"
                raise
        else:
            self.publish()

    def cleanup(self) -> None:
        self.backend = None

    def build(self, rgb: np.ndarray, label: str) -> Avatar:
        """Reconstruct and publish; on failure raise, keeping the previous avatar."""
        if self.backend is None:
            raise UnavailableError("node is not configured")
        with self._lock:
            avatar = self.backend.reconstruct(rgb)
            self.avatar = avatar
            self.error = ""
        for note in avatar.warnings:
            self.get_logger().warning(f"{label}: {note}")
        self.get_logger().info(f"avatar {avatar.avatar_id} from {label}: {len(avatar)} Gaussians")
        self.publish()
        return avatar

    def publish(self) -> None:
        if self.active and self.avatar is not None:
            self.pub.publish(to_msg(self.avatar, self.get_clock().now().to_msg()))

    def _try_build(self, load, label: str, source: str) -> tuple[bool, str]:
        """Build from `load()`; (ok, what happened). `source` names the input (topic or service) for
        the guard's counts, `label` the photo for the messages."""
        if not self.active:  # an inactive node publishes nothing: building now would be lost work
            name = self.get_fully_qualified_name()
            reason = (f"{name} is not active, so it would publish nothing: activate it "
                      f"(ros2 lifecycle set {name} activate) and send the photo again")
            self.guard.refuse(source, reason)
            return False, reason
        try:
            avatar = self.build(load(), label)
        except GagaError as exc:
            self.error = f"{label}: {exc}"
            self.guard.refuse(source, f"{self.error}; keeping the previous avatar")
            return False, str(exc)
        notes = "".join(f"; {note}" for note in avatar.warnings)
        return True, f"avatar {avatar.avatar_id} built from {label}{notes}"

    def _on_image(self, msg: Image) -> None:
        topic = self.resolve_topic_name(names.SOURCE_IMAGE)
        self._try_build(lambda: image_from_msg(msg), topic, topic)

    def _on_service(self, req: SetSource.Request, resp: SetSource.Response) -> SetSource.Response:
        service = self.resolve_service_name(names.SET_SOURCE)
        if req.path:
            ok, message = self._try_build(lambda: load_image(self.confined(req.path)), req.path, service)
        else:
            ok, message = self._try_build(lambda: image_from_msg(req.image), "service image", service)
        resp.success, resp.message = ok, message
        resp.avatar_id = self.avatar.avatar_id if self.avatar is not None else ""
        return resp

    def _report(self):
        values = {"avatar_id": self.avatar.avatar_id if self.avatar else "",
                  "gaussians": len(self.avatar) if self.avatar else 0, "refused_source": self.error}
        if self.avatar is None:
            return ERROR, self.error or "no avatar yet", values
        if self.error:
            return WARN, f"last source refused: {self.error}", values
        return OK, "serving avatar", values


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(ReconstructionNode, args)


if __name__ == "__main__":
    main()
