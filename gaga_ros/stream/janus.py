"""Many viewers through an existing SFU: the avatar published once into a Janus VideoRoom.

Why: in direct mode (gaga_ros.stream.webrtc) the bridge packetises, encrypts and paces every
viewer's copy itself. Janus (Debian's `janus`, 1.1) takes one published stream and fans it out, with
per-viewer NACK, RTCP and keyframe requests, in C. The bridge stays the only thing pages talk to:
it proxies the subscribers' signalling (`JanusPublisher.subscribe` / `start`), so the viewer token
rules stay those of direct mode and Janus's HTTP API needs no exposure beyond loopback.

Protocol: Janus's HTTP API (janus.transport.http), one session for the publisher handle and every
subscriber handle; asynchronous replies and events arrive on a long poll of the session, which also
keeps the session alive. The room's pin and secret, and the API secret when Janus has one, are one
value the caller gets from the environment (never a parameter): the bridge is the only client that
joins the room, so pages never see it.

Faults: an unreachable or dying Janus ends the attempt; `JanusPublisher.run` says so in `problem`
(naming the URL), waits with backoff (RETRY_S) and starts over: a new session, a new publisher peer
connection. Subscribers' pages notice on their own (their peer connection fails) and ask again.

`minimal_config` writes the smallest configuration a loopback Janus needs for this (tests, bench and
a robot's own Janus): HTTP transport on 127.0.0.1 only, admin API off, the VideoRoom plugin only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcrtpsender import RTCRtpSender

from gaga_ros.errors import InputError, UnavailableError
from gaga_ros.stream.sound import SoundBus
from gaga_ros.stream.tracks import SharedEncoder, route_keyframe_requests

log = logging.getLogger(__name__)

PLUGIN = "janus.plugin.videoroom"
#: The publisher's id in the room: fixed, so subscribers need no participant listing and a stale
#: publisher of a crashed bridge (its session lingers until Janus's session timeout) can be kicked.
#: Two live bridges on one room would kick each other in turn: give each bridge its own room.
FEED_ID = 1
#: Waits after a failed attempt, seconds; the last one repeats.
RETRY_S = (0.5, 1.0, 2.0, 5.0)
#: Janus holds a long poll up to 30 s and then answers with a keepalive.
POLL_TIMEOUT_S = 45.0
#: Most seconds one request (or its asynchronous reply) may take.
REQUEST_TIMEOUT_S = 10.0
#: VideoRoom error: "a participant with this id already exists" (a stale publisher).
ID_EXISTS = 436
#: Janus error: no such session (Janus restarted, or the session timed out).
NO_SUCH_SESSION = 458
#: Where Debian's janus package puts its plugins and transports.
DEBIAN_LIB = Path("/usr/lib/x86_64-linux-gnu/janus")


class JanusError(UnavailableError):
    """Janus could not be reached, or refused a request; the message names the URL."""


class SfuConfigError(InputError):
    """SFU settings that cannot work; the message says what is accepted."""


@dataclass(frozen=True)
class SfuSettings:
    """Where the bridge publishes: Janus's HTTP API URL, the VideoRoom's number, its pin/secret."""

    url: str
    room: int
    secret: str

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise SfuConfigError(f"janus_url {self.url!r}: accepted is Janus's HTTP API, e.g. "
                                 "http://127.0.0.1:8088/janus")
        if not 1 <= self.room < 2**53:
            raise SfuConfigError(f"janus_room {self.room}: accepted is a positive integer (a room number)")
        if len(self.secret) < 8:
            raise SfuConfigError("the room secret is shorter than 8 characters: put a long random string in "
                                 "the environment variable janus_secret_env names")


@dataclass
class Subscriber:
    """One page's Janus subscriber handle, from the offer Janus made to its answer and hangup."""

    handle: int
    remote: str
    up: bool = False


