"""WebRTC bridge node: avatar/image -> browsers and face displays, with the telepresence loop's sound.

Out to the pages: the avatar (all), the operator's voice (kiosk, viewers), the robot's voice from
robot/audio and the kiosk microphone (operator), the robot's camera (operator, robot_camera).
In from the pages: the operator's camera -> upstream_topic, the operator's voice -> operator/audio,
JSON expressions -> avatar/expression, avatar/named_expression, avatar/look_at(_display). The
pages' plain-words status takes the render and reconstruction nodes' diagnostics and the tracking
status. The streaming itself lives in gaga_ros.stream.
"""

from __future__ import annotations

import array
import os

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import Image

from gaga_ros import audio
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression
from gaga_ros.msg import AudioChunk, DisplayPoint, NamedExpression, TrackingStatus
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.named import LookAt, NamedCommand
from gaga_ros.nodes import names, qos, rosout, stamps
from gaga_ros.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import named_to_msg
from gaga_ros.nodes.expression_msg import to_msg as expression_to_msg
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.image_msg import from_msg, to_msg
from gaga_ros.nodes.parameters import Param, declare
from gaga_ros.stream import StreamServer, stamp_code
from gaga_ros.stream.janus import SfuConfigError, SfuSettings
from gaga_ros.stream.webrtc import BITRATES_KBPS, FRAME_RATES, OUTPUT_SIDES

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
    Param("bitrate_kbps", 1000, "Target video bitrate; can change live.", read_only=False,
          low=BITRATES_KBPS[0], high=BITRATES_KBPS[1]),
    Param("max_fps", 30.0, "Highest frame rate sent to viewers.", low=FRAME_RATES[0], high=FRAME_RATES[1]),
    Param("width", 0, "Output width (0: as rendered).", low=0, high=OUTPUT_SIDES[1]),
    Param("height", 0, "Output height (0: as rendered).", low=0, high=OUTPUT_SIDES[1]),
    Param("certfile", "", "TLS certificate (PEM); with keyfile the bridge serves HTTPS."),
    Param("keyfile", "", "TLS private key (PEM)."),
    Param("ice_servers", [""], "STUN/TURN URLs, e.g. stun:stun.example.org:3478 or "
          "turn:turn.example.org:3478 (empty: none); passed to every page and used by the bridge."),
    Param("turn_credentials_env", "GAGA_ROS_TURN_CREDENTIALS", "Environment variable holding "
          "username:credential for the turn: and turns: URLs of ice_servers (kept out of parameters)."),
    Param("image_topic", names.IMAGE, "Frames to stream."),
    Param("upstream_topic", names.OPERATOR_IMAGE, "Where the operator's webcam is republished "
          "(driver:=operator makes it the tracking node's camera topic)."),
    Param("robot_camera", "", "An Image topic of the robot's camera to show on the operator's page "
          "(empty: none)."),
    Param("frame_codes", False, "Paint each frame's stamp (the driving camera frame's time, in ms mod "
          "65536) as a frame code in the top-left corner, so a page opened with ?codes=1 measures "
          "camera-to-display latency (bench/loop_bench.py). Off in use: the code is visible."),
    Param("sfu", "none", "none: viewers get the stream from this bridge; janus: it publishes once into a "
          "Janus VideoRoom (janus_url, janus_room) and viewer pages subscribe there through this bridge "
          "(same token rules), kiosk pages too (their microphone comes here); operator pages stay direct."),
    Param("janus_url", "http://127.0.0.1:8088/janus", "Janus's HTTP API (sfu:=janus); keep Janus on "
          "loopback: pages never talk to it, only its media ports must be reachable."),
    Param("janus_room", 1234, "VideoRoom number (sfu:=janus); created with the secret as pin and secret "
          "when Janus does not have it.", low=1, high=2**31 - 1),
    Param("janus_secret_env", "GAGA_ROS_JANUS_SECRET", "Environment variable holding the room's pin and "
          "secret and Janus's API secret (sfu:=janus; kept out of parameters)."),
    Param("operator_drives", False, "An operator's page drives this face (driver:=operator sets it): "
          "the pages say when no operator is connected."),
    Param("operator_fps", 30.0, "Most frames per second of the operator's camera: the page asks its camera "
          "for no more and the bridge drops faster ones. Tracking a camera faster than the render node "
          "renders only queues work: the CPU profile sets 15 (bench/LOOP_NOTES.md).", low=FRAME_RATES[0],
          high=FRAME_RATES[1]),
    Param("max_operators", 1, "Operators connected at once; the next one waits (409, the page says "
          "so).", low=1, high=16),
)

