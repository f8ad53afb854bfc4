"""Sound -> mouth: jaw and lip weights that follow a voice, for when no face drives the avatar.

`MouthEstimator` is fed `Pcm` chunks as they arrive (any accepted rate and channel count) and gives,
at any time, weights in the named-expression vocabulary (gaga_ros.blendshapes.NAMES) for the sound
analysed so far. It never looks ahead: what it shows at time t depends on sound before t only.

The signal chain, per stream:

1. `Resampler` (libswresample) to ANALYSIS_RATE mono: every rate and channel count reads alike.
2. Frames of WINDOW samples (32 ms, Hann window) every HOP samples (10 ms), power spectrum by FFT.
3. Level: the power in `Tuning.speech_band` (where voiced speech lives: above mains hum and
   rumble, below hiss), in dBFS. Log compression makes loudness differences between speakers an
   offset.
4. Noise floor: the lowest level (smoothed over 50 ms) of the last `floor_window_s` (minimum
   statistics: speech pauses often enough that the minimum is the room, not the voice), never below
   `silence_db`. The opening is the level above floor + `gate_db`, over `range_db`: 0 in silence, 1
   for loud speech, whatever the microphone's gain and the room's noise.
5. Two attack/release smoothers of that opening: the lips' (fast) and the jaw's (slower: a jaw is
   heavier than lips). jawOpen follows the jaw's; mouthClose = jaw - lips closes the lips on the
   open jaw when the sound drops faster than the jaw can (stops, /m/ /p/ /b/).
6. Shapes from the spectrum while there is voice: the spectral centroid against the voice's own
   running average (so a deep and a high voice read alike). Lower -> rounded vowels (/o/ /u/):
   mouthFunnel with an open jaw, mouthPucker with a nearly closed one. Higher -> spread vowels
   (/i/ /e/): a little mouthSmile on both sides.

Latency (sound in -> weights out): the resampler's filter (~1 ms), the analysis frame (a sound
fills a 32 ms window gradually, counted from its end), the 10 ms hop, and the jaw's attack (20 ms
time constant). Measured on a tone burst fed in 1 ms pieces: jawOpen is half open 20 ms after the
onset and 90 % open after 50 ms; after the sound ends it is half closed in 80 ms (the jaw's 80 ms
release) and closed within 0.4 s. A live system adds its chunk size (20 ms usually) before the
sound reaches the estimator.

Cost: one 512-point real FFT and a few sums per 10 ms of sound, under 1 % of one core at 50 chunks/s
(bench/voice_bench.py measures it).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from gaga_ros.audio import Pcm, Resampler

#: Analysis rate: speech's content is below 8 kHz.
ANALYSIS_RATE = 16000
#: Hop and window of the analysis frames, samples at ANALYSIS_RATE (10 ms and 32 ms).
HOP, WINDOW = 160, 512
HOP_S = HOP / ANALYSIS_RATE


@dataclass(frozen=True)
class Smoother:
    """One-pole smoothing with separate time constants for rising (attack) and falling (release)."""

    attack_s: float
    release_s: float

    def step(self, state: float, target: float, dt: float) -> float:
        tau = self.attack_s if target > state else self.release_s
        return target + (state - target) * math.exp(-dt / tau)


@dataclass(frozen=True)
class Tuning:
    """The estimator's settings (bench/voice_bench.py says how they were chosen)."""

    #: Hz: the band whose level opens the mouth.
    speech_band: tuple[float, float] = (250.0, 4000.0)
    #: dB above the noise floor before the mouth opens, and the range over which it opens fully.
    gate_db: float = 6.0
    range_db: float = 30.0
    #: Seconds of level history whose minimum is the noise floor.
    floor_window_s: float = 2.0
    #: Smoothing of the level whose minimum is the floor (the minimum of a raw level is the deepest
    #: dip of the noise, well below its usual level).
    level: Smoother = Smoother(0.05, 0.05)
    #: dBFS: the floor never goes below this, so digital silence and dither keep the mouth shut.
    silence_db: float = -70.0
    #: The lips' and the jaw's smoothing.
    lips: Smoother = Smoother(0.010, 0.030)
    jaw: Smoother = Smoother(0.020, 0.080)
    #: jawOpen at full opening (1 is ARKit's widest mouth; speech rarely needs more than this).
    max_jaw: float = 0.6
    #: Centroid deviation (fraction of the voice's average) that counts as fully rounded or spread.
    shape_spread: float = 0.35
    #: Seconds over which the voice's average centroid is learned.
    centroid_memory_s: float = 2.0
    #: Largest weights of the shapes.
    max_funnel: float = 0.5
    max_pucker: float = 0.4
    max_smile: float = 0.25


