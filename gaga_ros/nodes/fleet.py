"""Fleet render node: one process (one GPU) renders the avatars of many namespaces.

For each namespace NS it serves, it reads NS/avatar/model (latched) and NS/avatar/expression and
publishes NS/avatar/image (stamp = the expression's), as a render node inside NS would; the
rendering itself (batched on CUDA, in turn on the CPU; joins, memory, faults) is the ROS-free
gaga_ros.render.fleet. Which namespaces: the `namespaces` parameter, changeable live (one added
joins, one removed leaves), and with `discover` every namespace whose avatar/model has a publisher
and whose avatar/image has none but this node (a namespace with its own render node is left alone);
a discovered namespace whose model and expression publishers are all gone for `forget_s` leaves.
Named expressions and look_at targets (NS/avatar/named_expression, NS/avatar/look_at(_display)) are
served per namespace as the render node serves them (gaga_ros.nodes.face_inputs): added to that
namespace's live expressions, or shown on its neutral face while it has no live driver.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.publisher import Publisher
from rclpy.subscription import Subscription
from sensor_msgs.msg import Image

from gaga_ros.avatar.backends import RENDER_SIDES, render_device, renderer_for
from gaga_ros.errors import GagaError
from gaga_ros.mailbox import KeyedMailbox
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.msg import GaussianAvatar
from gaga_ros.nodes import face_inputs, names, qos, stamps
from gaga_ros.nodes.avatar_msg import from_msg as avatar_from_msg
from gaga_ros.nodes.diagnostics import OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import from_msg as expression_from_msg
from gaga_ros.nodes.guard import describe
from gaga_ros.nodes.image_msg import to_msg as image_to_msg
from gaga_ros.nodes.managed import ManagedNode
from gaga_ros.nodes.parameters import COMPILE, Param
from gaga_ros.render.fleet import DEFAULT_SLOTS, Fleet, Frame

AVATAR_TYPE = "gaga_ros/msg/GaussianAvatar"
#: How often discovery looks at the graph (it costs one graph query).
DISCOVER_PERIOD_S = 1.0

PARAMS = (
    Param("device", "auto", "Where the avatars live and render: auto (cuda when present), cuda, cpu."),
    Param("size", 512, "Output image side in pixels (GAGAvatar batches on CUDA need the model's 512).",
          low=RENDER_SIDES[0], high=RENDER_SIDES[1]),
    Param("frame_id", "avatar_camera", "frame_id of the published images."),
    Param("models_dir", "", "Folder of the licensed model files (gagavatar avatars need them)."),
    Param("gagavatar_config", "full", "GAGAvatar size: full (published) or tiny (tests)."),
    Param("fast_path", True, "GAGAvatar on CUDA: batched FastRenderer slots (false: each avatar in turn "
          "on the fp32 reference path)."),
    COMPILE,
    Param("namespaces", [""], "Namespaces served, e.g. [robot1, robot2]: NS/avatar/model and "
          "NS/avatar/expression in, NS/avatar/image out ('/' is the root namespace, '' nothing). "
          "Change it live: a namespace added joins, one removed leaves.", read_only=False),
    Param("discover", False, "Also serve every namespace whose avatar/model is published and whose "
          "avatar/image has no other publisher."),
    Param("forget_s", 10.0, "A discovered namespace leaves after its model and expression publishers "
          "have all been gone this long.", low=1.0, high=3600.0),
    Param("slots", DEFAULT_SLOTS, "Avatars per batched frame (GAGAvatar on CUDA); another batch is made "
          "when they are full.", low=1, high=256),
    Param("memory_cap_mb", 0.0, "Most memory the served avatars and batches may hold, MiB (0: no cap "
          "but the device's free memory); a join beyond it is refused, naming both figures.",
          low=0.0, high=1e7),
    *face_inputs.PARAMS,
)


@dataclass
class _Served:
    """One served namespace's topics."""

    model_sub: Subscription
    expression_sub: Subscription
    image_pub: Publisher
    face: face_inputs.FaceInputs
    discovered: bool
    gone_since: float | None = None


