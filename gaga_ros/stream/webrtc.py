"""The WebRTC stream server: avatar frames and voices out to browsers, the operator's camera, voice
and expressions in.

aiohttp serves the viewer page and the signalling (POST /offer, as in aiortc's examples); aiortc
carries the media. The server runs its own asyncio loop in a thread, so plain threads (a ROS
callback, a render loop) drive it through start(), push_frame() and stop().
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import ipaddress
import json
import logging
import math
import re
import ssl
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpsender import RTCRtpSender
from av import AudioFrame

from gaga_ros import audio
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression, ExpressionError
from gaga_ros.image import check_rgb
from gaga_ros.named import JSON_FIELDS as NAMED_FIELDS
from gaga_ros.named import LookAt, NamedCommand, NamedError, parse_json
from gaga_ros.stream.auth import (
    CsrfTokens,
    host_origin_middleware,
    is_ip_literal,
    is_loopback,
    normal_origin,
    token_middleware,
)
from gaga_ros.stream.janus import JanusError, JanusPublisher, SfuSettings
from gaga_ros.stream.sound import BusTrack, SoundBus
from gaga_ros.stream.tracks import (
    MIN_FRAME_SIDE,
    EncodedTrack,
    FrameError,
    NewestFrame,
    SharedEncoder,
    route_keyframe_requests,
)

log = logging.getLogger(__name__)
#: aiohttp's server logger for this server (passed to its AppRunner), so it reaches the bridge's /rosout.
HTTP_LOG = log.getChild("http")


class ShortParseErrors(logging.Filter):
    """aiohttp logs a malformed request (a 100 kB URL, TLS or garbage on the port) with a traceback
    of its own parser: that is one line of news, not a bug. Tracebacks of real errors stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = "refused a malformed request from %s: %s"
            # one line whatever the client sent: the parser's message quotes it, newlines and all
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.args = (remote, " ".join(str(exc.message).split())[:120])
            record.exc_info = record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


HTTP_LOG.addFilter(ShortParseErrors())

STATIC_DIR = Path(__file__).resolve().parent / "static"
CODECS = ("VP8", "H264")
#: Video bitrates accepted, kbit/s (lowest, highest).
BITRATES_KBPS = (50, 50_000)
#: Frame rates accepted for max_fps, frames/s.
FRAME_RATES = (1, 120)
#: Output sides accepted when the stream scales its frames, pixels.
OUTPUT_SIDES = (MIN_FRAME_SIDE, 4096)
#: Who a page is (the "role" of its offer). viewer: watches the avatar and hears the operator;
#: kiosk: the robot's face display, the same plus its microphone as the robot's voice; operator:
#: drives the face with camera and microphone, hears the robot, sees the robot's camera.
ROLES = ("viewer", "kiosk", "operator")
#: Pages served at these paths; the page reads its role from the path.
PAGES = ("/", "/kiosk", "/operator")
#: Files the static route may serve: top-level files of static_dir with these suffixes, read once.
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon"}
#: Default time a request's headers, and then its body, may take to arrive. aiohttp arms its
#: keep-alive timer when a connection opens and closes the connection if it fires before a request
#: is complete, so this also ends connections that drip header bytes (slowloris); bodies are read
#: under asyncio.wait_for with the same limit.
REQUEST_TIMEOUT_S = 10.0
#: Offers counted per client address: at most `offer_limit` in this sliding window (then 429).
OFFER_WINDOW_S = 10.0
#: Share of pending_timeout_s an answered offer keeps its slot when all pending slots are taken and
#: a new offer wants one (3 s at the default 10 s; loopback and LAN handshakes take well under 1 s).
PENDING_GRACE = 0.3
#: Inline <script> blocks of viewer.html, whose hashes the Content-Security-Policy allows.
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
EXPRESSION_FIELDS = ("face_model", "expression", "jaw_pose", "neck_pose", "eye_pose", "vertices",
                     "transform", "confidence", "stamp_ns", "frame_id")

UpstreamCallback = Callable[[np.ndarray, int], None]
AudioCallback = Callable[[audio.Pcm], None]
ExpressionCallback = Callable[[Expression], None]
NamedCallback = Callable[[NamedCommand | None, LookAt | None], None]


class StreamConfigError(InputError):
    """A StreamServer setting that cannot work; the message says what is accepted."""


def _check_bitrate(bitrate_kbps: int) -> None:
    """StreamConfigError unless `bitrate_kbps` lies within BITRATES_KBPS."""
    if not BITRATES_KBPS[0] <= bitrate_kbps <= BITRATES_KBPS[1]:
        raise StreamConfigError(f"bitrate_kbps {bitrate_kbps}: accepted is {BITRATES_KBPS[0]} to "
                                f"{BITRATES_KBPS[1]}")


def load_json(payload: str | bytes | dict):
    """The JSON value of a POST body or data-channel message (a dict passes through)."""
    if isinstance(payload, (str, bytes)):
        try:
            return json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExpressionError(f"expression is not valid JSON: {e}") from None
        except RecursionError:
            raise ExpressionError("expression JSON is nested too deeply: accepted is an object of "
                                  "flat or 3x4 number arrays") from None
    return payload