#: The names the estimator drives (the mouth only): a command on the voice layer sets all of them.
MOUTH_NAMES = ("jawOpen", "mouthClose", "mouthFunnel", "mouthPucker", "mouthSmileLeft", "mouthSmileRight")


class MouthEstimator:
    """Streaming sound -> mouth weights; one per sound stream (it keeps the stream's state)."""

    def __init__(self, tuning: Tuning | None = None) -> None:
        self.tuning = tuning or Tuning()
        t = self.tuning
        self._resample = Resampler(ANALYSIS_RATE, 1)
        self._window = np.hanning(WINDOW).astype(np.float32)
        freqs = np.fft.rfftfreq(WINDOW, 1.0 / ANALYSIS_RATE)
        self._band = (freqs >= t.speech_band[0]) & (freqs <= t.speech_band[1])
        self._freqs = freqs[self._band]
        # Power of a full-scale sine in one frame, so levels read in dBFS.
        self._full_scale = float((self._window.sum() / 2) ** 2)
        self._buffer = np.zeros(WINDOW, np.float32)
        self._pending = np.zeros(0, np.float32)
        self._hops = 0
        self._levels: deque[float] = deque(maxlen=max(1, round(t.floor_window_s / HOP_S)))
        self.lips = self.jaw = 0.0
        self.level_db = self.floor_db = self._smooth_db = t.silence_db
        self._centroid_avg: float | None = None
        self._rounded = self._spread = 0.0
        self.analysed_s = 0.0

    def feed(self, chunk: Pcm) -> None:
        """Analyse a chunk: every complete hop updates the state."""
        mono = self._resample(chunk).mono()
        samples = np.concatenate([self._pending, mono]) if self._pending.size else mono
        hops = samples.size // HOP
        for i in range(hops):
            self._buffer = np.concatenate([self._buffer[HOP:], samples[i * HOP:(i + 1) * HOP]])
            self._hops += 1
            if self._hops * HOP >= WINDOW:  # a frame half of zeros is not the stream's level
                self._analyse(self._buffer)
        self._pending = samples[hops * HOP:].copy()
        self.analysed_s += hops * HOP_S

    def _analyse(self, frame: np.ndarray) -> None:
        t = self.tuning
        power = np.abs(np.fft.rfft(frame * self._window)) ** 2
        band = power[self._band]
        total = float(band.sum())
        self.level_db = 10.0 * math.log10(total / self._full_scale + 1e-12)
        self._smooth_db = (self.level_db if not self._levels
                           else t.level.step(self._smooth_db, self.level_db, HOP_S))
        self._levels.append(self._smooth_db)
        self.floor_db = max(min(self._levels), t.silence_db)
        opening = min(1.0, max(0.0, (self.level_db - self.floor_db - t.gate_db) / t.range_db))
        self.lips = t.lips.step(self.lips, opening, HOP_S)
        self.jaw = t.jaw.step(self.jaw, opening, HOP_S)
        rounded = spread = 0.0  # the shapes relax with the lips when the voice stops
        if opening > 0.0:
            centroid = float((band * self._freqs).sum() / total)
            if self._centroid_avg is None:
                self._centroid_avg = centroid
            memory = math.exp(-HOP_S * opening / t.centroid_memory_s)  # louder frames teach more
            self._centroid_avg = memory * self._centroid_avg + (1 - memory) * centroid
            deviation = (centroid - self._centroid_avg) / (t.shape_spread * self._centroid_avg)
            rounded, spread = min(1.0, max(0.0, -deviation)), min(1.0, max(0.0, deviation))
        self._rounded = t.lips.step(self._rounded, rounded, HOP_S)
        self._spread = t.lips.step(self._spread, spread, HOP_S)

    @property
    def weights(self) -> dict[str, float]:
        """The mouth now: every name of MOUTH_NAMES, in [0, 1] (all 0 in silence)."""
        t = self.tuning
        jaw, lips = self.jaw, min(self.lips, self.jaw)
        smile = t.max_smile * self._spread * jaw
        return {"jawOpen": t.max_jaw * jaw,
                "mouthClose": t.max_jaw * (jaw - lips),
                "mouthFunnel": t.max_funnel * self._rounded * jaw,
                "mouthPucker": t.max_pucker * self._rounded * (1.0 - jaw),
                "mouthSmileLeft": smile, "mouthSmileRight": smile}

    @property
    def silent(self) -> bool:
        """True once the mouth has closed (nothing left worth showing)."""
        return max(self.jaw, self.lips, self._rounded, self._spread) < 1e-3