class FleetNode(ManagedNode):
    """Serves the avatars of many namespaces from one device."""

    #: rclpy's events executor (gaga_ros.nodes.runtime): it dispatches in C++, where the
    #: multi-threaded one's per-message Python (its wait set rebuilt per callback) held the interpreter
    #: lock against the render worker. bench/fleet_bench.py, 4 geometric avatars at 64 px, 480
    #: expressions/s in, 2-core VM, alternating runs: 8.5 and 4.0 frames/s with it, 32.1 and 16.5 with
    #: the events executor.
    executor_threads = 0

    def __init__(self) -> None:
        super().__init__("gaga_fleet", PARAMS)
        self.fleet: Fleet | None = None
        self.device = "cpu"
        self.served: dict[str, _Served] = {}
        self.served_lock = threading.Lock()
        self.worker: threading.Thread | None = None
        # Rendered frames go to a publisher thread, so the device renders the next round while the
        # last one is serialised and written to DDS (about 1 ms per 512x512 image on the H200 machine's
        # CPU, 16 ms a round of 16; bench/FAST_NOTES.md).
        self.outbox: KeyedMailbox[str, Frame] = KeyedMailbox()
        self.publisher: threading.Thread | None = None
        self.running = False
        self.meter = RateMeter()
        self.latency_ms = 0.0
        self.round_ms = 0.0
        # The inputs of every namespace run side by side (the fleet is thread-safe). In the node's
        # default, mutually exclusive group a waiting expression made rclpy's executor spin on it, its
        # Python wait-set loop holding the interpreter lock against the render worker (profiled: N=4
        # rounds several times N x one render).
        self.inputs = ReentrantCallbackGroup()
        self.add_on_set_parameters_callback(self._check_parameters)
        self.add_post_set_parameters_callback(lambda params: self._follow_namespaces())
        self.create_timer(DISCOVER_PERIOD_S, self._discover)
        self.create_timer(1.0 / face_inputs.IDLE_FPS, self._idle_frames, callback_group=self.inputs)
        self.diagnostics = Diagnostics(self, self._report)
        self.start()

    # ---- lifecycle -------------------------------------------------------------------------------

    def configure(self) -> None:
        self.device = device = render_device(self.p["device"])
        self.fleet = Fleet(lambda name: renderer_for(name, device, self.p["models_dir"] or None,
                                                     self.p["gagavatar_config"], self.p["fast_path"],
                                                     self.p["compile"]),
                           device, self.p["size"], self.p["slots"], self.p["memory_cap_mb"])
        self._follow_namespaces()

    def activate(self) -> None:
        self.running = True
        self.outbox.reopen()
        self.worker = self.guard.worker("fleet", self._serve)
        self.publisher = self.guard.worker("fleet publish", self._publish)

    def deactivate(self) -> None:
        self.running = False
        self.outbox.close()
        if self.fleet is not None:
            self.fleet.wake()
        for thread in (self.worker, self.publisher):
            if thread is not None:
                thread.join(timeout=5)
        self.worker = self.publisher = None

    def cleanup(self) -> None:
        self.deactivate()
        for ns in list(self.served):
            self._leave(ns)
        self.fleet = None

    # ---- membership ------------------------------------------------------------------------------

    def _listed(self) -> set[str]:
        """The `namespaces` parameter as ROS namespaces ("" is the root, written '/')."""
        return {names.namespace(ns) for ns in self.get_parameter("namespaces").value if ns.strip()}

    def _check_parameters(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "namespaces":
                try:
                    for ns in p.value:
                        names.namespace(ns)
                except ValueError as exc:
                    return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _follow_namespaces(self) -> None:
        """Join the listed namespaces not yet served; those served because listed and no longer
        listed leave (discovered ones stay until discovery forgets them)."""
        if self.fleet is None:
            return
        listed = self._listed()
        for ns in sorted(listed - set(self.served)):
            self._join(ns, discovered=False)
        for ns, served in list(self.served.items()):
            if ns not in listed and not served.discovered:
                self._leave(ns)

    def _join(self, ns: str, discovered: bool) -> None:
        if self.fleet is None:
            return
        self.fleet.join(ns)
        model = self.create_subscription(GaussianAvatar, names.in_namespace(ns, names.MODEL),
                                         lambda msg, ns=ns: self._on_avatar(ns, msg), qos.LATCHED,
                                         callback_group=self.inputs)
        expression = self.create_subscription(ExpressionMsg, names.in_namespace(ns, names.EXPRESSION),
                                              lambda msg, ns=ns: self._on_expression(ns, msg),
                                              qos.EXPRESSIONS, callback_group=self.inputs)
        image = self.create_publisher(Image, names.in_namespace(ns, names.IMAGE), qos.FRAMES)
        face = face_inputs.FaceInputs(self, self.p, ns, self.inputs)
        with self.served_lock:
            self.served[ns] = _Served(model, expression, image, face, discovered)
        self.get_logger().info(f"serving {ns or '/'}" + (" (discovered)" if discovered else ""))

    def _leave(self, ns: str) -> None:
        with self.served_lock:
            served = self.served.pop(ns, None)
        if served is None:
            return
        if self.fleet is not None:
            self.fleet.leave(ns)
        self.destroy_subscription(served.model_sub)
        self.destroy_subscription(served.expression_sub)
        served.face.destroy()
        self.destroy_publisher(served.image_pub)
        self.get_logger().info(f"no longer serving {ns or '/'}")

    def _discover(self) -> None:
        """Join namespaces that publish an avatar with nobody rendering it; forget vanished ones."""
        if self.fleet is None or not self.p["discover"]:
            return
        suffix = "/" + names.MODEL
        for topic, types in self.get_topic_names_and_types():
            ns = topic[: -len(suffix)]
            if (not topic.endswith(suffix) or AVATAR_TYPE not in types or ns in self.served
                    or not self.count_publishers(topic)):
                continue
            others = [i for i in self.get_publishers_info_by_topic(names.in_namespace(ns, names.IMAGE))
                      if (i.node_namespace, i.node_name) != (self.get_namespace(), self.get_name())]
            if not others:
                self._join(ns, discovered=True)
        now = time.monotonic()
        for ns, served in list(self.served.items()):
            if not served.discovered:
                continue
            alive = (self.count_publishers(names.in_namespace(ns, names.MODEL))
                     + self.count_publishers(names.in_namespace(ns, names.EXPRESSION)))
            served.gone_since = None if alive else (served.gone_since or now)
            if served.gone_since is not None and now - served.gone_since >= self.p["forget_s"]:
                self._leave(ns)

    # ---- inputs and frames -----------------------------------------------------------------------

    def _on_avatar(self, ns: str, msg: GaussianAvatar) -> None:
        if self.fleet is None:
            return
        try:
            self.fleet.set_avatar(ns, avatar_from_msg(msg, "cpu"))  # memory is checked before upload
        except GagaError as exc:
            self.fleet.fail(ns, f"avatar refused: {exc}")
            raise  # the guard logs and counts it; the other namespaces never wait on it
        self.get_logger().info(f"{ns or '/'}: avatar {msg.avatar_id} ({msg.backend}, {msg.num_gaussians} "
                               f"Gaussians) on {self.device}")

    def _on_expression(self, ns: str, msg: ExpressionMsg) -> None:
        if self.fleet is None:
            return
        expression = expression_from_msg(msg)  # a malformed one raises: the guard refuses it
        served = self.served.get(ns)  # None only while the namespace joins: no command to add yet
        self.fleet.put(ns, served.face.mixer.apply(expression) if served is not None else expression)

    def _idle_frames(self) -> None:
        """Each namespace's neutral face with its named command or look_at while no live driver
        carries them (as the render node does)."""
        if self.fleet is None:
            return
        for ns, served in list(self.served.items()):
            expr = served.face.mixer.idle()
            if expr is not None:
                self.fleet.put(ns, expr)

    def _serve(self) -> None:
        fleet = self.fleet
        while self.running and fleet is not None:
            if not fleet.wait(0.5):
                continue
            t0 = time.perf_counter()
            result = fleet.render_round()
            self.round_ms = (time.perf_counter() - t0) * 1e3
            self.outbox.put({frame.key: frame for frame in result.frames})
            for ns, exc in result.errors.items():
                self.guard.refuse(f"render {ns or '/'}", describe(exc))

    def _publish(self) -> None:
        while not self.outbox.closed:
            for key, frame in self.outbox.get().items():
                msg = image_to_msg(frame.image, stamps.from_ns(frame.expression.stamp_ns), self.p["frame_id"])
                with self.served_lock:  # a namespace leaving destroys its publisher under this lock
                    served = self.served.get(key)
                    if served is None:  # left since its round
                        continue
                    served.image_pub.publish(msg)
                self.latency_ms = (self.get_clock().now().nanoseconds - frame.expression.stamp_ns) / 1e6
                self.meter.tick()

    def _report(self):
        fleet = self.fleet
        if fleet is None:
            return WARN, "not configured", {}
        members = fleet.snapshot()
        values = {"avatars": len(members), "frame_rate": self.meter.rate, "frames": self.meter.count,
                  "latency_ms": self.latency_ms, "round_ms": self.round_ms, "batches": len(fleet.batches),
                  "superseded_frames": self.outbox.dropped,
                  "memory_mb": fleet.used_bytes() / 2**20, "device": self.device,
                  "named_commands": sum(s.face.count for s in list(self.served.values()))}
        for m in members:
            label = m.key or "/"
            values[f"{label} frames"] = m.frames
            values[f"{label} dropped"] = m.dropped
            values[f"{label} state"] = m.error or ("serving" if m.avatar is not None
                                                   else "waiting for an avatar")
        failing = [m for m in members if m.error]
        message = f"serving {sum(m.avatar is not None for m in members)} of {len(members)} avatars"
        if failing:
            return WARN, f"{message}; {failing[0].key or '/'}: {failing[0].error}", values
        return OK, message, values


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(FleetNode, args)


if __name__ == "__main__":
    main()