def parse_expression(payload: str | bytes | dict) -> Expression:
    """An Expression from a JSON object with the fields of msg/Expression.msg.

    face_model is 0/1 or "FLAME"/"MESH"; transform is 12 numbers or 3x4; stamp_ns and frame_id
    stand in for the message header. Raises ExpressionError naming what is wrong.
    """
    payload = load_json(payload)
    if not isinstance(payload, dict):
        raise ExpressionError("expression must be a JSON object with the fields of Expression.msg")
    unknown = sorted(set(payload) - set(EXPRESSION_FIELDS))
    if unknown:
        raise ExpressionError(f"unknown expression fields {unknown}: accepted are {list(EXPRESSION_FIELDS)}")
    if "face_model" not in payload:
        raise ExpressionError("expression needs face_model: 0 (FLAME) or 1 (MESH)")
    fields = dict(payload)
    model = fields["face_model"]
    if isinstance(model, str) and model.upper() in ("FLAME", "MESH"):
        fields["face_model"] = 0 if model.upper() == "FLAME" else 1
    elif isinstance(model, bool) or not isinstance(model, int):
        raise ExpressionError(f"face_model {model!r}: accepted are 0 / 'FLAME' and 1 / 'MESH'")
    stamp = fields.get("stamp_ns", 0)
    if isinstance(stamp, bool) or not isinstance(stamp, int) or stamp < 0:
        raise ExpressionError(f"stamp_ns {stamp!r}: accepted is a non-negative integer (nanoseconds)")
    if not isinstance(fields.get("frame_id", ""), str):
        raise ExpressionError("frame_id must be a string")
    conf = fields.get("confidence", 1.0)
    if isinstance(conf, bool) or not isinstance(conf, (int, float)):
        raise ExpressionError(f"confidence {conf!r}: accepted is a number in [0, 1]")
    for name in ("expression", "jaw_pose", "neck_pose", "eye_pose", "vertices", "transform"):
        if name in fields and fields[name] is not None and not _numbers(fields[name]):
            raise ExpressionError(f"{name} must be a JSON array of numbers (nested at most once); "
                                  "strings, booleans and null are not accepted")
    try:
        return Expression(**fields)
    except ExpressionError:
        raise
    except (TypeError, ValueError) as e:
        raise ExpressionError(f"malformed expression: {e}") from None


@dataclass
class Client:
    """One viewer: its peer connection, outgoing track and where it came from.

    Pending (answered, not yet connected) while connected_at is None; expiry then drops it.
    """

    id: str
    pc: RTCPeerConnection
    remote: str
    codec: str
    role: str = "viewer"
    track: EncodedTrack | None = None
    sender: RTCRtpSender | None = None
    camera: EncodedTrack | None = None  # the robot's camera, to an operator
    voice: BusTrack | None = None  # the voice this page hears
    upstream_frames: int = 0
    audio_frames: int = 0
    offered_at: float = field(default_factory=time.monotonic)
    connected_at: float | None = None
    expiry: asyncio.TimerHandle | None = None