class JanusSession:
    """One Janus session over the HTTP API: requests, asynchronous replies and events (long poll)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, apisecret: str | None) -> None:
        self.http, self.url, self.apisecret = http, url.rstrip("/"), apisecret
        self.id: int | None = None
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[dict]] = {}
        self._poller: asyncio.Task | None = None

    async def create(self) -> None:
        reply = await self._post(self.url, {"janus": "create"})
        self.id = reply["data"]["id"]
        self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def attach(self) -> int:
        """A new VideoRoom handle's id."""
        reply = await self._post(f"{self.url}/{self.id}", {"janus": "attach", "plugin": PLUGIN})
        return reply["data"]["id"]

    async def detach(self, handle: int) -> None:
        await self._post(f"{self.url}/{self.id}/{handle}", {"janus": "detach"})

    async def message(self, handle: int, body: dict, jsep: dict | None = None) -> tuple[dict, dict | None]:
        """Send a plugin request; the plugin's data and JSEP (waits for the event of an asynchronous one).
        A VideoRoom error raises JanusError with its code."""
        request: dict = {"janus": "message", "body": body}
        if jsep is not None:
            request["jsep"] = jsep
        transaction = secrets.token_hex(8)
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[transaction] = waiter
        try:
            reply = await self._post(f"{self.url}/{self.id}/{handle}", request, transaction)
            if reply["janus"] == "ack":
                reply = await asyncio.wait_for(asyncio.shield(waiter), REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise JanusError(f"Janus at {self.url} did not answer {body.get('request')!r} within "
                             f"{REQUEST_TIMEOUT_S:g} s") from None
        finally:
            self._waiting.pop(transaction, None)
        data = reply.get("plugindata", {}).get("data", {})
        if "error_code" in data:
            error = JanusError(f"Janus at {self.url} refused {body.get('request')!r}: {data.get('error')}")
            error.code = data["error_code"]  # type: ignore[attr-defined]
            raise error
        return data, reply.get("jsep")

    async def trickle_done(self, handle: int) -> None:
        """No more candidates from the page (its answer carried them all)."""
        await self._post(f"{self.url}/{self.id}/{handle}",
                         {"janus": "trickle", "candidate": {"completed": True}})

    async def close(self) -> None:
        """Destroy the session (its handles go with it) and stop polling; quiet when Janus is gone."""
        if self._poller is not None:
            self._poller.cancel()
        if self.id is not None and not self.lost.done():
            try:
                await self._post(f"{self.url}/{self.id}", {"janus": "destroy"})
            except (JanusError, aiohttp.ClientError, OSError):
                pass
        if not self.lost.done():
            self.lost.set_result("closed")

    async def _post(self, url: str, request: dict, transaction: str | None = None) -> dict:
        request = {**request, "transaction": transaction or secrets.token_hex(8)}
        if self.apisecret:
            request["apisecret"] = self.apisecret
        try:
            async with self.http.post(url, json=request,
                                      timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as response:
                reply = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise JanusError(f"Janus at {self.url} unreachable: {_reason(e)}") from None
        if reply.get("janus") == "error":
            error = reply.get("error", {})
            if error.get("code") == NO_SUCH_SESSION and not self.lost.done():
                self.lost.set_result(f"Janus at {self.url} forgot the session (restarted?)")
            raise JanusError(f"Janus at {self.url} refused {request['janus']!r}: {error.get('reason')}")
        return reply

    async def _poll(self) -> None:
        """Long-poll the session's events: replies to waiting requests, the rest onto `events`."""
        params = {"maxev": "10"} | ({"apisecret": self.apisecret} if self.apisecret else {})
        why = "closed"
        try:
            while True:
                try:
                    async with self.http.get(f"{self.url}/{self.id}", params=params,
                                             timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as response:
                        reply = await response.json(content_type=None)
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                    why = f"Janus at {self.url} unreachable: {_reason(e)}"
                    return
                for event in reply if isinstance(reply, list) else [reply]:
                    if event.get("janus") == "error":
                        why = f"Janus at {self.url}: {event.get('error', {}).get('reason')}"
                        return
                    waiter = self._waiting.get(event.get("transaction", ""))
                    if waiter is not None and not waiter.done() and event.get("janus") == "event":
                        waiter.set_result(event)
                    elif event.get("janus") != "keepalive":
                        self.events.put_nowait(event)
        finally:
            if not self.lost.done():
                self.lost.set_result(why)


class JanusPublisher:
    """Keeps the avatar (and the operator's voice) published into a VideoRoom; hands out subscribers.

    `run()` is the whole life: connect, publish, wait for a fault, say it, back off, start over. The
    publisher's peer connection sends one EncodedTrack of the shared encoder (no second encode), and
    keyframe requests Janus relays from its subscribers (PLI/FIR) reach that encoder.
    """

    def __init__(self, settings: SfuSettings, encoder: SharedEncoder, voice: SoundBus | None,
                 codec: str, pending_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.encoder, self.voice, self.codec = encoder, voice, codec
        self.pending_timeout_s = pending_timeout_s
        self.state = "starting"
        self.problem: str | None = None
        self.retry_in_s: float | None = None
        self.publishes = 0  # successful publishes (1 + reconnections)
        self.subscribers: dict[int, Subscriber] = {}
        self.session: JanusSession | None = None
        self._http: aiohttp.ClientSession | None = None
        self._pc: RTCPeerConnection | None = None

    @property
    def viewers(self) -> int:
        """Subscribers whose media is up."""
        return sum(s.up for s in self.subscribers.values())

    async def run(self) -> None:
        """Publish until cancelled, retrying with backoff after every fault."""
        self._http = aiohttp.ClientSession()
        failures = 0
        try:
            while True:
                published = self.publishes
                try:
                    why = await self._publish_once()
                    if self.publishes > published:
                        failures = 0  # it was up: the next attempt starts with the short wait
                except JanusError as e:
                    why = str(e)
                except Exception as e:  # aiortc or a malformed reply: one line, no traceback loop
                    why = f"Janus at {self.settings.url}: {type(e).__name__}: {e}"
                await self._teardown()
                wait = RETRY_S[min(failures, len(RETRY_S) - 1)]
                failures += 1
                self.state, self.problem, self.retry_in_s = "error", why, wait
                log.warning("%s; retrying in %g s", why, wait)
                await asyncio.sleep(wait)
                self.retry_in_s = None
        finally:
            await self._teardown()
            await self._http.close()

    async def _publish_once(self) -> str:
        """One connection's life: returns why it ended (raises JanusError when it never got up)."""
        assert self._http is not None
        self.state = "connecting"
        session = self.session = JanusSession(self._http, self.settings.url, self.settings.secret)
        await session.create()
        handle = await session.attach()
        await self._ensure_room(session, handle)
        join = {"request": "join", "ptype": "publisher", "room": self.settings.room,
                "pin": self.settings.secret, "id": FEED_ID, "display": "gaga_ros avatar"}
        try:
            await session.message(handle, join)
        except JanusError as e:
            if getattr(e, "code", None) != ID_EXISTS:
                raise
            log.info("a stale publisher holds feed %d in room %d: kicked", FEED_ID, self.settings.room)
            await session.message(handle, {"request": "kick", "room": self.settings.room,
                                           "secret": self.settings.secret, "id": FEED_ID})
            await session.message(handle, join)
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = self.encoder.subscribe()
        video = pc.addTransceiver(track, direction="sendonly")
        video.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                   if c.mimeType == f"video/{self.codec}"])
        route_keyframe_requests(video.sender, self.encoder)
        if self.voice is not None:
            pc.addTransceiver(self.voice.subscribe(), direction="sendonly")
        failed = asyncio.get_running_loop().create_future()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState == "connected":
                self.state, self.problem = "publishing", None
                self.publishes += 1
                log.info("publishing into room %d at %s", self.settings.room, self.settings.url)
            elif pc.connectionState in ("failed", "closed") and not failed.done():
                failed.set_result(f"Janus at {self.settings.url}: publisher connection {pc.connectionState}")

        await pc.setLocalDescription(await pc.createOffer())
        _, jsep = await session.message(handle, {"request": "publish"},
                                        {"type": "offer", "sdp": pc.localDescription.sdp})
        if not jsep:
            raise JanusError(f"Janus at {self.settings.url} answered publish without an SDP")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=jsep["sdp"], type=jsep["type"]))
        events = asyncio.get_running_loop().create_task(self._events(session))
        try:
            done, _ = await asyncio.wait({session.lost, failed}, return_when=asyncio.FIRST_COMPLETED)
            return next(iter(done)).result()
        finally:
            events.cancel()

    async def _ensure_room(self, session: JanusSession, handle: int) -> None:
        """The room must exist: created (pin and secret set, one publisher) when Janus lacks it."""
        room = self.settings.room
        data, _ = await session.message(handle, {"request": "exists", "room": room})
        if data.get("exists"):
            return
        await session.message(handle, {
            "request": "create", "room": room, "secret": self.settings.secret, "pin": self.settings.secret,
            "is_private": True, "publishers": 1, "videocodec": self.codec.lower(), "audiocodec": "opus",
            "description": "gaga_ros avatar"})
        log.info("created room %d at %s", room, self.settings.url)

    async def _events(self, session: JanusSession) -> None:
        """Subscribers' media up and hangups (a page closed or lost): count them, free their handles."""
        while True:
            event = await session.events.get()
            sub = self.subscribers.get(event.get("sender", -1))
            if sub is None:
                continue
            kind = event.get("janus")
            if kind == "webrtcup":
                sub.up = True
            elif kind in ("hangup", "detached"):
                await self.leave(sub.handle)

    async def _teardown(self) -> None:
        self.subscribers.clear()  # their handles end with the session
        if self._pc is not None:
            pc, self._pc = self._pc, None
            for sender in pc.getSenders():
                if sender.track is not None:
                    sender.track.stop()
            await pc.close()
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()

    # -- subscribers (called by the stream server for each page) -------------------------------

    async def subscribe(self, remote: str) -> tuple[int, dict]:
        """A new subscriber handle and Janus's offer for it; JanusError while not publishing."""
        session = self.session
        if session is None or self.state != "publishing":
            raise JanusError(self.problem or
                             f"Janus at {self.settings.url}: not publishing yet ({self.state})")
        handle = await session.attach()
        sub = self.subscribers[handle] = Subscriber(handle, remote)
        try:
            _, jsep = await session.message(handle, {"request": "join", "ptype": "subscriber",
                                                     "room": self.settings.room, "pin": self.settings.secret,
                                                     "streams": [{"feed": FEED_ID}]})
            if not jsep:
                raise JanusError(f"Janus at {self.settings.url} sent no offer for a subscriber")
        except BaseException:
            await self.leave(handle)
            raise
        asyncio.get_running_loop().call_later(self.pending_timeout_s, self._expire, sub)
        return handle, jsep

    async def start(self, handle: int, answer_sdp: str) -> None:
        """The page's answer for its subscriber handle."""
        session = self.session
        if session is None or handle not in self.subscribers:
            raise JanusError(f"subscription {handle} is unknown (expired, or Janus restarted): "
                             "subscribe again")
        await session.message(handle, {"request": "start"}, {"type": "answer", "sdp": answer_sdp})
        await session.trickle_done(handle)

    async def leave(self, handle: int) -> None:
        """Forget a subscriber and detach its handle (quiet when Janus already forgot it)."""
        if self.subscribers.pop(handle, None) is None or self.session is None:
            return
        try:
            await self.session.detach(handle)
        except JanusError:
            pass

    def _expire(self, sub: Subscriber) -> None:
        if not sub.up and self.subscribers.get(sub.handle) is sub:
            log.info("subscriber %d (%s) did not connect within %g s: dropped", sub.handle, sub.remote,
                     self.pending_timeout_s)
            asyncio.ensure_future(self.leave(sub.handle))


