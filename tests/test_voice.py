"""The mouth follows the voice: the estimator on real sound from the shared clips, the rules that
choose which voice moves the mouth, and the voice node over real DDS."""

from __future__ import annotations

import array
import math
import threading
import time

import av
import numpy as np
import pytest
from conftest import wait_for

from gaga_ros.audio import AudioError, Pcm, from_frame, pcm
from gaga_ros.voice import (
    EPS,
    JITTER_S,
    LEAD_S,
    MOUTH_NAMES,
    OPERATOR,
    ROBOT,
    Backlog,
    MouthEstimator,
    VoiceMouth,
)

CHUNK_S = 0.02  # what a live stream sends


def clip_sound(path) -> Pcm:
    """The clip's whole audio track as it was recorded (44.1 kHz stereo for the shared clips)."""
    with av.open(str(path)) as c:
        parts = [from_frame(f) for f in c.decode(audio=0)]
    return Pcm(np.concatenate([p.samples for p in parts]), parts[0].sample_rate)


def cut(sound: Pcm, start_s: float, end_s: float) -> Pcm:
    r = sound.sample_rate
    return Pcm(np.ascontiguousarray(sound.samples[int(start_s * r):int(end_s * r)]), r)


def chunks(sound: Pcm, chunk_s: float = CHUNK_S):
    n = int(sound.sample_rate * chunk_s)
    for i in range(0, sound.frames - n + 1, n):
        yield Pcm(np.ascontiguousarray(sound.samples[i:i + n]), sound.sample_rate)


def convert(sound: Pcm, rate: int, channels: int) -> Pcm:
    """The same sound at another rate and channel count (libswresample, in one go)."""
    resampler = av.AudioResampler(format="s16", layout="mono" if channels == 1 else "stereo", rate=rate)
    frame = av.AudioFrame.from_ndarray(sound.samples.reshape(1, -1), format="s16",
                                       layout="mono" if sound.channels == 1 else "stereo")
    frame.sample_rate = sound.sample_rate
    out = [from_frame(f).samples for f in [*resampler.resample(frame), *resampler.resample(None)]]
    return Pcm(np.concatenate(out), rate)


def trace(estimator: MouthEstimator, sound: Pcm) -> list[dict[str, float]]:
    out = []
    for chunk in chunks(sound):
        estimator.feed(chunk)
        out.append(estimator.weights)
    return out


@pytest.fixture(scope="module")
def speech(media_dir) -> Pcm:
    """2.7 s of the woman's voice in expressive.mp4 (syllables, pauses, loud and soft)."""
    return cut(clip_sound(media_dir / "expressive.mp4"), 9.3, 12.0)


@pytest.fixture(scope="module")
def room(media_dir) -> Pcm:
    """talking_glasses.mp4: 2.2 s of a quiet room (about -65 dBFS), then a lip sound at 2.23 s."""
    return cut(clip_sound(media_dir / "talking_glasses.mp4"), 0.0, 2.5)


# ---- the estimator ---------------------------------------------------------------------------------

def test_speech_opens_the_mouth_and_silence_closes_it(speech):
    est = MouthEstimator()
    weights = trace(est, speech)
    jaw = np.array([w["jawOpen"] for w in weights])
    assert jaw.max() > 0.2 and jaw.std() > 0.04  # opens, and opens and closes with the syllables
    assert (jaw > 0.05).mean() > 0.5 and (jaw < 0.5 * jaw.max()).mean() > 0.1
    assert all(set(w) == set(MOUTH_NAMES) and all(0.0 <= v <= 1.0 for v in w.values()) for w in weights)
    assert max(w["mouthFunnel"] + w["mouthPucker"] for w in weights) > 0.05  # some rounded sounds
    silence = Pcm(np.zeros((int(0.5 * speech.sample_rate), 2), np.int16), speech.sample_rate)
    after = trace(est, silence)
    assert max(after[-1].values()) < EPS and est.silent
    assert after[12]["jawOpen"] < 0.05  # closed within 0.25 s


def test_a_quiet_room_keeps_the_mouth_closed_and_a_lip_sound_opens_it(room):
    est = MouthEstimator()
    quiet = trace(est, cut(room, 0.0, 2.2))
    assert max(max(w.values()) for w in quiet) < EPS  # the floor is the room, whatever its level
    sound = trace(est, cut(room, 2.2, 2.5))
    assert max(w["jawOpen"] for w in sound) > 0.1