class StreamServer:
    """WebRTC avatar stream for browsers; thread-safe push_frame(), callbacks for what comes back.

    Security: it listens on 127.0.0.1 by default. Clients that are not on loopback (all clients with
    token_on_loopback) must present `token` (query `?token=` or `Authorization: Bearer`). A
    non-loopback `host` without a token is refused at construction (StreamConfigError) rather than
    minting a token into a log file. Against web pages (gaga_ros.stream.auth): the Host must be an
    IP address, localhost or in allowed_hosts; a request's Origin must be this server or in
    allowed_origins; POSTs must be JSON and carry the CSRF token GET /config hands out; no CORS.
    Against offer floods: max_clients counts connected viewers; offers that have not connected
    yet hold one of max_pending slots for at most pending_timeout_s, and each client address may
    make offer_limit offers per OFFER_WINDOW_S.

    Encoding: one shared encode per codec for all viewers (see gaga_ros.stream.tracks for why and
    what it costs). Callbacks run on the server's threads and must return quickly:
    on_upstream_frame(rgb, stamp_ns) gets each operator webcam frame (on one worker thread; frames
    arriving while it is busy, or sooner than operator_fps allows, are dropped; the operator page
    asks its camera for operator_fps too), on_operator_audio(Pcm) each 20 ms of the operator's
    voice, on_expression(Expression) each valid expression, and on_named(command, look_at) each
    valid named expression (gaga_ros.named.parse_json: a JSON object with any of "named", "head",
    "hold_s", "look_at"; either part may be None).

    The telepresence loop (roles in ROLES): at most max_operators operators at once (409 for the
    next, which the page says); voices travel on sound buses (gaga_ros.stream.sound): the operator's
    to kiosks and viewers, the robot's (kiosk microphones and push_robot_audio) to operators;
    push_robot_camera frames go to operators when robot_camera is set. GET /status says in plain
    words what the pages wait for (set_note adds what the ROS side knows).

    Many viewers (`sfu`, gaga_ros.stream.janus): the avatar and the operator's voice are published
    once into a Janus VideoRoom and viewer pages subscribe there, through this server's POST
    /subscribe (Janus's offer) and POST /answer (the page's answer), which pass the same token, Host,
    Origin, CSRF and offer-rate checks as POST /offer; at most max_sfu_viewers at once. Kiosk pages
    subscribe the same way and send their microphone on a second, audio-only direct connection (an
    offer without video). Operator pages stay direct: their camera and voice go up, the robot's come
    down, and the operator is one page for whom the direct path is the shortest.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, token: str | None = None,
                 codec: str = "VP8", bitrate_kbps: int = 1000, max_fps: float = 30.0,
                 width: int | None = None, height: int | None = None,
                 certfile: str | None = None, keyfile: str | None = None,
                 ice_servers: Sequence[str | dict] | None = None, static_dir: str | Path = STATIC_DIR,
                 on_upstream_frame: UpstreamCallback | None = None,
                 on_expression: ExpressionCallback | None = None,
                 on_named: NamedCallback | None = None,
                 on_operator_audio: AudioCallback | None = None,
                 max_operators: int = 1, robot_camera: bool = False, operator_drives: bool = False,
                 operator_fps: float = 30.0,
                 max_clients: int = 16, max_body_bytes: int = 256 * 1024,
                 idle_after_s: float = 3.0, keyframe_interval_s: float = 2.0,
                 peer_timeout_s: float = 10.0, allowed_hosts: list[str] | None = None,
                 allowed_origins: list[str] | None = None, token_on_loopback: bool = False,
                 max_pending: int = 4, pending_timeout_s: float = 10.0, offer_limit: int = 10,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, sfu: SfuSettings | None = None,
                 max_sfu_viewers: int = 500) -> None:
        self.codec = codec.upper() if isinstance(codec, str) else codec
        if self.codec not in CODECS:
            raise StreamConfigError(f"codec {codec!r}: accepted are {CODECS}")
        _check_bitrate(bitrate_kbps)
        if not FRAME_RATES[0] <= max_fps <= FRAME_RATES[1]:
            raise StreamConfigError(f"max_fps {max_fps}: accepted is {FRAME_RATES[0]} to {FRAME_RATES[1]}")
        if not FRAME_RATES[0] <= operator_fps <= FRAME_RATES[1]:
            raise StreamConfigError(f"operator_fps {operator_fps}: accepted is {FRAME_RATES[0]} to "
                                    f"{FRAME_RATES[1]}")
        if (width is None) != (height is None):
            raise StreamConfigError("give both width and height, or neither (keep the pushed size)")
        low, high = OUTPUT_SIDES
        if width is not None and height is not None and not (low <= width <= high and low <= height <= high):
            raise StreamConfigError(f"output size {width}x{height}: accepted is {low} to {high} per side")
        if (certfile is None) != (keyfile is None):
            raise StreamConfigError("HTTPS needs both certfile and keyfile")
        if token is not None and len(token) < 8:
            raise StreamConfigError("token is shorter than 8 characters: use a long random string")
        if not is_loopback(host) and not token:
            raise StreamConfigError(
                f"host {host!r} is reachable from other machines but no token is set: pass token= "
                "(clients then add ?token=...) or listen on 127.0.0.1")
        if token_on_loopback and not token:
            raise StreamConfigError("token_on_loopback needs a token: pass token= (the bridge node reads it "
                                    "from the environment variable its token_env parameter names)")
        for name in allowed_hosts or []:
            if not name or any(c in name for c in ":/@ *"):
                raise StreamConfigError(f"allowed_hosts entry {name!r}: accepted is a host name without "
                                        "port or scheme, e.g. robot.local")
        try:
            self.allowed_origins = [normal_origin(o) for o in allowed_origins or []]
        except ValueError as e:
            raise StreamConfigError(f"allowed_origins entry {e}: accepted is scheme://host[:port] with "
                                    "scheme http or https, e.g. https://robot.example") from None
        if max_pending < 1 or offer_limit < 1 or max_operators < 1:
            raise StreamConfigError("max_pending, offer_limit and max_operators: accepted is 1 or more")
        if pending_timeout_s <= 0 or request_timeout_s <= 0:
            raise StreamConfigError("pending_timeout_s and request_timeout_s: accepted is more than 0")
        self.static_dir = Path(static_dir)
        if not (self.static_dir / "viewer.html").is_file():
            raise StreamConfigError(f"static_dir {self.static_dir} has no viewer.html")
        self.host, self._port, self.token = host, port, token
        self.token_on_loopback = bool(token_on_loopback)
        # The name the server listens on (when it is one) is how its users reach it.
        self.allowed_hosts = list(allowed_hosts or []) + ([host] if host and not is_ip_literal(host) else [])
        self.max_pending, self.pending_timeout_s = max_pending, pending_timeout_s
        self.offer_limit, self.request_timeout_s = offer_limit, request_timeout_s
        self.bitrate_kbps, self.max_fps = int(bitrate_kbps), float(max_fps)
        self.size = (int(width), int(height)) if width is not None and height is not None else None
        self.certfile, self.keyfile = certfile, keyfile
        self.ice_servers = [_ice_server(s) for s in (ice_servers or [])]
        self.on_upstream_frame, self.on_expression = on_upstream_frame, on_expression
        self.on_named, self.on_operator_audio = on_named, on_operator_audio
        self.max_operators, self.robot_camera = int(max_operators), bool(robot_camera)
        self.operator_fps = float(operator_fps)
        self._upstream_at = -float("inf")  # monotonic time of the last operator frame delivered
        # Whether an operator's page drives this face (the loop): only then does GET /status say
        # whether one is connected (null otherwise, and the pages do not mention operators).
        self.operator_drives = bool(operator_drives)
        self._robot_frames = NewestFrame()
        self._voices = {"operator": SoundBus("operator"), "robot": SoundBus("robot")}
        self._notes: dict[str, str] = {}
        self.max_clients, self.max_body_bytes = max_clients, max_body_bytes
        self.idle_after_s, self.keyframe_interval_s = idle_after_s, keyframe_interval_s
        self.peer_timeout_s = peer_timeout_s
        self.upstream_dropped = 0
        self._frames = NewestFrame()
        self._clients: dict[str, Client] = {}
        self._offer_times: dict[str, deque[float]] = {}
        self._csrf = CsrfTokens()
        self._refused: Counter[int] = Counter()
        self._encoders: dict[str, SharedEncoder] = {}
        self._static: dict[str, tuple[bytes, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._upstream_pool = ThreadPoolExecutor(1, thread_name_prefix="upstream")
        self._upstream_busy = False
        self.sfu_settings, self.max_sfu_viewers = sfu, int(max_sfu_viewers)
        self.sfu: JanusPublisher | None = None
        self._sfu_task: asyncio.Task | None = None

    # -- lifecycle (any thread) -------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> StreamServer:
        """Start serving on a background thread; returns once the socket listens (or raises)."""
        if self._thread is not None:
            raise RuntimeError("StreamServer already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as e:  # reported to start()'s caller
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="stream-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"stream server did not start within {timeout} s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection and the listening socket; safe to call twice."""
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._upstream_pool.shutdown(wait=False)

    def __enter__(self) -> StreamServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def push_frame(self, rgb: np.ndarray, stamp_ns: int = 0) -> None:
        """Offer a new avatar frame (uint8 HxWx3 RGB); thread-safe, keeps only the newest.

        The array is copied, so the caller may reuse its buffer at once.
        """
        self._frames.put(check_rgb(rgb, MIN_FRAME_SIDE, FrameError).copy(), stamp_ns)

    def push_robot_camera(self, rgb: np.ndarray, stamp_ns: int = 0) -> None:
        """Offer a frame of the robot's camera for operators (as push_frame; needs robot_camera)."""
        self._robot_frames.put(check_rgb(rgb, MIN_FRAME_SIDE, FrameError).copy(), stamp_ns)

    def push_robot_audio(self, chunk: audio.Pcm) -> None:
        """The robot's own sound (text-to-speech, a microphone) for operators; thread-safe."""
        self._voices["robot"].push_threadsafe("topic", chunk)

    def set_note(self, key: str, text: str | None) -> None:
        """A plain-words state the pages show while they wait (None clears it); thread-safe."""
        if text:
            self._notes[key] = text
        else:
            self._notes.pop(key, None)

    # -- state ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (differs from the argument when that was 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The viewer's address as seen from this machine."""
        scheme = "https" if self.certfile else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{scheme}://{host}:{self._port}/"

    @property
    def clients(self) -> int:
        """Viewers currently connected (offers not connected yet are stats()["pending"])."""
        return sum(c.connected_at is not None for c in list(self._clients.values()))

    @property
    def pending(self) -> int:
        """Offers answered but not connected yet."""
        return len(self._clients) - self.clients

    def set_bitrate(self, bitrate_kbps: int) -> None:
        """Change the video bitrate of every stream now (each encoder restarts with a keyframe)."""
        _check_bitrate(bitrate_kbps)
        self.bitrate_kbps = int(bitrate_kbps)
        for encoder in list(self._encoders.values()):
            encoder.set_bitrate(self.bitrate_kbps)

    def stats(self) -> dict:
        """Counts for logs and diagnostics: frames pushed/encoded, requests refused (by HTTP status)
        and, per client, frames sent."""
        enc = list(self._encoders.values())
        encoded = sum(e.encoded for e in enc)
        return {
            "clients": self.clients,
            "pending": self.pending,
            "refused": dict(self._refused),
            "frames_pushed": self._frames.pushed,
            "frames_encoded": encoded,
            "encode_ms_mean": 1000 * sum(e.encode_seconds for e in enc) / encoded if encoded else None,
            "upstream_dropped": self.upstream_dropped,
            "operators": self._operators(connected_only=True),
            "voices": {name: {"dbfs": bus.level_dbfs, "dropped_s": bus.dropped_s}
                       for name, bus in self._voices.items()},
            "sfu": None if self.sfu is None else {
                "state": self.sfu.state, "problem": self.sfu.problem, "url": self.sfu.settings.url,
                "viewers": self.sfu.viewers, "subscriptions": len(self.sfu.subscribers),
                "publishes": self.sfu.publishes, "retry_in_s": self.sfu.retry_in_s},
            "peer_keyframes": sum(e.peer_keyframes for e in enc),
            "per_client": {
                c.id: {"remote": c.remote, "codec": c.codec, "role": c.role, "state": c.pc.connectionState,
                       "frames_sent": c.track.frames_sent if c.track else 0,
                       "upstream_frames": c.upstream_frames, "audio_frames": c.audio_frames}
                for c in list(self._clients.values())
            },
        }

    def _operators(self, connected_only: bool = False) -> int:
        return sum(c.role == "operator" and (c.connected_at is not None or not connected_only)
                   for c in list(self._clients.values()))

    # -- server (loop thread) -------------------------------------------------------------

    async def _serve(self) -> None:
        self._frames.bind(asyncio.get_running_loop())
        self._robot_frames.bind(asyncio.get_running_loop())
        for bus in self._voices.values():
            bus.start()
        for path in sorted(self.static_dir.iterdir()):
            if path.is_file() and path.suffix in STATIC_TYPES:
                self._static[path.name] = (path.read_bytes(), STATIC_TYPES[path.suffix])
        self._csp = _content_security_policy(self._static["viewer.html"][0])
        app = web.Application(middlewares=[self._count_refusals,
                                           host_origin_middleware(self.allowed_hosts, self.allowed_origins),
                                           token_middleware(self.token, self.token_on_loopback)],
                              client_max_size=self.max_body_bytes)
        for page in PAGES:
            app.router.add_get(page, self._viewer)
        app.router.add_get("/status", self._status)
        app.router.add_get("/static/{name}", self._static_file)
        app.router.add_get("/config", self._config)
        app.router.add_post("/offer", self._offer)
        app.router.add_post("/expression", self._expression)
        if self.sfu_settings is not None:
            app.router.add_post("/subscribe", self._subscribe)
            app.router.add_post("/answer", self._answer)
        self._runner = web.AppRunner(app, access_log=None, logger=HTTP_LOG,
                                     keepalive_timeout=self.request_timeout_s)
        await self._runner.setup()
        ssl_ctx = None
        if self.certfile:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.certfile, self.keyfile)
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=ssl_ctx)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            if e.errno != errno.EADDRINUSE:
                raise
            raise StreamConfigError(
                f"port {self._port} on {self.host} is already in use (another bridge or program listens "
                f"there): stop it, or choose another port, e.g. port:={self._port + 1}") from None
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started above
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_peers())
        if self.sfu_settings is not None:
            self.sfu = JanusPublisher(self.sfu_settings, self._avatar_encoder(self.codec),
                                      self._voices["operator"], self.codec, self.pending_timeout_s)
            self._sfu_task = asyncio.get_running_loop().create_task(self.sfu.run())
        log.info("avatar stream at %s", self.url)

    async def _watch_peers(self) -> None:
        """Drop viewers that vanished without a goodbye (crash, cable, killed tab).

        While it receives video the browser sends RTCP receiver reports about once a second from
        its network thread (not throttled like page timers); if we kept sending for
        peer_timeout_s after the last report, the viewer is gone. This is much sooner than ICE
        consent expiry (30 s), which still covers viewers while the stream is paused (browsers stop
        reporting a silent stream). Offers that never connect expire on their own timer (_offer).
        """
        while True:
            await asyncio.sleep(1.0)
            for client in list(self._clients.values()):
                if client.connected_at is None or client.pc.connectionState != "connected" or \
                        client.sender is None or client.track is None:
                    continue
                reports = [r for r in (await client.sender.getStats()).values()
                           if r.type == "remote-inbound-rtp"]
                heard = max([r.timestamp.timestamp() for r in reports], default=client.connected_at)
                if client.track.last_sent - heard > self.peer_timeout_s:
                    log.info("viewer %s (%s) stopped reporting: dropped", client.id, client.remote)
                    await self._drop(client)

    async def _shutdown(self) -> None:
        self._watchdog.cancel()
        if self._sfu_task is not None:
            self._sfu_task.cancel()
            await asyncio.gather(self._sfu_task, return_exceptions=True)
        await asyncio.gather(*(c.pc.close() for c in list(self._clients.values())),
                             return_exceptions=True)
        self._clients.clear()
        for bus in self._voices.values():
            await bus.stop()
        for enc in self._encoders.values():
            await enc.close()
        self._encoders.clear()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _count_refusals(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                self._refused[e.status] += 1
            raise

    async def _viewer(self, request: web.Request) -> web.Response:
        body, ctype = self._static["viewer.html"]
        return web.Response(body=body, content_type=ctype, headers={
            "Cache-Control": "no-store", "Content-Security-Policy": self._csp,
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def _static_file(self, request: web.Request) -> web.Response:
        entry = self._static.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound()
        return web.Response(body=entry[0], content_type=entry[1],
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _config(self, request: web.Request) -> web.Response:
        """The viewer's settings and the CSRF token its POSTs must carry (header CSRF_HEADER)."""
        return web.json_response(
            {"codec": self.codec, "iceServers": [_ice_dict(s) for s in self.ice_servers],
             "sfu": self.sfu is not None,
             "idleAfterS": self.idle_after_s, "maxFps": self.max_fps, "operatorFps": self.operator_fps,
             "csrf": self._csrf.issue()},
            headers={"Cache-Control": "no-store"})

    async def _status(self, request: web.Request) -> web.Response:
        """What the pages wait for, in plain words and as fields (polled about once a second)."""
        frame = self._frames.latest()
        age = time.monotonic() - frame.arrived if frame is not None else None
        avatar = "none" if age is None else "live" if age < self.idle_after_s else "paused"
        return web.json_response(
            {"avatar": avatar, "avatar_age_s": age,
             "operator": self._operators(connected_only=True) > 0 if self.operator_drives else None,
             "max_operators": self.max_operators, "viewers": self.clients, "notes": dict(self._notes),
             "sfu": None if self.sfu is None else {"state": self.sfu.state, "viewers": self.sfu.viewers,
                                                   "epoch": self.sfu.publishes},
             "voices": {name: round(bus.level_dbfs, 1) for name, bus in self._voices.items()}},
            headers={"Cache-Control": "no-store"})

    def _check_post(self, request: web.Request) -> None:
        """The checks a web page of another origin cannot pass, for state-changing POSTs.

        JSON only: such a page may send text/plain, form or multipart bodies without a CORS
        preflight, but not application/json. Then the CSRF token only pages of this server can read.
        """
        if request.content_type != "application/json":
            given = request.headers.get("Content-Type", "none")
            raise web.HTTPUnsupportedMediaType(text=f"Content-Type {given!r} refused: accepted is "
                                                    "application/json")
        self._csrf.check(request)

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, which must arrive within request_timeout_s (408 otherwise)."""
        try:
            return await asyncio.wait_for(request.read(), self.request_timeout_s)
        except TimeoutError:
            raise web.HTTPRequestTimeout(text=f"request body did not arrive within "
                                              f"{self.request_timeout_s:g} s") from None

    def _limit_offers(self, remote: str | None) -> None:
        """At most offer_limit offers per client address (IPv6: per /64) in OFFER_WINDOW_S; else 429."""
        now = time.monotonic()
        for key in [k for k, times in self._offer_times.items() if now - times[-1] > OFFER_WINDOW_S]:
            del self._offer_times[key]
        key = _rate_key(remote)
        times = self._offer_times.setdefault(key, deque())
        while times and now - times[0] > OFFER_WINDOW_S:
            times.popleft()
        if len(times) >= self.offer_limit:
            retry = max(1, math.ceil(OFFER_WINDOW_S - (now - times[0])))
            raise web.HTTPTooManyRequests(
                text=f"more than {self.offer_limit} offers from {key} within {OFFER_WINDOW_S:g} s: "
                     f"retry in {retry} s", headers={"Retry-After": str(retry)})
        times.append(now)

    def _pending_victim(self) -> Client | None:
        """The answered offer to drop so a new one gets a pending slot, or None when one is free.

        When all max_pending slots are taken, the oldest answered offer goes once it had
        PENDING_GRACE of pending_timeout_s to connect: whoever floods offers then pushes out its own
        (or another flooder's), not a viewer in the middle of connecting. 503 when all are younger.
        """
        pending = [c for c in self._clients.values() if c.connected_at is None]
        if len(pending) < self.max_pending:
            return None
        answered = [c for c in pending if c.expiry is not None]
        oldest = min(answered, key=lambda c: c.offered_at, default=None)
        grace = PENDING_GRACE * self.pending_timeout_s
        age = time.monotonic() - oldest.offered_at if oldest else 0.0
        if oldest is None or age < grace:
            retry = max(1, math.ceil(grace - age))
            raise web.HTTPServiceUnavailable(
                text=f"{self.max_pending} offers are still connecting: retry in {retry} s",
                headers={"Retry-After": str(retry)})
        log.info("offer %s (%s) not connected after %.1f s: dropped for a new offer",
                 oldest.id, oldest.remote, age)
        return oldest

    async def _session_description(self, request: web.Request, kind: str, extra: str = "") -> dict:
        """A POSTed JSON session description of `kind` (offer, answer), after the POST checks."""
        self._check_post(request)
        try:
            body = json.loads(await self._read_body(request))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise web.HTTPBadRequest(text="body is not valid JSON") from None
        if not isinstance(body, dict) or body.get("type") != kind or not isinstance(body.get("sdp"), str):
            raise web.HTTPBadRequest(text=f'expected {{"type": "{kind}", "sdp": "..."{extra}}}')
        return body

    async def _offer(self, request: web.Request) -> web.Response:
        body = await self._session_description(request, "offer")
        codec = str(body.get("codec") or self.codec).upper()
        if codec not in CODECS:
            raise web.HTTPBadRequest(text=f"codec {codec!r}: accepted are {CODECS}")
        role = body.get("role", "viewer")
        if role not in ROLES:
            raise web.HTTPBadRequest(text=f"role {role!r}: accepted are {', '.join(ROLES)}")
        self._limit_offers(request.remote)  # counts offers that would cost a peer connection
        if self.clients >= self.max_clients:
            raise web.HTTPServiceUnavailable(text=f"{self.max_clients} viewers already connected")
        if role == "operator" and self._operators() >= self.max_operators:
            raise web.HTTPConflict(text=f"an operator is already connected (at most {self.max_operators} at "
                                        "a time): this page retries and takes over when they leave")
        victim = self._pending_victim()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self.ice_servers))
        client = Client(uuid.uuid4().hex[:8], pc, request.remote or "?", codec, role)
        self._clients[client.id] = client  # before any await, so concurrent offers see the slot taken
        if victim is not None:
            await self._drop(victim)
        try:
            answer = await self._negotiate(client, body["sdp"])
        except Exception as e:  # aiortc raises many kinds on a hostile offer; none may leak the slot
            await self._drop(client)
            log.info("offer from %s refused: %s: %s", client.remote, type(e).__name__, e)
            raise web.HTTPBadRequest(text=f"cannot use this offer ({type(e).__name__}: {e}); accepted is "
                                          "a browser's RTCPeerConnection offer with a video m-line") from None
        client.expiry = asyncio.get_running_loop().call_later(self.pending_timeout_s, self._expire, client)
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "id": client.id})

    def _expire(self, client: Client) -> None:
        log.info("offer %s (%s) did not connect within %g s: dropped", client.id, client.remote,
                 self.pending_timeout_s)
        client.expiry = None
        asyncio.ensure_future(self._drop(client))

    async def _connected(self, client: Client) -> None:
        if client.expiry is not None:
            client.expiry.cancel()
            client.expiry = None
        if self.clients >= self.max_clients:  # offers that raced past the check in _offer
            log.info("viewer %s (%s) connected beyond max_clients=%d: dropped", client.id, client.remote,
                     self.max_clients)
            await self._drop(client)
            return
        client.connected_at = time.time()

    async def _negotiate(self, client: Client, sdp: str) -> RTCSessionDescription:
        pc = client.pc

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState == "connected" and client.connected_at is None:
                await self._connected(client)
            elif pc.connectionState in ("failed", "closed"):
                await self._drop(client)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "audio":
                _short_audio_buffer(pc, track)
            if track.kind == "video" and client.role == "operator":
                asyncio.ensure_future(self._consume_upstream(client, track))
            elif track.kind == "audio" and client.role in ("operator", "kiosk"):
                asyncio.ensure_future(self._consume_audio(client, track))

        @pc.on("datachannel")
        def on_datachannel(channel) -> None:
            if channel.label == "expression":
                channel.on("message", lambda msg: channel.send(self._expression_reply(msg)))

        kinds = [line[2:].split(" ", 1)[0] for line in sdp.splitlines() if line.startswith("m=")]
        if self.sfu is not None and client.role == "kiosk" and "video" not in kinds:
            # Through the SFU a kiosk takes the avatar and the operator's voice from Janus; this
            # connection only carries its microphone (the robot's voice) up.
            pc.addTransceiver("audio", direction="recvonly")
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            return pc.localDescription
        # The avatar transceiver exists before the offer is applied, so the offer's first video
        # m-line binds to it and aiortc negotiates only this client's codec (it fixes codecs then).
        enc = self._avatar_encoder(client.codec)
        client.track = enc.subscribe()
        transceiver = pc.addTransceiver(client.track, direction="sendonly")
        client.sender = transceiver.sender
        route_keyframe_requests(client.sender, enc)
        caps = [c for c in RTCRtpSender.getCapabilities("video").codecs
                if c.mimeType == f"video/{client.codec}"]
        transceiver.setCodecPreferences(caps)
        # In the order the pages add theirs (viewer.js): avatar video, then the operator's camera (up)
        # with the robot's camera (down), then the voices; only those the offer has m-lines for (aiortc
        # cannot answer with a transceiver that no m-line took).
        if client.role == "operator" and kinds.count("video") >= 2:
            if self.robot_camera:
                client.camera = self._camera_encoder(client.codec).subscribe()
            camera = pc.addTransceiver(client.camera or "video",
                                       direction="sendrecv" if client.camera else "recvonly")
            camera.setCodecPreferences(caps)
        if "audio" in kinds:
            client.voice = self._voices["robot" if client.role == "operator" else "operator"].subscribe()
            pc.addTransceiver(client.voice, direction="sendonly" if client.role == "viewer" else "sendrecv")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription

    def _avatar_encoder(self, codec: str) -> SharedEncoder:
        """The avatar's shared encoder for `codec` (direct viewers and the SFU publisher share it)."""
        if codec not in self._encoders:
            self._encoders[codec] = SharedEncoder(self._frames, codec, self.bitrate_kbps, self.max_fps,
                                                  self.size, self.keyframe_interval_s)
        return self._encoders[codec]

    async def _subscribe(self, request: web.Request) -> web.Response:
        """A viewer page through the SFU: a Janus subscriber handle and Janus's offer for the page."""
        self._check_post(request)
        self._limit_offers(request.remote)
        assert self.sfu is not None  # the route exists only with sfu
        if len(self.sfu.subscribers) >= self.max_sfu_viewers:
            raise web.HTTPServiceUnavailable(text=f"{self.max_sfu_viewers} viewers already connected")
        try:
            handle, jsep = await self.sfu.subscribe(request.remote or "?")
        except JanusError as e:
            raise web.HTTPServiceUnavailable(text=f"the stream's relay is not available: {e}",
                                             headers={"Retry-After": "1"}) from None
        return web.json_response({"sdp": jsep["sdp"], "type": jsep["type"], "id": str(handle),
                                  "epoch": self.sfu.publishes})

    async def _answer(self, request: web.Request) -> web.Response:
        """The page's answer to the offer /subscribe handed it, forwarded to Janus."""
        body = await self._session_description(request, "answer", ', "id": "<from /subscribe>"')
        if not str(body.get("id", "")).isdigit():
            raise web.HTTPBadRequest(text='"id" must be the id /subscribe handed out')
        assert self.sfu is not None
        handle = int(body["id"])
        sub = self.sfu.subscribers.get(handle)
        if sub is None or sub.remote != (request.remote or "?"):
            raise web.HTTPNotFound(text=f"subscription {handle} is unknown or expired: subscribe again")
        try:
            await self.sfu.start(handle, body["sdp"])
        except JanusError as e:
            await self.sfu.leave(handle)
            raise web.HTTPBadRequest(text=str(e)) from None
        return web.json_response({"ok": True})

    def _camera_encoder(self, codec: str) -> SharedEncoder:
        key = f"robot camera {codec}"
        if key not in self._encoders:
            self._encoders[key] = SharedEncoder(self._robot_frames, codec, self.bitrate_kbps, self.max_fps,
                                                None, self.keyframe_interval_s)
        return self._encoders[key]

    async def _drop(self, client: Client) -> None:
        if self._clients.pop(client.id, None) is None:
            return
        if client.expiry is not None:
            client.expiry.cancel()
        for track in (client.track, client.camera, client.voice):
            if track is not None:
                track.stop()
        for bus in self._voices.values():
            bus.forget(client.id)
        await _close_peer(client.pc)

    async def _consume_upstream(self, client: Client, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            client.upstream_frames += 1
            if self.on_upstream_frame is None:
                continue
            if self._upstream_busy:
                self.upstream_dropped += 1
                continue
            # A page that sends faster than operator_fps asked: every frame that comes too soon is left
            # out (3/4 of the period, so a camera at that rate, a little uneven, loses none).
            now = time.monotonic()
            if now - self._upstream_at < 0.75 / self.operator_fps:
                continue
            self._upstream_busy, self._upstream_at = True, now
            stamp = time.time_ns()
            loop.run_in_executor(self._upstream_pool, self._deliver_upstream, frame, stamp)

    async def _consume_audio(self, client: Client, track: MediaStreamTrack) -> None:
        """A page's microphone: the operator's onto the operator bus (and on_operator_audio), a
        kiosk's onto the robot bus."""
        bus = self._voices["operator" if client.role == "operator" else "robot"]
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            client.audio_frames += 1
            assert isinstance(frame, AudioFrame)  # an audio track's frames
            chunk = audio.from_frame(frame, time.time_ns())
            bus.push(client.id, chunk)
            if client.role == "operator" and self.on_operator_audio is not None:
                try:
                    self.on_operator_audio(chunk)
                except Exception:
                    log.exception("on_operator_audio failed")

    def _deliver_upstream(self, frame, stamp_ns: int) -> None:
        try:
            if self.on_upstream_frame is not None:
                self.on_upstream_frame(frame.to_ndarray(format="rgb24"), stamp_ns)
        except Exception:
            log.exception("on_upstream_frame failed")
        finally:
            self._upstream_busy = False

    def _handle_expression(self, payload) -> str | None:
        """Validate and deliver one expression, raw or named; the error message, or None when accepted."""
        deliver: Callable[[], None] | None
        try:
            value = load_json(payload)
            if isinstance(value, dict) and any(k in value for k in NAMED_FIELDS):
                command, look = parse_json(value)
                named = self.on_named
                deliver = None if named is None else lambda: named(command, look)
            else:
                expr = parse_expression(value)
                raw = self.on_expression
                deliver = None if raw is None else lambda: raw(expr)
        except (ExpressionError, NamedError) as e:
            return str(e)
        if deliver is not None:
            try:
                deliver()
            except Exception:
                log.exception("expression delivery failed")
                return "the server could not deliver this expression"
        return None

    def _expression_reply(self, message: str | bytes) -> str:
        error = self._handle_expression(message)
        return json.dumps({"ok": True} if error is None else {"ok": False, "error": error})

    async def _expression(self, request: web.Request) -> web.Response:
        self._check_post(request)
        error = self._handle_expression(await self._read_body(request))
        if error is not None:
            raise web.HTTPBadRequest(text=error)
        return web.json_response({"ok": True})


async def _close_peer(pc: RTCPeerConnection) -> None:
    """pc.close(), also for a connection a hostile offer left half-built: aiortc's close() raises at
    the first part that is missing, so then stop the ICE and DTLS transports that exist one by one."""
    try:
        await pc.close()
    except Exception as e:
        log.info("closing a half-built peer connection (%s: %s)", type(e).__name__, e)
        dtls = [t.receiver.transport for t in pc.getTransceivers()] + [pc.sctp.transport if pc.sctp else None]
        parts = [part for d in dtls if d is not None for part in (d, d.transport)]
        await asyncio.gather(*(part.stop() for part in parts), return_exceptions=True)


def _rate_key(remote: str | None) -> str:
    """The address offers are counted under: IPv4 as is, IPv6 per /64 (what one host usually gets)."""
    try:
        addr = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return remote or "?"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _content_security_policy(viewer_html: bytes) -> str:
    """Scripts only from this server and the page's own inline blocks (by hash): an injected script
    does not run. frame-ancestors keeps other sites from framing the page (clickjacking)."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(block).digest()).decode()}'"
                      for block in INLINE_SCRIPT.findall(viewer_html))
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self'; img-src 'self'; "
            "connect-src 'self'; media-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'self'")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(value) -> bool:
    """A JSON array of numbers, or of arrays of numbers (rows of a matrix); no bools, no strings."""
    return isinstance(value, list) and all(
        _is_number(v) or (isinstance(v, list) and all(_is_number(x) for x in v)) for v in value)


def _ice_server(spec: str | dict) -> RTCIceServer:
    if isinstance(spec, str):
        spec = {"urls": spec}
    if not isinstance(spec, dict) or not spec.get("urls"):
        raise StreamConfigError(f"ice server {spec!r}: accepted is 'stun:host:port' or "
                                "{'urls': 'turn:host:port', 'username': ..., 'credential': ...}")
    urls = spec["urls"]
    for url in [urls] if isinstance(urls, str) else urls:
        if not str(url).startswith(("stun:", "stuns:", "turn:", "turns:")):
            raise StreamConfigError(f"ice server url {url!r}: accepted are stun:, stuns:, turn:, turns:")
    return RTCIceServer(urls=urls, username=spec.get("username"), credential=spec.get("credential"))


#: Audio packets aiortc's receiver waits for behind each one before it hands it on (its own: 4, 80 ms
#: of Opus at 20 ms a packet, on every voice into the bridge). 1 is its least: it knows a packet is
#: whole when the next one comes; a pair swapped in transit is still put back in order
#: (bench/LOOP_NOTES.md).
AUDIO_PREFETCH = 1


def _short_audio_buffer(pc: RTCPeerConnection, track: MediaStreamTrack) -> None:
    """Replace the jitter buffer of the receiver of `track` with a shorter one, before sound flows.
    aiortc makes it inside RTCRtpReceiver with no option; where a version has no such buffer, the
    voice keeps aiortc's (logged) rather than fail."""
    for receiver in (t.receiver for t in pc.getTransceivers()):
        if receiver.track is track:
            if not isinstance(getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None), JitterBuffer):
                log.warning("aiortc's audio receiver has no jitter buffer to shorten: voices keep 80 ms more")
                return
            shorter = JitterBuffer(capacity=16, prefetch=AUDIO_PREFETCH)
            receiver._RTCRtpReceiver__jitter_buffer = shorter  # type: ignore[attr-defined]  # private


def _ice_dict(server: RTCIceServer) -> dict:
    out: dict[str, object] = {"urls": server.urls}
    if server.username:
        out.update(username=server.username, credential=server.credential)
    return out
