"""What goes onto the outgoing video track: the newest-frame slot, one shared encode, per-client tracks.

Why the server encodes itself instead of letting aiortc do it: aiortc creates one encoder per
RTCRtpSender, so N viewers cost N encodes of the same picture. aiortc also accepts pre-encoded
``av.Packet`` objects from a track and then only packetizes them (``Encoder.pack``). So one
:class:`SharedEncoder` per (codec, size) encodes each new frame once and every viewer's
:class:`EncodedTrack` hands out the same packets. The price, documented for operators:

* the bitrate is set, not adapted (``bitrate_kbps``, changeable live); aiortc's REMB feedback only
  steers its own encoders;
* picture-loss requests (PLI/FIR) would only set aiortc's private per-sender flag, which its
  pre-encoded path never reads: :func:`route_keyframe_requests` sends them to this encoder instead
  (at most one keyframe per PEER_KEYFRAME_GAP_S for them, so one viewer cannot make every frame a
  keyframe for all). Recovery from loss also has NACK retransmission (aiortc keeps an RTP history),
  a keyframe every ``keyframe_interval_s`` and one whenever a viewer joins or falls behind. Through
  an SFU (gaga_ros.stream.janus) this is how a late joiner's keyframe is made.

The frame code (:func:`stamp_code` / :func:`read_code`) lives here too because it is what the
latency tests and the bench paint onto the outgoing frames; the viewer's JS reads the same layout.
"""

from __future__ import annotations

import asyncio
import fractions
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpsender import RTCRtpSender

from gaga_ros.image import ImageError

#: RTP video clock: aiortc converts packet pts to this, so we stamp in it directly.
VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
#: Bits carried by the frame code; the second row repeats them inverted as a check.
CODE_BITS = 16
#: Distinct frame codes: a number is painted modulo this (readers unwrap by it).
CODE_VALUES = 1 << CODE_BITS
#: The code's blocks are this fraction of the image width (16 blocks span half the width).
CODE_BLOCKS_PER_WIDTH = 32
#: Smallest frame side the stream carries, pixels (pushed frames and output sizes).
MIN_FRAME_SIDE = 16
#: How many encoded frames a slow viewer may lag before it must wait for a keyframe.
RING_FRAMES = 30
#: Least time between keyframes made for peers' picture-loss requests, seconds (one is kept
#: waiting, not dropped, so the requester still gets its keyframe within this).
PEER_KEYFRAME_GAP_S = 0.2


class FrameError(ImageError):
    """A pushed image the stream cannot carry; the message says what is accepted."""


