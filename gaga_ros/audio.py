"""Sound in the telepresence loop: PCM chunks, their limits, and conversion between formats.

One shape for sound everywhere in the core: `Pcm`, signed 16-bit samples (frames x channels) with
their rate and the capture time of the first sample. The ROS message (msg/AudioChunk.msg) and the
WebRTC frames (PyAV `AudioFrame`) convert to and from it at the edges. Resampling is PyAV's
(libswresample), not ours: it is what aiortc itself uses, and a windowed-sinc resampler is not
worth writing again.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from gaga_ros.errors import InputError

#: Accepted sample rates (per channel) of incoming sound.
MIN_RATE, MAX_RATE = 8000, 48000
#: Accepted channel counts: mono and interleaved stereo.
CHANNELS = (1, 2)
#: The longest chunk accepted at once: longer ones are someone's whole file, not a stream.
MAX_CHUNK_S = 1.0
#: WebRTC's Opus clock: every sound sent to a browser is resampled to it.
WEBRTC_RATE = 48000


class AudioError(InputError):
    """Sound that cannot be used: the message says what was wrong and what is accepted."""


@dataclass(frozen=True)
class Pcm:
    """Signed 16-bit PCM: `samples` is (frames, channels) int16; `stamp_ns` the first sample's time."""

    samples: np.ndarray
    sample_rate: int
    stamp_ns: int = 0

    @property
    def channels(self) -> int:
        return self.samples.shape[1]

    @property
    def frames(self) -> int:
        return self.samples.shape[0]

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate

    def mono(self) -> np.ndarray:
        """float32 mono in [-1, 1] (channels averaged): what signal analysis reads."""
        return self.samples.astype(np.float32).mean(axis=1) / 32768.0


def pcm(data, sample_rate: int, channels: int, stamp_ns: int = 0) -> Pcm:
    """Checked PCM from interleaved int16 samples; raises AudioError saying what is accepted."""
    if not MIN_RATE <= int(sample_rate) <= MAX_RATE:
        raise AudioError(f"sample_rate {sample_rate}: accepted is {MIN_RATE} to {MAX_RATE} Hz")
    if int(channels) not in CHANNELS:
        raise AudioError(f"channels {channels}: accepted are 1 (mono) and 2 (interleaved stereo)")
    samples = np.asarray(data)
    if samples.dtype != np.int16:
        raise AudioError(f"samples of type {samples.dtype}: accepted is signed 16-bit PCM (int16)")
    if samples.ndim != 1 or samples.size % channels:
        raise AudioError(f"{samples.size} samples do not split into {channels} interleaved channels")
    if samples.size == 0:
        raise AudioError("empty chunk")
    if samples.size / channels > MAX_CHUNK_S * sample_rate:
        raise AudioError(f"chunk of {samples.size / channels / sample_rate:.2f} s: accepted is at most "
                         f"{MAX_CHUNK_S:g} s per chunk (send a stream of short chunks)")
    return Pcm(samples.reshape(-1, channels), int(sample_rate), int(stamp_ns))


def from_frame(frame: av.AudioFrame, stamp_ns: int = 0) -> Pcm:
    """PCM from a decoded PyAV audio frame (any sample format, packed or planar)."""
    if frame.format.name != "s16":
        frame = av.AudioResampler(format="s16", layout=frame.layout.name, rate=frame.sample_rate) \
            .resample(frame)[0]
    samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
    return Pcm(samples.astype(np.int16, copy=False), frame.sample_rate, stamp_ns)


def to_frame(chunk: Pcm) -> av.AudioFrame:
    """A packed s16 PyAV frame of the chunk (pts left for the sender to set)."""
    layout = "mono" if chunk.channels == 1 else "stereo"
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk.samples).reshape(1, -1), format="s16",
                                       layout=layout)
    frame.sample_rate = chunk.sample_rate
    return frame


class Resampler:
    """Any accepted PCM -> one rate and channel count; remade when the input format changes.

    Stateful (the filter keeps its tail between chunks), so use one per stream.
    """

    def __init__(self, rate: int = WEBRTC_RATE, channels: int = 1) -> None:
        self.rate, self.channels = int(rate), int(channels)
        self._key: tuple[int, int] | None = None
        self._resampler: av.AudioResampler | None = None

    def __call__(self, chunk: Pcm) -> Pcm:
        if (chunk.sample_rate, chunk.channels) == (self.rate, self.channels):
            return chunk
        key = (chunk.sample_rate, chunk.channels)
        if key != self._key:
            self._key = key
            self._resampler = av.AudioResampler(format="s16", layout="mono" if self.channels == 1
                                                else "stereo", rate=self.rate)
        assert self._resampler is not None  # made above for this key
        out = [from_frame(f) for f in self._resampler.resample(to_frame(chunk))]
        samples = np.concatenate([o.samples for o in out]) if out else np.zeros((0, self.channels),
                                                                                 np.int16)
        return Pcm(samples, self.rate, chunk.stamp_ns)
