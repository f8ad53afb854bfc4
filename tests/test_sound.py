"""Sound in the loop, without a browser: PCM checks and conversion (gaga_ros.audio) and the mixing bus
(gaga_ros.stream.sound) on a real asyncio clock."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gaga_ros import audio
from gaga_ros.stream import sound


def tone(rate: int, channels: int, seconds: float, freq: float = 440.0, amplitude: float = 0.5) -> audio.Pcm:
    t = np.arange(int(rate * seconds)) / rate
    mono = (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return audio.pcm(np.repeat(mono, channels), rate, channels)


@pytest.mark.parametrize("kwargs, words", [
    (dict(data=np.zeros(10, np.int16), sample_rate=100, channels=1), "8000 to 48000"),
    (dict(data=np.zeros(10, np.int16), sample_rate=16000, channels=3), r"1 \(mono\) and 2"),
    (dict(data=np.zeros(3, np.int16), sample_rate=16000, channels=2), "do not split"),
    (dict(data=np.zeros(10, np.float32), sample_rate=16000, channels=1), "int16"),
    (dict(data=np.zeros(0, np.int16), sample_rate=16000, channels=1), "empty"),
    (dict(data=np.zeros(20000, np.int16), sample_rate=8000, channels=2), "at most 1 s"),
])
def test_bad_pcm_is_refused_saying_what_is_accepted(kwargs, words):
    with pytest.raises(audio.AudioError, match=words):
        audio.pcm(**kwargs)


@pytest.mark.parametrize("rate, channels", [(8000, 1), (16000, 2), (44100, 2), (48000, 1)])
def test_any_accepted_format_resamples_to_the_same_sound(rate, channels):
    resample = audio.Resampler(48000, 1)
    whole = tone(rate, channels, 1.0).samples.reshape(-1)
    step = int(rate * 0.02) * channels
    chunks = [audio.pcm(whole[i:i + step], rate, channels) for i in range(0, whole.size, step)]
    out = np.concatenate([resample(c).samples[:, 0] for c in chunks])
    assert abs(out.size - 48000) < 500  # one second in, about one second out (the filter's tail aside)
    spectrum = np.abs(np.fft.rfft(out[2000:42000]))
    assert abs(np.argmax(spectrum) * 48000 / 40000 - 440) < 3  # the same pitch
    assert 0.3 < np.abs(out).max() / 32767 < 0.6  # and loudness


def run_bus(feed, seconds: float) -> tuple[list[np.ndarray], sound.SoundBus]:
    """Run a bus for `seconds` with one subscribed track; feed(bus, tick) pushes sound each 20 ms."""
    async def main():
        bus = sound.SoundBus("test")
        bus.start()
        track = bus.subscribe()
        frames, ptss = [], []

        async def reader():
            while True:
                frame = await track.recv()
                frames.append(frame.to_ndarray().reshape(-1))
                ptss.append(frame.pts)

        task = asyncio.ensure_future(reader())
        for tick in range(int(seconds / sound.FRAME_S)):
            feed(bus, tick)
            await asyncio.sleep(sound.FRAME_S)
        task.cancel()
        await bus.stop()
        assert all(b - a == sound.FRAME_SAMPLES for a, b in zip(ptss, ptss[1:], strict=False))
        return frames, bus

    return asyncio.run(main())


def test_sources_add_and_a_silent_one_stalls_nothing():
    a, b = tone(48000, 1, 0.02, 300, 0.2), tone(16000, 2, 0.02, 900, 0.2)

    def feed(bus, tick):
        bus.push("a", a)
        if tick < 10:  # b stops after 200 ms: the clock and a go on
            bus.push("b", b)

    frames, bus = run_bus(feed, 1.5)
    assert len(frames) > 40 and all(f.size == sound.FRAME_SAMPLES for f in frames)
    both, late = np.concatenate(frames[3:8]), np.concatenate(frames[-10:])
    spec = lambda x: np.abs(np.fft.rfft(x))  # noqa: E731
    freq = lambda s, f: s[int(f * s.size * 2 / 48000)]  # noqa: E731
    assert freq(spec(both), 900) > 0.3 * freq(spec(both), 300)  # mixed: both voices present
    assert freq(spec(late), 900) < 0.05 * freq(spec(late), 300)  # b gone, a still there
    assert np.abs(late).max() > 3000


def test_a_burst_is_cut_back_so_latency_does_not_stick():
    chunk = tone(48000, 1, 0.02)

    def feed(bus, tick):
        for _ in range(8 if tick == 5 else 1):  # one burst of 160 ms, then real time again
            bus.push("operator", chunk)

    _, bus = run_bus(feed, 1.0)
    source = bus._sources["operator"]
    assert source.skipped > 0  # the excess went at once
    assert source.buffered <= sound.CATCH_UP_S * 48000  # and what is left is a short queue
