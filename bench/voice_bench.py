"""The mouth follows the voice: audio-driven mouth opening against the mouth filmed with the sound.

For each clip, the sound track is streamed to gaga_ros.voice.MouthEstimator in 20 ms chunks, as a
microphone sends it; at each video frame's time the estimator has had every chunk that ended by then
and no more (no look-ahead), and its jawOpen is the audio-driven opening. The filmed opening is
mediapipe FaceMesh (gaga_ros.tracking.landmarks) on the same frame: the mean inner-lip gap along the
mouth (the nine pairs of gaga_ros.faces.mediapipe_mesh REGIONS["mouth_inner"] facing each other), with
the landmarks aligned to the canonical mesh by a similarity transform, which removes head pose and
face size. The figure is the Pearson correlation over time of the two, at lag 0 (what a live system
shows). Also reported: the best lag within +-LAGS frames (positive: the audio-driven mouth is late),
for information only, and the same correlation for the mouth as the render node shows it: the voice
node's core (gaga_ros.voice.VoiceMouth, the robot's voice) sending COMMAND_RATE commands a second, each
ramping over the interval since the previous one, through gaga_ros.named.FaceMixer, averaged over PHASES
of the node's ticks against the frames (min: the worst). "sounding" is the share of frames where the
audio opens the mouth at all.

    .venv/bin/python bench/voice_bench.py            # the three clips with sound
    .venv/bin/python bench/voice_bench.py --sweep    # and the tuning's sensitivity on the goal clip
    .venv/bin/python bench/voice_bench.py --node 20  # and the voice node's CPU share, as a process

Writes bench/results/voice.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
OUT = ROOT / "bench" / "results" / "voice.json"
sys.path.insert(0, str(ROOT / "bench"))

from record import write  # noqa: E402 - bench/ is not a package
from transfer_bench import pose_free  # noqa: E402

from gaga_ros.audio import Pcm, from_frame  # noqa: E402
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, REGIONS  # noqa: E402
from gaga_ros.named import FaceMixer, NamedCommand  # noqa: E402
from gaga_ros.tracking.landmarks import FaceLandmarker  # noqa: E402
from gaga_ros.voice import (  # noqa: E402
    COMMAND_HOLD_S,
    COMMAND_RATE,
    LAYER,
    OPERATOR,
    ROBOT,
    MouthEstimator,
    Smoother,
    Tuning,
    VoiceMouth,
)

CLIPS = ("talking_glasses.mp4", "head_turns.mp4", "expressive.mp4")
GOAL_CLIP, GOAL = "talking_glasses.mp4", 0.5
CHUNK_S = 0.02
#: Phases of the voice node's ticks against the camera's frames (fractions of a tick): the two
#: clocks are unrelated, so the mouth as shown is measured at each and averaged.
PHASES = (0.0, 0.25, 0.5, 0.75)
#: Lags searched for the best one, in video frames each way.
LAGS = 10
#: The inner-lip landmarks facing each other: the upper inner contour (without its corners) against
#: the lower one run backwards.
_INNER = REGIONS["mouth_inner"]
UPPER, LOWER = _INNER[1:10], _INNER[11:][::-1]
#: Tuning variants for --sweep: each setting moved well away from its default, one at a time.
SWEEP = {
    "speech band 100-8000 Hz": {"speech_band": (100.0, 8000.0)},
    "speech band 300-3000 Hz": {"speech_band": (300.0, 3000.0)},
    "gate 3 dB": {"gate_db": 3.0}, "gate 10 dB": {"gate_db": 10.0},
    "range 20 dB": {"range_db": 20.0}, "range 40 dB": {"range_db": 40.0},
    "jaw 10/40 ms": {"jaw": Smoother(0.01, 0.04)}, "jaw 40/150 ms": {"jaw": Smoother(0.04, 0.15)},
    "floor window 1 s": {"floor_window_s": 1.0}, "floor window 4 s": {"floor_window_s": 4.0},
    "silence -60 dBFS": {"silence_db": -60.0}, "silence -80 dBFS": {"silence_db": -80.0},
    "level smoothing 20 ms": {"level": Smoother(0.02, 0.02)},
}


def read_clip(path: Path) -> tuple[Pcm, np.ndarray, list[np.ndarray]]:
    """The clip's sound as recorded, its video frames' times (s) and the frames (RGB)."""
    with av.open(str(path)) as c:
        parts = [from_frame(f) for f in c.decode(audio=0)]
    with av.open(str(path)) as c:
        frames = [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    sound = Pcm(np.concatenate([p.samples for p in parts]), parts[0].sample_rate)
    return sound, np.array([t for t, _ in frames]), [f for _, f in frames]


def filmed_opening(frames: list[np.ndarray]) -> np.ndarray:
    """Mean inner-lip gap per frame in canonical face units (NaN where no face is found)."""
    out = np.full(len(frames), np.nan)
    with FaceLandmarker() as landmarker:
        for i, rgb in enumerate(frames):
            faces = landmarker.detect(rgb)
            if faces:
                pts = pose_free(faces[0].points, CANONICAL_VERTICES)
                out[i] = float(np.mean(pts[UPPER, 1] - pts[LOWER, 1]))
    return out


def chunk_list(sound: Pcm) -> list[Pcm]:
    n = int(round(CHUNK_S * sound.sample_rate))
    return [Pcm(np.ascontiguousarray(sound.samples[i:i + n]), sound.sample_rate)
            for i in range(0, sound.frames - n + 1, n)]


def audio_opening(sound: Pcm, times: np.ndarray, tuning: Tuning, phase: float = 0.0,
                  rate: float = COMMAND_RATE) -> dict[str, np.ndarray | float]:
    """jawOpen per frame as the estimator gives it, and as the render node's mixer shows it: each
    chunk heard by a VoiceMouth (the voice node's core) when it ends, the node's ticks at `rate`
    (`phase` of a tick after the first frame) sending commands to a FaceMixer; and the estimator's
    CPU time per second of sound."""
    chunks = chunk_list(sound)
    ends = (np.arange(len(chunks)) + 1) * CHUNK_S
    est, voices = MouthEstimator(tuning), VoiceMouth(tuning=tuning)
    clock = [0.0]
    mixer = FaceMixer(lambda: clock[0])
    ticks = np.arange(phase / rate, times[-1] + 1.0 / rate, 1.0 / rate)
    events = sorted([(t, 1, i) for i, t in enumerate(times)] + [(t, 0, -1) for t in ticks])
    raw, shown = np.zeros(len(times)), np.zeros(len(times))
    fed, cpu = 0, 0.0
    for t, kind, i in events:
        while fed < len(chunks) and ends[fed] <= t + 1e-9:
            start = time.process_time()
            est.feed(chunks[fed])
            cpu += time.process_time() - start
            voices.hear(ROBOT, chunks[fed], ends[fed])
            fed += 1
        if kind == 0:  # a voice node tick: a command on the voice layer, or none for a closed mouth
            clock[0] = t
            weights = voices.update(t, face=True)
            if weights is not None:
                mixer.command(NamedCommand.parse(weights, hold_s=COMMAND_HOLD_S, layer=LAYER))
        else:
            raw[i] = est.weights["jawOpen"]
            shown[i] = mixer.overlay(t).weights.get("jawOpen", 0.0)
    return {"raw": raw, "shown": shown, "cpu_per_s": cpu / max(fed * CHUNK_S, 1e-9)}


def correlation(audio: np.ndarray, film: np.ndarray, lag: int = 0) -> float:
    """Pearson r of audio[i + lag] against film[i] over frames with a face (lag > 0: audio late)."""
    a, f = (audio[lag:], film[:len(film) - lag]) if lag >= 0 else (audio[:lag], film[-lag:])
    ok = np.isfinite(f)
    a, f = a[ok], f[ok]
    if a.std() == 0 or f.std() == 0:
        return 0.0
    return float(np.corrcoef(a, f)[0, 1])


def lag_scan(audios: list[np.ndarray], film: np.ndarray, fps: float) -> dict[str, float]:
    """r at lag 0 and the best lag, of the mean over `audios` of the correlation at each lag."""
    rs = {lag: float(np.mean([correlation(a, film, lag) for a in audios])) for lag in range(-LAGS, LAGS + 1)}
    best = max(rs, key=rs.get)
    return {"r": rs[0], "best_r": rs[best], "best_lag_frames": best, "best_lag_ms": 1000.0 * best / fps,
            "r_min": min(correlation(a, film) for a in audios)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_cost(sound: Pcm, seconds: float) -> dict[str, float]:
    """The voice node as a process over DDS: its CPU share of one core while both voices stream
    sound in 20 ms chunks (50 a second each, the face lost so both are analysed), and while silent."""
    import random
    import tempfile
    import threading

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import wait_for
    from test_faults import Graph, Observer
    from test_voice import VoiceProbe

    from gaga_ros.graph import dds_environment

    os.environ.setdefault("ROS_DOMAIN_ID", str(random.randint(1, 101)))  # apart from other graphs
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.update(dds_environment(dict(os.environ)))
    graph = Graph(Path(tempfile.mkdtemp(prefix="voice_bench_")), {"voice": {}})
    obs = Observer()
    probe = VoiceProbe(obs)
    graph.start_all()
    try:
        pid = graph.pid("voice")
        if not wait_for(lambda: obs.status("voice")[0] >= 0 and
                        all(p.get_subscription_count() for p in probe.audio.values()), 60, 0.1):
            raise SystemExit(f"the voice node did not come up:\n{graph.log('voice')[-2000:]}")
        t0, c0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(seconds)
        idle = (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        loops = int(np.ceil(seconds / sound.duration_s))
        looped = Pcm(np.concatenate([sound.samples] * loops)[:int(seconds * sound.sample_rate)],
                     sound.sample_rate)
        sent = probe.since(0.0)
        t0, c0 = time.monotonic(), cpu_seconds(pid)
        threads = [threading.Thread(target=probe.send, args=(voice, looped)) for voice in (ROBOT, OPERATOR)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - t0
        busy = (cpu_seconds(pid) - c0) / elapsed
        commands = len(probe.since(0.0)) - len(sent)
    finally:
        graph.stop()
        obs.close()
    return {"busy_percent": 100.0 * busy, "idle_percent": 100.0 * idle, "seconds": elapsed,
            "commands_per_s": commands / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also each tuning variant on the goal clip")
    parser.add_argument("--node", type=float, default=0.0, metavar="S",
                        help="also the voice node's CPU share over S seconds of sound (and S of silence)")
    args = parser.parse_args()
    results, clips = {}, {}
    for name in CLIPS:
        sound, times, frames = read_clip(MEDIA / name)
        film = filmed_opening(frames)
        clips[name] = (sound, times, film)
        fps = (len(times) - 1) / (times[-1] - times[0])
        runs = [audio_opening(sound, times, Tuning(), phase) for phase in PHASES]
        audio = runs[0]
        results[name] = {
            "frames": len(times), "fps": fps, "faces": int(np.isfinite(film).sum()),
            "sound": f"{sound.sample_rate} Hz x {sound.channels}",
            "sounding": float((audio["raw"] > 0.05).mean()),
            "estimator": lag_scan([audio["raw"]], film, fps),
            "shown": lag_scan([run["shown"] for run in runs], film, fps),
            "cpu_percent_of_a_core": 100.0 * audio["cpu_per_s"],
        }
    print(f"{'clip':22s} {'frames':>6s} {'sounding':>8s} {'r lag 0':>8s} {'best r':>7s} {'at ms':>6s} "
          f"{'shown r':>8s} {'min':>6s} {'best':>6s} {'at ms':>6s} {'cpu %':>6s}")
    for name, r in results.items():
        e, s = r["estimator"], r["shown"]
        print(f"{name:22s} {r['frames']:6d} {r['sounding']:8.2f} {e['r']:8.3f} {e['best_r']:7.3f} "
              f"{e['best_lag_ms']:6.0f} {s['r']:8.3f} {s['r_min']:6.3f} {s['best_r']:6.3f} "
              f"{s['best_lag_ms']:6.0f} {r['cpu_percent_of_a_core']:6.2f}")
    goal = results[GOAL_CLIP]["estimator"]["r"]
    print(f"audio mouth correlation ({GOAL_CLIP}, lag 0): {goal:.3f} (goal >= {GOAL}: "
          f"{'met' if goal >= GOAL else 'NOT met'})")
    sweep = {}
    if args.sweep:
        sound, times, film = clips[GOAL_CLIP]
        for label, change in {"default": {}, **SWEEP}.items():
            raw = audio_opening(sound, times, replace(Tuning(), **change))["raw"]
            sweep[label] = correlation(raw, film)
            print(f"  {label:26s} r = {sweep[label]:.3f}")
    node = {}
    if args.node > 0:
        node = node_cost(clips["expressive.mp4"][0], args.node)
        print(f"voice node: {node['busy_percent']:.1f} % of a core with both voices sounding "
              f"({node['commands_per_s']:.0f} commands/s), {node['idle_percent']:.1f} % silent")
    write(OUT, {"clips": results, "goal_clip": GOAL_CLIP, "goal": GOAL, "audio_mouth_correlation": goal,
                "sweep": sweep, "node": node, "chunk_s": CHUNK_S, "command_rate": COMMAND_RATE,
                "hold_s": COMMAND_HOLD_S})


if __name__ == "__main__":
    main()