def _reason(e: BaseException) -> str:
    """One line for a connection failure (aiohttp's messages repeat the URL)."""
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientConnectorError):
        return e.os_error.strerror or str(e.os_error)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def minimal_config(folder: Path, port: int, secret: str, room: int, codec: str = "VP8",
                   lib: Path = DEBIAN_LIB) -> list[str]:
    """Write a loopback-only Janus configuration into `folder`; the command line that starts it.

    HTTP transport on 127.0.0.1:`port` only (admin API off, no WebSockets), the VideoRoom plugin only
    (folders of links, so nothing else loads), the API secret and the room's pin and secret set to
    `secret`, the room `room` defined. Nothing needs root: everything lives under `folder`.
    ICE keepalives are connectivity checks (answered, unlike libnice's default indications), so Janus
    notices a viewer that vanished without a goodbye (a crash, a cable) and hangs its subscription up,
    about 50 s later with libnice 0.1.21 (measured); otherwise the handle would stay until Janus stops.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for kind, names in (("plugins", ["libjanus_videoroom.so"]), ("transports", ["libjanus_http.so"]),
                        ("events", []), ("loggers", [])):
        (folder / kind).mkdir(exist_ok=True)
        for name in names:
            link = folder / kind / name
            if not link.exists():
                if not (lib / kind / name).exists():
                    raise SfuConfigError(f"{lib / kind / name} is missing: apt-get install janus")
                os.symlink(lib / kind / name, link)
    (folder / "janus.jcfg").write_text(
        "general: {\n"
        f'  configs_folder = "{folder}"\n  plugins_folder = "{folder}/plugins"\n'
        f'  transports_folder = "{folder}/transports"\n  events_folder = "{folder}/events"\n'
        f'  loggers_folder = "{folder}/loggers"\n  debug_level = 4\n  api_secret = "{secret}"\n'
        "  session_timeout = 60\n}\n"
        "media: {}\nnat: {\n  nice_debug = false\n  ice_keepalive_conncheck = true\n}\n"
        "plugins: {}\ntransports: {}\nloggers: {}\nevents: {}\n")
    (folder / "janus.transport.http.jcfg").write_text(
        "general: {\n  json = \"compact\"\n  base_path = \"/janus\"\n  http = true\n"
        f'  port = {port}\n  ip = "127.0.0.1"\n  https = false\n}}\n'
        "admin: {\n  admin_http = false\n  admin_https = false\n}\ncors: {}\n")
    (folder / "janus.plugin.videoroom.jcfg").write_text(
        "general: {}\n"
        f'room-{room}: {{\n  description = "gaga_ros avatar"\n  secret = "{secret}"\n  pin = "{secret}"\n'
        f'  is_private = true\n  publishers = 1\n  videocodec = "{codec.lower()}"\n'
        '  audiocodec = "opus"\n}\n')
    return ["janus", f"--config={folder}/janus.jcfg", f"--configs-folder={folder}", "--disable-colors",
            "--log-stdout"]