def test_any_rate_and_channel_count_reads_alike(speech):
    """An 8 kHz mono and a 48 kHz stereo copy of the same voice move the mouth alike."""
    low = np.array([w["jawOpen"] for w in trace(MouthEstimator(), convert(speech, 8000, 1))])
    high = np.array([w["jawOpen"] for w in trace(MouthEstimator(), convert(speech, 48000, 2))])
    n = min(len(low), len(high))
    low, high = low[:n], high[:n]
    assert np.corrcoef(low, high)[0, 1] > 0.95
    assert np.abs(low - high).mean() < 0.03 and abs(low.max() - high.max()) < 0.06


@pytest.mark.parametrize("kind", ["full-scale noise", "clipped square", "extreme alternation", "dc",
                                  "one-sample chunks"])
def test_garbage_sound_gives_finite_bounded_weights(kind):
    rng = np.random.default_rng(0)
    rate = 16000
    if kind == "full-scale noise":
        data = rng.integers(-32768, 32768, (rate, 2))
    elif kind == "clipped square":
        data = np.where(np.sin(np.arange(rate) * 2 * np.pi * 220 / rate) > 0, 32767, -32768)[:, None]
    elif kind == "extreme alternation":
        data = np.tile([[32767], [-32768]], (rate // 2, 1))
    elif kind == "dc":
        data = np.full((rate, 1), -32768)
    else:
        data = rng.integers(-32768, 32768, (2000, 1))
    sound = Pcm(data.astype(np.int16), rate)
    est = MouthEstimator()
    pieces = (Pcm(sound.samples[i:i + 1], rate) for i in range(sound.frames)) if kind == "one-sample chunks" \
        else chunks(sound)
    for chunk in pieces:
        est.feed(chunk)
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in est.weights.values())


@pytest.mark.parametrize("args, words", [
    ((np.zeros(320, np.int16), 96000, 1), "accepted is 8000 to 48000"),
    ((np.zeros(320, np.int16), 0, 1), "sample_rate 0"),
    ((np.zeros(321, np.int16), 16000, 2), "do not split into 2"),
    ((np.zeros(320, np.int16), 16000, 3), "channels 3"),
    ((np.zeros(320, np.float32), 16000, 1), "int16"),
    ((np.zeros(0, np.int16), 16000, 1), "empty"),
])
def test_bad_chunks_raise_audio_error(args, words):
    with pytest.raises(AudioError, match=words) as err:
        pcm(*args)
    assert isinstance(err.value, ValueError)  # node guards refuse and count ValueErrors


# ---- which voice moves the mouth ---------------------------------------------------------------------

def test_a_flood_keeps_only_the_newest_sound():
    backlog = Backlog(0.2)
    for i in range(50):  # 1 s of 20 ms chunks at once
        backlog.push(Pcm(np.full((320, 1), i, np.int16), 16000))
    assert backlog.seconds == pytest.approx(0.2) and backlog.dropped_chunks == 40
    assert backlog.dropped_s == pytest.approx(0.8)
    kept = backlog.take(0.05)  # cut at a sample: two chunks and half of the third
    assert [c.frames for c in kept] == [320, 320, 160] and int(kept[0].samples[0, 0]) == 40
    assert backlog.seconds == pytest.approx(0.15)
    assert [int(c.samples[0, 0]) for c in backlog.take(1.0)] == list(range(42, 50)) and backlog.seconds == 0
    backlog.push(Pcm(np.arange(16000, dtype=np.int16)[:, None], 16000))  # one 1 s chunk: kept whole
    assert backlog.seconds == pytest.approx(1.0) and backlog.dropped_chunks == 40


def test_a_long_chunk_moves_the_mouth_as_it_plays(speech):
    """A 1 s chunk (a text-to-speech sentence sent as it starts) is analysed at real-time pace, so the
    mouth moves through its length; heard once, the voice drives for the whole second."""
    mouth = VoiceMouth()
    voice = mouth.voices[ROBOT]
    second = cut(speech, 0.5, 1.5)
    mouth.hear(ROBOT, second, 0.0)
    analysed, jaw = [], []
    for k in range(75):  # 60 updates a second for 1.25 s
        t = k / 60
        jaw.append((mouth.update(t, face=True) or {}).get("jawOpen", 0.0))
        analysed.append(voice.estimator.analysed_s)
    expected = np.minimum(np.arange(75) / 60 + LEAD_S, 1.0)
    assert np.abs(np.array(analysed) - expected).max() <= 0.011  # within a 10 ms hop
    jaw = np.array(jaw)
    assert jaw[:20].std() > 0.01 and jaw[20:40].std() > 0.01 and jaw[40:60].std() > 0.01  # moving all along


def test_a_fast_sender_never_builds_latency(speech):
    """Chunks of 20 ms every 19 ms (a sender whose clock runs 5 % fast): what waits stays bounded."""
    mouth = VoiceMouth()
    voice = mouth.voices[OPERATOR]
    pieces = list(chunks(speech))
    waiting = []
    for k in range(500):
        mouth.hear(OPERATOR, pieces[k % len(pieces)], k * 0.019)
        mouth.update(k * 0.019, face=False)
        waiting.append(voice.backlog.seconds)
    assert max(waiting) <= CHUNK_S + JITTER_S + 1e-6 and voice.backlog.dropped_chunks == 0
    assert voice.estimator.analysed_s == pytest.approx(500 * CHUNK_S - voice.backlog.seconds, abs=0.011)


def test_robot_always_operator_only_without_a_face(speech):
    mouth = VoiceMouth(blend_s=0.3)
    pieces = list(chunks(speech))
    t = 0.0

    def step(voice: str, face: bool) -> dict[str, float] | None:
        nonlocal t
        t += CHUNK_S
        mouth.hear(voice, pieces[int(t / CHUNK_S) % len(pieces)], t)
        return mouth.update(t, face)

    # No face until a status says so; then the operator's share ramps to 0 over blend_s.
    assert mouth.operator_share == 1.0
    for _ in range(16):  # the first update starts the clock
        t += CHUNK_S
        assert mouth.update(t, True) is None
    assert mouth.operator_share == 0.0
    # The face is tracked: the operator's voice leaves the mouth to it; the robot's moves it.
    assert all(step(OPERATOR, True) is None for _ in range(40))
    robot = [step(ROBOT, True) for _ in range(60)]
    assert max(w["jawOpen"] for w in robot if w) > 0.1 and mouth.driving in ((ROBOT,), ())
    # The face is lost: the operator's voice takes the mouth over blend_s.
    shares = []
    for _ in range(30):
        step(OPERATOR, False)
        shares.append(mouth.operator_share)
    assert shares[0] == pytest.approx(CHUNK_S / 0.3) and shares[-1] == 1.0
    assert np.all(np.diff(shares) >= 0)
    moved = [step(OPERATOR, False) for _ in range(60)]
    assert max(w["jawOpen"] for w in moved if w) > 0.1 and OPERATOR in mouth.driving
    # The face returns: the operator's share falls back to 0 over blend_s, then nothing is sent.
    back = [(step(OPERATOR, True), mouth.operator_share) for _ in range(30)]
    assert back[-1] == (None, 0.0) and back[0][1] == pytest.approx(1 - CHUNK_S / 0.3)
    # A voice that stops sending stops moving the mouth after sound_timeout_s.
    step(ROBOT, True)
    assert not mouth.idle(t)
    t += mouth.sound_timeout_s + 0.01
    assert mouth.update(t, True) is None and mouth.driving == ()
    assert mouth.idle(t)  # the node stops ticking until a voice is heard again
    # The face lost and back just after an update: not idle until the share has settled again.
    mouth.update(t + 1.0, False)
    assert mouth.operator_share == 1.0 and mouth.idle(t + 1.0)
    assert mouth.update(t + 1.02, True) is None
    assert 0.0 < mouth.operator_share < 1.0 and not mouth.idle(t + 1.02)
    assert mouth.update(t + 1.5, True) is None
    assert mouth.operator_share == 0.0 and mouth.idle(t + 1.5)


# ---- the node, over real DDS ---------------------------------------------------------------------------

class VoiceProbe:
    """Publishes sound and tracking status to the voice node and records its commands."""

    def __init__(self, obs) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        from gaga_ros.msg import AudioChunk, NamedExpression, TrackingStatus
        from gaga_ros.nodes import qos

        self.commands: list[tuple[float, NamedExpression]] = []
        self.reports: list[dict[str, str]] = []  # the voice node's diagnostics values, in order
        self.lock = threading.Lock()
        obs.node.create_subscription(NamedExpression, "/avatar/named_expression", self._on_command,
                                     qos.EXPRESSIONS)
        obs.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.audio = {v: obs.publisher(AudioChunk, f"/{v}/audio", qos.AUDIO) for v in (ROBOT, OPERATOR)}
        self.status = obs.publisher(TrackingStatus, "/tracking/status", qos.LATCHED)
        self.AudioChunk, self.TrackingStatus = AudioChunk, TrackingStatus

    def _on_command(self, msg) -> None:
        with self.lock:
            self.commands.append((time.monotonic(), msg))

    def _on_diag(self, msg) -> None:
        for status in msg.status:
            if status.name == "gaga_ros: voice":
                with self.lock:
                    self.reports.append({kv.key: kv.value for kv in status.values})

    def since(self, t: float) -> list:
        with self.lock:
            return [m for at, m in self.commands if at > t]

    def send(self, voice: str, sound: Pcm, chunk_s: float = CHUNK_S, paced: bool = True) -> None:
        """The sound as a stream of chunks, at its own pace (as a microphone sends it) unless not paced."""
        start = time.monotonic()
        for i, chunk in enumerate(chunks(sound, chunk_s)):
            self.publish(voice, chunk.samples, chunk.sample_rate)
            if paced:
                time.sleep(max(0.0, start + (i + 1) * chunk_s - time.monotonic()))

    def publish(self, voice: str, samples: np.ndarray, rate: int, channels: int | None = None) -> None:
        msg = self.AudioChunk(sample_rate=rate, channels=channels or samples.shape[1])
        msg.header.frame_id = f"{voice}_test"
        msg.data = array.array("h", np.ascontiguousarray(samples, np.int16).tobytes())
        self.audio[voice].publish(msg)

    def face(self, found: bool) -> None:
        self.status.publish(self.TrackingStatus(face_found=found, confidence=0.9 if found else 0.0,
                                                message="tracking" if found else "no face in view"))


@pytest.fixture(scope="module")
def voice_node(tmp_path_factory):
    from test_faults import Graph, Observer

    # status_timeout_s: this test publishes a status once, where tracking would repeat it every second.
    g = Graph(tmp_path_factory.mktemp("voice"), {"voice": {"status_timeout_s": 600.0}})
    obs = Observer()
    probe = VoiceProbe(obs)
    g.start_all()
    try:
        assert wait_for(lambda: obs.status("voice")[0] >= 0, 60, 0.1), g.log("voice")[-2000:]
        assert wait_for(lambda: all(p.get_subscription_count() for p in probe.audio.values()), 30, 0.05)
        yield g, obs, probe
    finally:
        g.stop()
        obs.close()


def diag(obs, key: str) -> str:
    return obs.status("voice")[2].get(key, "")


def silent(obs) -> bool:
    return diag(obs, "driving") == "none"


@pytest.mark.slow
def test_robot_speech_moves_the_mouth_on_the_voice_layer(voice_node, speech):
    g, obs, probe = voice_node
    t0 = time.monotonic()
    thread = threading.Thread(target=probe.send, args=(ROBOT, speech))
    thread.start()
    assert wait_for(lambda: len(probe.since(t0)) >= 20, 60, 0.05), g.log("voice")[-2000:]
    thread.join()
    got = probe.since(t0)
    assert all(m.layer == "voice" and set(m.names) == set(MOUTH_NAMES) for m in got)
    assert all(0.0 < m.hold_s <= 0.5 for m in got)
    jaw = [m.weights[list(m.names).index("jawOpen")] for m in got]
    assert max(jaw) > 0.2 and max(jaw) - min(jaw) > 0.1, jaw
    # The count comes with the node's next report, which may follow the last chunk by up to a period.
    n = len(list(chunks(speech)))
    assert wait_for(lambda: int(diag(obs, "robot_chunks") or 0) >= n // 2, 30, 0.05), obs.status("voice")
    # Sound stopped: the node sends nothing more (the render node fades the mouth out by itself):
    # its count of commands stays put over two reports a second apart. On a loaded machine chunks can
    # still arrive after a report of silence (a lull in delivery); then the sound had not stopped yet.
    deadline = time.monotonic() + 60
    while True:
        assert wait_for(lambda: silent(obs), 30, 0.05)
        seen = len(probe.reports)
        assert wait_for(lambda s=seen: len(probe.reports) >= s + 2, 30, 0.05)
        later = probe.reports[seen:]
        if later[0]["robot_chunks"] == later[-1]["robot_chunks"] or time.monotonic() > deadline:
            break
    assert later[0]["commands"] == later[-1]["commands"] and later[-1]["driving"] == "none", later
    assert wait_for(lambda: diag(obs, "ticking") == "False", 30, 0.05)  # silence costs no ticks


@pytest.mark.slow
def test_operator_voice_only_while_tracking_has_no_face(voice_node, speech):
    g, obs, probe = voice_node
    assert wait_for(lambda: silent(obs), 30, 0.05)
    probe.face(True)
    assert wait_for(lambda: diag(obs, "face") == "tracked" and float(diag(obs, "operator_share")) == 0.0,
                    30, 0.05), obs.status("voice")
    heard = int(diag(obs, "operator_chunks") or 0)
    t0 = time.monotonic()
    probe.send(OPERATOR, speech)
    n = len(list(chunks(speech)))
    # The node heard them (diagnostics come after the chunks) and sent nothing for them.
    assert wait_for(lambda: int(diag(obs, "operator_chunks")) >= heard + n // 2, 30, 0.05), \
        obs.status("voice")
    assert "face is tracked" in obs.status("voice")[1] or silent(obs)
    assert not probe.since(t0)
    probe.face(False)
    assert wait_for(lambda: diag(obs, "face") == "lost", 30, 0.05)
    t1 = time.monotonic()
    thread = threading.Thread(target=probe.send, args=(OPERATOR, speech))
    thread.start()
    assert wait_for(lambda: len(probe.since(t1)) >= 20, 60, 0.05), g.log("voice")[-2000:]
    thread.join()
    jaw = [m.weights[list(m.names).index("jawOpen")] for m in probe.since(t1)]
    assert max(jaw) > 0.2 and max(jaw) - min(jaw) > 0.1, jaw
    assert wait_for(lambda: silent(obs), 30, 0.05)


@pytest.mark.slow
def test_bad_chunks_are_refused_and_counted_and_a_flood_is_cut(voice_node, speech):
    g, obs, probe = voice_node
    probe.face(False)
    before = int(diag(obs, "robot_refused_chunks") or 0)
    probe.publish(ROBOT, np.zeros((320, 1), np.int16), 96000)  # a rate out of range
    probe.publish(ROBOT, np.zeros((321, 1), np.int16), 16000, channels=2)  # odd count for stereo
    assert wait_for(lambda: int(diag(obs, "robot_refused_chunks") or 0) >= before + 2, 30, 0.05), \
        obs.status("voice")
    assert "refused /robot/audio" in obs.status("voice")[1]
    assert "do not split into 2" in g.log("voice") or "accepted is 8000 to 48000" in g.log("voice")
    # A flood: seconds of sound in 100 ms chunks at once, until the node has had to drop some.
    dropped = int(diag(obs, "operator_dropped_chunks") or 0)
    t0 = time.monotonic()
    assert wait_for(lambda: (probe.send(OPERATOR, speech, chunk_s=0.1, paced=False) or True) and
                    int(diag(obs, "operator_dropped_chunks") or 0) > dropped, 60, 0.2), obs.status("voice")
    assert "dropped" in obs.status("voice")[1]
    assert probe.since(t0)  # the mouth moved meanwhile
    # It keeps working: real speech afterwards moves the mouth again.
    assert wait_for(lambda: silent(obs), 30, 0.05)
    t1 = time.monotonic()
    probe.send(ROBOT, speech)
    assert wait_for(lambda: len(probe.since(t1)) >= 10, 60, 0.05)
    assert g.procs["voice"].poll() is None