#: The stream server's logger (gaga_ros.stream logs with the standard library); forwarded to /rosout.
STREAM_LOGGER = "gaga_ros.stream"


class BridgeNode(GuardedNode):
    """Feeds the newest avatar frame to the stream server and publishes what the page sends back."""

    executor_threads = 1  # callbacks hand frames and sound to the stream server's thread

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
        self.pub_voice = self.create_publisher(AudioChunk, names.OPERATOR_AUDIO, qos.AUDIO)
        self.voice_out = RateMeter()
        size = (self.p["width"], self.p["height"]) if self.p["width"] and self.p["height"] else (None,
                                                                                              None)
        self.server = StreamServer(
            host=self.p["host"], port=self.p["port"], token=os.environ.get(self.p["token_env"]) or None,
            codec=self.p["codec"], bitrate_kbps=self.p["bitrate_kbps"], max_fps=self.p["max_fps"],
            width=size[0], height=size[1], certfile=self.p["certfile"] or None,
            keyfile=self.p["keyfile"] or None, ice_servers=self._ice_servers(),
            token_on_loopback=self.p["token_on_loopback"],
            allowed_hosts=[h for h in self.p["allowed_hosts"] if h],
            allowed_origins=[o for o in self.p["allowed_origins"] if o],
            on_upstream_frame=self._on_upstream, on_expression=self._on_expression,
            on_named=self._on_named, on_operator_audio=self._on_operator_audio,
            max_operators=self.p["max_operators"], operator_fps=self.p["operator_fps"],
            robot_camera=bool(self.p["robot_camera"]),
            operator_drives=self.p["operator_drives"],
            sfu=self._sfu()).start()
        self.get_logger().info(f"viewer at {self.server.url} (kiosk: {self.server.url}kiosk, operator: "
                               f"{self.server.url}operator)")
        self.create_subscription(Image, self.p["image_topic"], self._on_image, qos.FRAMES)
        self.create_subscription(AudioChunk, names.ROBOT_AUDIO, self._on_robot_audio, qos.AUDIO)
        self.create_subscription(TrackingStatus, names.TRACKING_STATUS, self._on_tracking, qos.LATCHED)
        self.create_subscription(DiagnosticArray, names.DIAGNOSTICS, self._on_diagnostics, 10)
        if self.p["robot_camera"]:
            self.create_subscription(Image, self.p["robot_camera"], self._on_robot_camera, qos.FRAMES)
        self.add_on_set_parameters_callback(self._on_params)
        self.diagnostics = Diagnostics(self, self._report)

    def _ice_servers(self) -> list[dict]:
        """ice_servers with the TURN credentials from the environment (never from a parameter)."""
        secret = os.environ.get(self.p["turn_credentials_env"], "")
        if secret and ":" not in secret:
            raise InputError(f"{self.p['turn_credentials_env']} must be username:credential")
        user, _, credential = secret.partition(":")
        servers = []
        for url in (u for u in self.p["ice_servers"] if u):
            server = {"urls": url}
            if url.startswith(("turn:", "turns:")):
                if not secret:
                    raise InputError(f"TURN server {url} needs credentials: set "
                                     f"{self.p['turn_credentials_env']}=username:credential in the "
                                     "bridge's environment")
                server.update(username=user, credential=credential)
            servers.append(server)
        return servers

    def _sfu(self) -> SfuSettings | None:
        """Where to publish for many viewers (sfu:=janus), the secret from the environment."""
        if self.p["sfu"] == "none":
            return None
        if self.p["sfu"] != "janus":
            raise SfuConfigError(f"sfu {self.p['sfu']!r}: accepted are none and janus")
        secret = os.environ.get(self.p["janus_secret_env"], "")
        if not secret:
            raise SfuConfigError(f"sfu:=janus needs the room's secret: set {self.p['janus_secret_env']}"
                                 "=<a long random string> in the bridge's environment (Janus's api_secret "
                                 "and the room's pin and secret)")
        return SfuSettings(self.p["janus_url"], self.p["janus_room"], secret)

    def _on_params(self, params) -> SetParametersResult:
        for p in params:
            if p.name == "bitrate_kbps":
                self.server.set_bitrate(p.value)
        return SetParametersResult(successful=True)

    def _on_image(self, msg: Image) -> None:
        rgb, stamp_ns = from_msg(msg), stamps.to_ns(msg.header.stamp)  # bad ones raise: refused
        if self.p["frame_codes"]:
            rgb = stamp_code(rgb.copy(), stamp_ns // 1_000_000)
        self.server.push_frame(rgb, stamp_ns)
        self.frames_in.tick()

    def _on_robot_camera(self, msg: Image) -> None:
        self.server.push_robot_camera(from_msg(msg), stamps.to_ns(msg.header.stamp))

    def _on_robot_audio(self, msg: AudioChunk) -> None:
        """The robot's voice for the operator; a chunk of another rate or channel count is resampled,
        a malformed one raises (refused and counted)."""
        self.server.push_robot_audio(audio.pcm(np.asarray(msg.data, np.int16), msg.sample_rate, msg.channels,
                                               stamps.to_ns(msg.header.stamp)))

    def _on_operator_audio(self, chunk: audio.Pcm) -> None:
        msg = AudioChunk(sample_rate=chunk.sample_rate, channels=chunk.channels)
        msg.header.stamp = stamps.from_ns(chunk.stamp_ns)
        msg.header.frame_id = "operator_mic"
        msg.data = array.array("h", chunk.samples.astype(np.int16, copy=False).tobytes())  # 8x a list
        self.pub_voice.publish(msg)
        self.voice_out.tick()

    def _on_tracking(self, msg: TrackingStatus) -> None:
        self.server.set_note("tracking", None if msg.face_found else f"Tracking: {msg.message}.")

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        """The render and reconstruction nodes of this namespace, as the pages should say it: the
        renderer's refusals and errors, and a source photo the reconstruction refused (without it a
        bad photo at start showed only as the renderer waiting for an avatar)."""
        for status in msg.status:
            namespace, _, name = status.hardware_id.rpartition("/")
            if (namespace or "/") != self.get_namespace():
                continue
            if "render" in name:
                problem = status.level in (WARN, ERROR) and status.message
                self.server.set_note("render", f"The avatar renderer says: {status.message}." if problem
                                     else None)
            elif "reconstruction" in name:
                refused = next((kv.value for kv in status.values if kv.key == "refused_source"), "")
                self.server.set_note("source", f"The avatar builder refused a photo: {refused}." if refused
                                     else None)

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
        elif look is not None and look.point is not None:
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
                  "operators": stats["operators"], "operator_voice_chunks_per_s": self.voice_out.rate,
                  "operator_voice_dbfs": stats["voices"]["operator"]["dbfs"],
                  "robot_voice_dbfs": stats["voices"]["robot"]["dbfs"],
                  "refused_frames": self.guard.counts[self.resolve_topic_name(self.p["image_topic"])]}
        sfu = stats["sfu"]
        if sfu is not None:
            values.update(sfu_state=sfu["state"], sfu_viewers=sfu["viewers"], sfu_publishes=sfu["publishes"],
                          peer_keyframes=stats["peer_keyframes"])
            if sfu["problem"] and sfu["state"] != "publishing":  # also while it tries again
                when = f"in {sfu['retry_in_s']:g} s" if sfu["retry_in_s"] else "now"
                return ERROR, f"{sfu['problem']}; retrying {when}", values
        if self.frames_in.rate == 0.0:
            return WARN, f"no frames on {self.p['image_topic']}", values
        if sfu is not None:
            return OK, f"streaming to {stats['clients']} direct clients, {sfu['viewers']} through Janus at " \
                       f"{sfu['url']} ({sfu['state']})", values
        return OK, f"streaming to {stats['clients']} clients", values

    def close(self) -> None:
        self.server.stop()
        rosout.remove(STREAM_LOGGER, self.log_handler)


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(BridgeNode, args)


if __name__ == "__main__":
    main()
