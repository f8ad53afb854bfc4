"""Voices between the pages: a mixing bus per direction, sent to each peer as an Opus audio track.

The loop has two directions of sound: the operator's voice (operator page -> kiosk and viewers, and
the ROS topic) and the robot's (kiosk microphone and the robot's own audio topic -> operator page).
A `SoundBus` mixes its sources on one 20 ms clock (Opus's usual frame) and hands each mixed frame to
every subscribed `BusTrack`; aiortc encodes Opus per peer, which costs far less than video (about
1 % of a core per peer here) and keeps each peer's congestion and packet loss its own.

Why a bus and not aiortc's MediaRelay: a direction has several sources (a robot's text-to-speech
while its room talks into the kiosk microphone) that must add, and a source that stalls must not
stall the others or the clock. What it costs: each source keeps PREBUFFER_S of sound before it
plays (absorbs network jitter); a source that got ahead (a burst after a stall) by more than
CATCH_UP_S is cut back to PREBUFFER_S at once, a short skip in the sound instead of a delay that
would otherwise last as long as the source plays, and no source ever holds more than MAX_BUFFER_S.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame

from gaga_ros.audio import WEBRTC_RATE, Pcm, Resampler

#: One mixed frame: 20 ms at 48 kHz.
FRAME_S = 0.02
FRAME_SAMPLES = int(WEBRTC_RATE * FRAME_S)
#: Sound a source collects before it plays (after start or an underrun), and the most it holds.
PREBUFFER_S, CATCH_UP_S, MAX_BUFFER_S = 0.04, 0.1, 0.2
#: Frames a slow peer may fall behind before its oldest frame is dropped.
TRACK_QUEUE = 5


class _Source:
    def __init__(self) -> None:
        self.resample = Resampler(WEBRTC_RATE, 1)
        self.samples: deque[np.ndarray] = deque()
        self.buffered = 0
        self.playing = False
        self.last_push = 0.0
        self.skipped = 0  # samples cut to catch up

    def push(self, chunk: Pcm) -> int:
        """Add sound; returns how many samples were dropped to stay within MAX_BUFFER_S."""
        mono = self.resample(chunk).samples[:, 0]
        self.samples.append(mono)
        self.buffered += mono.size
        self.last_push = time.monotonic()
        return self._drop(self.buffered - int(MAX_BUFFER_S * WEBRTC_RATE))

    def _drop(self, n: int) -> int:
        """Drop the oldest n samples (none when n <= 0); returns how many went."""
        dropped = 0
        while n > dropped and self.samples:
            head = self.samples[0]
            k = min(n - dropped, head.size)
            if k == head.size:
                self.samples.popleft()
            else:
                self.samples[0] = head[k:]
            dropped += k
        self.buffered -= dropped
        return dropped

    def take(self, n: int) -> np.ndarray | None:
        """n samples (zero-padded when the source runs dry), or None while it (re)fills."""
        if not self.playing and self.buffered < PREBUFFER_S * WEBRTC_RATE:
            return None
        self.playing = self.buffered > 0
        if self.buffered > CATCH_UP_S * WEBRTC_RATE:
            self.skipped += self._drop(self.buffered - int(PREBUFFER_S * WEBRTC_RATE))
        out = np.zeros(n, np.int32)
        filled = 0
        while filled < n and self.samples:
            head = self.samples[0]
            k = min(n - filled, head.size)
            out[filled:filled + k] = head[:k]
            filled += k
            if k == head.size:
                self.samples.popleft()
            else:
                self.samples[0] = head[k:]
        self.buffered -= filled
        if filled < n:
            self.playing = False  # underrun: refill PREBUFFER_S before playing again
        return out


class SoundBus:
    """Mixes named sources into 20 ms mono frames for every subscribed track.

    `push` and `subscribe` run on the event loop that `start` was called on (the stream server's);
    other threads use `push_threadsafe`.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._sources: dict[str, _Source] = {}
        self._tracks: set[BusTrack] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.dropped_s = 0.0
        self.level_dbfs = -120.0  # RMS of the newest mixed frame
        self.sources_heard: dict[str, float] = {}  # source -> monotonic time of its last sound

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._mix())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for track in list(self._tracks):
            track.stop()

    def push(self, source: str, chunk: Pcm) -> None:
        dropped = self._sources.setdefault(source, _Source()).push(chunk)
        self.dropped_s += dropped / WEBRTC_RATE
        self.sources_heard[source] = time.monotonic()

    def push_threadsafe(self, source: str, chunk: Pcm) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.push, source, chunk)

    def forget(self, source: str) -> None:
        """A source that left (its peer closed): its buffered sound goes with it."""
        self._sources.pop(source, None)

    def subscribe(self) -> BusTrack:
        track = BusTrack(self)
        self._tracks.add(track)
        return track

    async def _mix(self) -> None:
        start = time.monotonic()
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * FRAME_S - time.monotonic()))
            taken = (source.take(FRAME_SAMPLES) for source in list(self._sources.values()))
            parts = [p for p in taken if p is not None]
            mixed = np.clip(np.sum(parts, axis=0), -32768, 32767).astype(np.int16) if parts \
                else np.zeros(FRAME_SAMPLES, np.int16)
            rms = float(np.sqrt(np.mean(mixed.astype(np.float64) ** 2))) / 32768.0
            self.level_dbfs = 20 * np.log10(max(rms, 1e-6))
            for track in list(self._tracks):
                track.offer(mixed)


class BusTrack(MediaStreamTrack):
    """One peer's copy of a bus: 20 ms mono frames at 48 kHz, paced by the bus's clock."""

    kind = "audio"

    def __init__(self, bus: SoundBus) -> None:
        super().__init__()
        self.bus = bus
        self._queue: asyncio.Queue[np.ndarray] = asyncio.Queue(TRACK_QUEUE)
        self._pts = 0

    def offer(self, samples: np.ndarray) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # a peer that fell behind skips ahead instead of lagging
        self._queue.put_nowait(samples)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        samples = await self._queue.get()
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = WEBRTC_RATE
        frame.time_base = fractions.Fraction(1, WEBRTC_RATE)
        frame.pts = self._pts
        self._pts += samples.size
        return frame

    def stop(self) -> None:
        super().stop()
        self.bus._tracks.discard(self)
