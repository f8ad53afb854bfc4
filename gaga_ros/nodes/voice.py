"""Voice node: the robot's and the operator's sound -> the avatar's mouth, on the "voice" layer.

Subscribes robot/audio (the robot's text-to-speech or microphone: it always moves the mouth) and
operator/audio (the operator's microphone, from the bridge: it moves the mouth only while tracking has
no face, so the operator's face drives it whenever the camera sees one), and tracking/status. Publishes
NamedExpression commands on avatar/named_expression on the layer "voice" at `rate` while a voice moves
the mouth, each held `hold_s`, so the render node fades the mouth out by itself when they stop; a
closed mouth publishes nothing. The core is gaga_ros.voice (signal chain, latency, the rules).

A chunk that cannot be used (rate, channel count, odd sample count, too long) is refused by the guard:
logged, counted per topic, and reported on /diagnostics; the node goes on with the next.
"""

from __future__ import annotations

import threading
import time

from gaga_ros.audio import pcm
from gaga_ros.msg import AudioChunk, NamedExpression, TrackingStatus
from gaga_ros.named import NamedCommand
from gaga_ros.nodes import names, qos, stamps
from gaga_ros.nodes.diagnostics import OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.expression_msg import named_to_msg
from gaga_ros.nodes.guard import REASON_HOLD_S, GuardedNode
from gaga_ros.nodes.parameters import Param, declare
from gaga_ros.voice import COMMAND_HOLD_S, COMMAND_RATE, LAYER, OPERATOR, ROBOT, VoiceMouth

PARAMS = (
    Param("rate", COMMAND_RATE, "Mouth commands per second while a voice moves the mouth (the render node "
          "follows them one interval late).", low=5.0, high=120.0),
    Param("hold_s", COMMAND_HOLD_S, "Hold of each command: when commands stop (the sound stopped), the "
          "render node holds the mouth this long, then fades it out over 0.3 s.", low=0.05, high=2.0),
    Param("blend_s", 0.3, "The operator's voice takes the mouth over this long when tracking loses the "
          "face, and gives it back to tracking over this long when the face returns.", low=0.0, high=5.0),
    Param("max_backlog_s", 0.2, "Sound kept per voice while it waits to play; a flood drops the oldest "
          "chunks (counted in diagnostics) and keeps the newest whole, so the mouth never lags the newest "
          "sound by more.", low=0.02, high=2.0),
    Param("sound_timeout_s", 0.25, "A voice that has played nothing for this long has stopped: a stream "
          "cut mid-word does not hold the mouth open.", low=0.05, high=5.0),
    Param("status_timeout_s", 3.0, "A tracking status older than this counts as none (no face): the "
          "tracking node republishes it every second, so an older one means tracking is gone.",
          low=0.5, high=3600.0),
)

TOPICS = {ROBOT: names.ROBOT_AUDIO, OPERATOR: names.OPERATOR_AUDIO}


class VoiceNode(GuardedNode):
    """AudioChunk -> VoiceMouth -> NamedExpression on the voice layer."""

    executor_threads = 1  # its callbacks queue sound; the mouth is computed on a timer

    def __init__(self) -> None:
        super().__init__("voice")
        self.p = declare(self, PARAMS)
        self.lock = threading.Lock()
        self.mouth = VoiceMouth(self.p["max_backlog_s"], self.p["sound_timeout_s"], self.p["blend_s"])
        self.meters = {voice: RateMeter() for voice in TOPICS}
        self.status: TrackingStatus | None = None
        self.status_at = -float("inf")
        self.commands = 0
        self._dropped_seen, self._flood_at = 0, -float("inf")
        self.pub = self.create_publisher(NamedExpression, names.NAMED_EXPRESSION, qos.EXPRESSIONS)
        for voice, topic in TOPICS.items():
            self.create_subscription(AudioChunk, topic, lambda msg, v=voice: self._on_audio(v, msg),
                                     qos.AUDIO)
        self.create_subscription(TrackingStatus, names.TRACKING_STATUS, self._on_status, qos.LATCHED)
        self.timer = self.create_timer(1.0 / self.p["rate"], self._tick)  # runs while there is sound
        self.diagnostics = Diagnostics(self, self._report)

    def _on_audio(self, voice: str, msg: AudioChunk) -> None:
        chunk = pcm(msg.data, msg.sample_rate, msg.channels, stamps.to_ns(msg.header.stamp))  # AudioError
        with self.lock:
            self.mouth.hear(voice, chunk, time.monotonic())
            if self.timer.is_canceled():
                self.timer.reset()
        self.meters[voice].tick()

    def _on_status(self, msg: TrackingStatus) -> None:
        with self.lock:
            self.status, self.status_at = msg, time.monotonic()
            if self.timer.is_canceled():
                self.timer.reset()  # one tick brings the operator's share up to date

    def _face(self, now: float) -> bool:
        return self.status is not None and self.status.face_found and \
            now - self.status_at < self.p["status_timeout_s"]

    def _tick(self) -> None:
        with self.lock:
            now = time.monotonic()
            weights = self.mouth.update(now, self._face(now))
            if weights is None and self.mouth.idle(now):
                self.timer.cancel()  # silence costs no ticks; the next chunk starts them again
        if weights is None:
            return
        command = NamedCommand.parse(weights, hold_s=self.p["hold_s"], layer=LAYER)
        self.pub.publish(named_to_msg(command, self.get_clock().now().to_msg()))
        self.commands += 1

    def _report(self):
        with self.lock:
            now = time.monotonic()
            face = ("tracked" if self._face(now) else "no status" if self.status is None
                    else "lost" if not self.status.face_found else "status too old")
            voices = self.mouth.voices
            driving = "+".join(self.mouth.driving) or "none"
            values = {"driving": driving, "jaw_open": self.mouth.jaw, "face": face,
                      "operator_share": self.mouth.operator_share, "commands": self.commands,
                      "ticking": not self.timer.is_canceled()}
            dropped = 0
            for voice, topic in TOPICS.items():
                backlog = voices[voice].backlog
                meter = self.meters[voice]  # its window holds the last chunks however old they are
                values[f"{voice}_chunk_rate"] = meter.rate if now - voices[voice].heard_at < meter.window_s \
                    else 0.0
                values[f"{voice}_chunks"] = voices[voice].chunks
                values[f"{voice}_refused_chunks"] = self.guard.counts[self.resolve_topic_name(topic)]
                values[f"{voice}_dropped_chunks"] = backlog.dropped_chunks
                values[f"{voice}_dropped_s"] = backlog.dropped_s
                dropped += backlog.dropped_chunks
            if dropped != self._dropped_seen:
                self._dropped_seen, self._flood_at = dropped, now
            operator_heard = now - voices[OPERATOR].heard_at < self.p["sound_timeout_s"]
        if now - self._flood_at < REASON_HOLD_S:
            return WARN, (f"sound comes faster than it plays: dropped {dropped} chunks to keep the mouth "
                          f"within {self.p['max_backlog_s']:g} s of the newest sound"), values
        if driving == "none" and operator_heard and face == "tracked":
            return OK, "the face is tracked: the operator's voice leaves the mouth to it", values
        if driving == "none":
            return OK, "silent: the mouth is left to the other drivers", values
        return OK, f"the {driving} voice moves the mouth", values


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(VoiceNode, args)


if __name__ == "__main__":
    main()