#: The voice node's commands per second and the hold of each (gaga_ros/nodes/voice.py): the render
#: node's mixer follows a stream of commands one interval late (gaga_ros.named), so 60 a second
#: costs the mouth 17 ms where 30 cost 33 (bench/voice_bench.py: lag-0 correlation as shown 0.59
#: against 0.45); the hold lets the mouth fade by itself soon after the commands stop.
COMMAND_RATE, COMMAND_HOLD_S = 60.0, 0.15
#: Sound analysed ahead of real time (a live stream's chunks are analysed as they come), and what may
#: wait beyond the newest chunk before it is analysed at once (Voice).
LEAD_S, JITTER_S = 0.06, 0.06
#: Below this no weight is worth a command: the mouth is closed.
EPS = 1e-3
#: The layer of named commands that the voice's mouth goes on (gaga_ros.named): it adds to the other
#: layers (a robot's smile) instead of replacing them.
LAYER = "voice"
#: The voices that may move the mouth: the robot's own (always) and the operator's (without a face).
ROBOT, OPERATOR = "robot", "operator"


class Backlog:
    """Sound waiting to play, at most about `max_s` of it: a flood drops the oldest chunks (counted)
    and keeps the newest whole, as the pages' sound buses do (gaga_ros/stream/sound.py)."""

    def __init__(self, max_s: float) -> None:
        self.max_s = float(max_s)
        self._chunks: deque[Pcm] = deque()
        self.seconds = 0.0
        self.newest_s = 0.0
        self.dropped_chunks = 0
        self.dropped_s = 0.0

    def push(self, chunk: Pcm) -> None:
        self._chunks.append(chunk)
        self.seconds += chunk.duration_s
        self.newest_s = chunk.duration_s
        while len(self._chunks) > 1 and self.seconds - self._chunks[0].duration_s >= self.max_s - 1e-9:
            oldest = self._chunks.popleft()
            self.seconds -= oldest.duration_s
            self.dropped_chunks += 1
            self.dropped_s += oldest.duration_s

    def take(self, seconds: float) -> list[Pcm]:
        """Up to `seconds` of the oldest sound (the last piece cut at a sample)."""
        out: list[Pcm] = []
        while self._chunks and seconds > 0:
            head = self._chunks[0]
            n = min(head.frames, math.ceil(seconds * head.sample_rate - 1e-6))
            if n <= 0:
                break
            if n == head.frames:
                out.append(self._chunks.popleft())
            else:
                out.append(Pcm(head.samples[:n], head.sample_rate, head.stamp_ns))
                self._chunks[0] = Pcm(head.samples[n:], head.sample_rate,
                                      head.stamp_ns + n * 1_000_000_000 // head.sample_rate)
            taken = n / head.sample_rate
            seconds -= taken
            self.seconds = max(0.0, self.seconds - taken) if self._chunks else 0.0
        return out


class Voice:
    """One voice: its sound waiting to play, its estimator, and when it was last heard and played.

    Sound is analysed as it plays: at real-time pace plus LEAD_S, so a long chunk (a text-to-speech
    sentence sent as it starts) moves the mouth through its length, while a live stream's 20 ms
    chunks are analysed as soon as they come. What waits beyond the newest chunk and JITTER_S is
    analysed at once (a sender whose clock runs fast never builds latency).
    """

    def __init__(self, max_backlog_s: float, tuning: Tuning | None) -> None:
        self.backlog = Backlog(max_backlog_s)
        self.estimator = MouthEstimator(tuning)
        self.heard_at = self.played_at = -math.inf
        self.chunks = 0
        self._credit = LEAD_S
        self._played: float | None = None

    def hear(self, chunk: Pcm, now: float) -> None:
        self.backlog.push(chunk)
        self.heard_at = now
        self.chunks += 1

    def play(self, now: float) -> None:
        """Analyse the sound due by `now`."""
        if self._played is not None:
            self._credit = min(LEAD_S, self._credit + max(0.0, now - self._played))
        self._played = now
        due = max(self._credit, self.backlog.seconds - self.backlog.newest_s - JITTER_S)
        for piece in self.backlog.take(due):
            self.estimator.feed(piece)
            self._credit = max(0.0, self._credit - piece.duration_s)
            self.played_at = now


class VoiceMouth:
    """The robot's and the operator's voices -> one mouth, for the "voice" layer of named commands.

    The robot's voice moves the mouth whenever it sounds (the robot speaks through its face). The
    operator's moves it only while no face drives the avatar: its share ramps to 1 over `blend_s`
    when the face is lost and back to 0 when it returns, so the mouth blends between tracking and
    voice instead of jumping. Where both sound, each weight is the larger of the two. A voice that
    has played nothing for `sound_timeout_s` has stopped (a stream cut mid-word does not hold the
    mouth open). Not thread-safe: the node calls it under its lock.
    """

    def __init__(self, max_backlog_s: float = 0.2, sound_timeout_s: float = 0.25, blend_s: float = 0.3,
                 tuning: Tuning | None = None) -> None:
        self.voices = {name: Voice(max_backlog_s, tuning) for name in (ROBOT, OPERATOR)}
        self.sound_timeout_s = float(sound_timeout_s)
        self.blend_s = float(blend_s)
        self.operator_share = 1.0  # no face until a status says otherwise
        self._share_target = 1.0
        self._updated: float | None = None
        self.driving: tuple[str, ...] = ()
        self.jaw = 0.0

    def hear(self, voice: str, chunk: Pcm, now: float) -> None:
        """A chunk of `voice` (ROBOT or OPERATOR) arrived at `now` (seconds, any monotonic clock)."""
        self.voices[voice].hear(chunk, now)

    def update(self, now: float, face: bool) -> dict[str, float] | None:
        """Analyse what arrived, follow the face's presence; the mouth's weights, or None when it is
        closed (nothing to send)."""
        dt = 0.0 if self._updated is None else max(0.0, now - self._updated)
        self._updated = now
        target = self._share_target = 0.0 if face else 1.0
        step = dt / self.blend_s if self.blend_s > 0 else 1.0
        self.operator_share += max(-step, min(step, target - self.operator_share))
        mouth = dict.fromkeys(MOUTH_NAMES, 0.0)
        driving = []
        for name, v in self.voices.items():
            v.play(now)
            share = self.operator_share if name == OPERATOR else 1.0
            if now - v.played_at > self.sound_timeout_s or share <= 0.0:
                continue
            weights = v.estimator.weights
            if max(weights.values()) * share >= EPS:
                driving.append(name)
                mouth = {k: max(w, share * weights[k]) for k, w in mouth.items()}
        self.driving, self.jaw = tuple(driving), mouth["jawOpen"]
        return mouth if driving else None

    def idle(self, now: float) -> bool:
        """Nothing to play, nothing playing and the operator's share settled: update() gives None
        until a voice is heard again. (A share still blending needs its updates: a face that returns
        just after one would otherwise leave it part way, and the operator's next word would move a
        tracked face's mouth.)"""
        settled = self.operator_share == self._share_target
        return not self.driving and settled and all(
            v.backlog.seconds == 0.0 and now - v.played_at > self.sound_timeout_s
            for v in self.voices.values())