def _code_block(width: int) -> int:
    return max(2, width // CODE_BLOCKS_PER_WIDTH)


def stamp_code(image: np.ndarray, frame_number: int) -> np.ndarray:
    """Paint frame_number (mod 2**16) as black/white blocks into the top-left corner, in place.

    Row one holds the 16 bits, most significant first (white = 1); row two holds them inverted, so
    a reader can tell a clean decode from one damaged by compression. Each block is width/32 pixels
    square (16 px at 512 wide), large enough to survive VP8 at 500 kbit/s. Returns image.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        raise FrameError("stamp_code paints into a numpy uint8 HxWx3 image, in place")
    b = _code_block(image.shape[1])
    if 2 * b > image.shape[0]:
        raise FrameError(f"image {image.shape[1]}x{image.shape[0]} is too flat for the frame code")
    value = int(frame_number) % CODE_VALUES
    for i in range(CODE_BITS):
        bit = (value >> (CODE_BITS - 1 - i)) & 1
        image[0:b, i * b:(i + 1) * b] = 255 * bit
        image[b:2 * b, i * b:(i + 1) * b] = 255 * (1 - bit)
    return image


def read_code(image: np.ndarray) -> int | None:
    """Read the frame code painted by stamp_code; None when absent or damaged."""
    b = _code_block(image.shape[1])
    lo, hi = b // 4, b - b // 4
    luma = image[: 2 * b, : CODE_BITS * b].astype(np.float32).mean(axis=2)
    value = 0
    for i in range(CODE_BITS):
        top = luma[lo:hi, i * b + lo:i * b + hi].mean() > 128
        bottom = luma[b + lo:b + hi, i * b + lo:i * b + hi].mean() > 128
        if top == bottom:
            return None
        value = (value << 1) | int(top)
    return value


@dataclass
class PushedFrame:
    """One pushed image with its caller stamp and the monotonic time it arrived."""

    rgb: np.ndarray
    stamp_ns: int
    arrived: float
    seq: int


class NewestFrame:
    """A one-slot mailbox: writers from any thread replace the frame, async readers see only the newest.

    Nothing queues: a frame that nobody took before the next push is simply dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frame: PushedFrame | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self.pushed = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop whose readers wait on new frames (call from inside that loop)."""
        self._loop = loop
        self._changed = asyncio.Event()

    def put(self, rgb: np.ndarray, stamp_ns: int) -> None:
        """Store rgb as the newest frame; thread-safe, never blocks on readers."""
        with self._lock:
            self.pushed += 1
            self._frame = PushedFrame(rgb, int(stamp_ns), time.monotonic(), self.pushed)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # loop closed between the check and the call: nobody is reading
                pass

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def latest(self) -> PushedFrame | None:
        """The newest frame, or None before the first push."""
        with self._lock:
            return self._frame

    async def wait_newer(self, seq: int) -> None:
        """Return once a frame newer than seq is in the slot (call from the bound loop)."""
        assert self._changed is not None, "NewestFrame.bind() was not called"
        while self.pushed <= seq:
            self._changed.clear()
            await self._changed.wait()


@dataclass
class EncodedPacket:
    """One encoded picture, shared read-only by every viewer's sender."""

    seq: int
    packet: av.Packet
    keyframe: bool
    frame_seq: int


class SharedEncoder:
    """Encodes the newest frame once per step for every viewer on one codec and output size."""

    def __init__(self, source: NewestFrame, codec: str, bitrate_kbps: int, max_fps: float,
                 size: tuple[int, int] | None, keyframe_interval_s: float) -> None:
        self.codec = codec
        self.source = source
        self.bitrate = bitrate_kbps * 1000
        self.min_period = 1.0 / max_fps
        self.size = size
        self.keyframe_interval = keyframe_interval_s
        self.subscribers: set[EncodedTrack] = set()
        self.encoded = 0
        self.encode_seconds = 0.0
        self._ring: deque[EncodedPacket] = deque(maxlen=RING_FRAMES)
        self._ctx: av.VideoCodecContext | None = None
        self._ctx_size: tuple[int, int] | None = None
        self._keyframe_wanted = True
        self._reopen = False
        self._last_keyframe = 0.0
        self._peer_request: asyncio.TimerHandle | None = None
        self.peer_keyframes = 0  # keyframes made for peers' PLI/FIR
        self._last_pts = -1
        self._new_packet = asyncio.Event()
        self._kick = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"encode-{codec}")
        self._task: asyncio.Task | None = None

    def subscribe(self) -> EncodedTrack:
        """A new viewer's track; its first packet will be a keyframe of the newest frame."""
        track = EncodedTrack(self)
        self.subscribers.add(track)
        self.request_keyframe()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return track

    def unsubscribe(self, track: EncodedTrack) -> None:
        """Forget a viewer; the encoder idles once nobody watches."""
        self.subscribers.discard(track)

    def set_bitrate(self, bitrate_kbps: int) -> None:
        """A new target bitrate, live: the codec reopens at the next frame, starting with a keyframe."""
        self.bitrate = int(bitrate_kbps) * 1000
        self._reopen = True

    def request_keyframe(self) -> None:
        """Make the next encode a keyframe, re-encoding the newest frame now if no new one comes."""
        self._keyframe_wanted = True
        self._kick.set()

    def peer_keyframe_request(self) -> None:
        """A peer's PLI/FIR: a keyframe now, or once PEER_KEYFRAME_GAP_S after the last one."""
        if self._peer_request is not None or self._keyframe_wanted:
            return  # one is on its way and serves this request too
        wait = self._last_keyframe + PEER_KEYFRAME_GAP_S - time.monotonic()
        if wait <= 0:
            self.peer_keyframes += 1
            self.request_keyframe()
            return
        self._peer_request = asyncio.get_running_loop().call_later(wait, self._deferred_peer_keyframe)

    def _deferred_peer_keyframe(self) -> None:
        self._peer_request = None
        self.peer_keyframe_request()

    async def close(self) -> None:
        """Stop encoding and release the codec thread."""
        if self._peer_request is not None:
            self._peer_request.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)
        self._ctx = None

    @property
    def ring(self) -> deque[EncodedPacket]:
        """The last RING_FRAMES encoded packets, oldest first."""
        return self._ring

    async def wait_packet(self) -> None:
        """Return once a new packet was encoded."""
        await self._new_packet.wait()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        seen = 0
        last_encode = 0.0
        while True:
            if self.source.pushed <= seen and not (self._keyframe_wanted and self.source.latest()):
                waiter = loop.create_task(self.source.wait_newer(seen))
                kicker = loop.create_task(self._kick.wait())
                try:
                    await asyncio.wait({waiter, kicker}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    kicker.cancel()
                self._kick.clear()
                continue
            wait = last_encode + self.min_period - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            frame = self.source.latest()
            if frame is None:
                continue
            seen = frame.seq
            if not self.subscribers:
                self._keyframe_wanted = False  # nobody to send it to; a new viewer asks again
                continue
            now = time.monotonic()
            keyframe = self._keyframe_wanted or now - self._last_keyframe >= self.keyframe_interval
            self._keyframe_wanted = False
            pts = max(int(frame.arrived * VIDEO_CLOCK), self._last_pts + 1)
            self._last_pts = pts
            last_encode = now
            packet = await loop.run_in_executor(self._pool, self._encode, frame.rgb, pts, keyframe)
            if packet is None:
                continue
            if keyframe:
                self._last_keyframe = now
            self.encoded += 1
            self._ring.append(EncodedPacket(self.encoded, packet, keyframe, frame.seq))
            self._new_packet.set()
            self._new_packet = asyncio.Event()

    def _encode(self, rgb: np.ndarray, pts: int, keyframe: bool) -> av.Packet | None:
        t0 = time.perf_counter()
        h, w = rgb.shape[:2]
        ow, oh = self.size or (w, h)
        ow, oh = ow - ow % 2, oh - oh % 2
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            width=ow, height=oh, format="yuv420p")
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        frame.pict_type = av.video.frame.PictureType.I if keyframe else av.video.frame.PictureType.NONE
        if self._ctx is None or self._ctx_size != (ow, oh) or self._reopen:
            self._reopen = False
            self._ctx = self._open(ow, oh)
            self._ctx_size = (ow, oh)
            frame.pict_type = av.video.frame.PictureType.I
        data = b"".join(bytes(p) for p in self._ctx.encode(frame))
        self.encode_seconds += time.perf_counter() - t0
        if not data:
            return None
        packet = av.Packet(data)
        packet.pts = pts
        packet.time_base = VIDEO_TIME_BASE
        return packet

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        """A low-latency encoder: no lookahead, no B-frames, constant bitrate; keyframes on request."""
        ctx = av.CodecContext.create("libvpx" if self.codec == "VP8" else "libx264", "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        ctx.time_base = VIDEO_TIME_BASE
        ctx.framerate = fractions.Fraction(round(1.0 / self.min_period), 1)
        ctx.bit_rate = self.bitrate
        ctx.gop_size = 100_000  # keyframes only when this class asks for them
        if self.codec == "VP8":
            # libvpx real-time settings as aiortc uses them (CBR, one token partition, no lag).
            ctx.qmin, ctx.qmax = 2, 56
            ctx.options = {
                "deadline": "realtime", "cpu-used": "-6", "lag-in-frames": "0",
                "bufsize": str(self.bitrate), "minrate": str(self.bitrate), "maxrate": str(self.bitrate),
                "undershoot-pct": "100", "overshoot-pct": "15", "static-thresh": "1",
                "noise-sensitivity": "0", "partitions": "0", "error-resilient": "1",
            }
            # One thread: with PyAV's default threading libvpx took 150-220 ms a frame here
            # (2 cores), against 7 ms single-threaded at 512x512.
            ctx.thread_count = 1
        else:
            # Constrained Baseline as WebRTC browsers decode it; an IDR (with SPS/PPS) on each request.
            ctx.profile = "Baseline"
            ctx.options = {"preset": "veryfast", "tune": "zerolatency", "level": "31",
                           "forced-idr": "1", "maxrate": str(self.bitrate),
                           "bufsize": str(self.bitrate // 2)}
        return ctx


class EncodedTrack(MediaStreamTrack):
    """One viewer's video track: hands out the shared encoder's packets at the viewer's own pace."""

    kind = "video"

    def __init__(self, encoder: SharedEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.frames_sent = 0
        self.last_sent = 0.0  # wall time of the last packet handed to the sender
        self._last = encoder.encoded  # start at the live edge, never replay the ring
        self._need_keyframe = True

    async def recv(self) -> av.Packet:
        """The next packet for this viewer (aiortc then only packetizes it).

        In order while the viewer keeps up; one that is new or fell out of the ring skips to the
        next keyframe (and asks for one) rather than decoding a broken chain.
        """
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            ring = self.encoder.ring
            if not self._need_keyframe and ring and ring[-1].seq > self._last:
                item = next((p for p in ring if p.seq == self._last + 1), None)
                if item is None:
                    self._need_keyframe = True
                else:
                    return self._sent(item)
            if self._need_keyframe:
                item = next((p for p in ring if p.seq > self._last and p.keyframe), None)
                if item is not None:
                    self._need_keyframe = False
                    return self._sent(item)
                self.encoder.request_keyframe()
            await self.encoder.wait_packet()

    def _sent(self, item: EncodedPacket) -> av.Packet:
        self._last = item.seq
        self.frames_sent += 1
        self.last_sent = time.time()
        return item.packet

    def stop(self) -> None:
        """End the track and leave the shared encoder."""
        self.encoder.unsubscribe(self)
        super().stop()


def route_keyframe_requests(sender: RTCRtpSender, encoder: SharedEncoder) -> None:
    """Send the PLI/FIR a peer's RTCP carries for `sender` to `encoder`.

    aiortc answers them in RTCRtpSender._handle_rtcp_packet by calling ``self._send_keyframe()``,
    which sets a flag only its own encoders read; pre-encoded packets pass it by. Replacing that
    method on this one sender is the only hook aiortc 1.16 offers.
    """
    sender._send_keyframe = encoder.peer_keyframe_request  # type: ignore[method-assign]
