"""Bag node: record avatar topics to MCAP (mode record) or drive the avatar from one (mode replay).

Record subscribes raw (no deserialization, so 30 Hz images cost a copy) with QoS matched to the
publishers and stores what they offered in each channel as rosbag2 does (`offered_qos_profiles`), so
`ros2 bag play` and this node's replay republish with it; log times are the node clock's (/clock's
under use_sim_time). Replay publishes each message at its recorded log time, relative to the first
(times `rate`), with fresh header stamps by default so latency tracing downstream still measures
this run; `restamp: false` keeps the recorded stamps; `clock_hz` publishes the recording's time on
/clock for nodes started with use_sim_time:=true.

Record never overwrites a file (an existing `path` makes it write `name-N.mcap` beside it) and writes
a chunk at least every record.CHUNK_S, so a killed recorder loses about that much; replay reads such
an unclosed recording up to its last complete chunk and says so.
"""

from __future__ import annotations

import importlib
import threading
import time
import warnings
from typing import Any

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rosgraph_msgs.msg import Clock

from gaga_ros import record
from gaga_ros.errors import InputError
from gaga_ros.nodes import names, qos, stamps
from gaga_ros.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.parameters import Param, declare

MODES = ("record", "replay")
PARAMS = (
    Param("mode", "record", "record: write `topics` to `path`; replay: publish `path` at its timing."),
    Param("path", "out/avatar.mcap", "MCAP file to replay, or to write: an existing file is never "
          "overwritten, the recording then goes to the first free name-N.mcap beside it."),
    Param("topics", [names.EXPRESSION, names.IMAGE],
          "Topics to record (any type, found on the graph); replay: the recorded topics to publish."),
    Param("compressed", False, "Record /avatar/image/compressed too (makes the render node encode JPEG)."),
    Param("max_seconds", 600.0, "Record: stop writing after this long (bounds the file).", low=1.0,
          high=86400.0),
    Param("rate", 1.0, "Replay: speed factor (2 = twice as fast).", low=0.01, high=100.0),
    Param("loop", False, "Replay: start over at the end."),
    Param("restamp", True, "Replay: set header stamps to the publish time (false: keep recorded ones)."),
    Param("clock_hz", 0.0, "Replay: publish /clock with the recording's time at this rate (0: off), "
          "for nodes started with use_sim_time:=true (ros2 bag play --clock).", low=0.0, high=1000.0),
    Param("wait_for_subscribers", 0, "Replay: wait until this many subscribers are matched on the "
          "replayed topics before starting (0: start at once).", low=0, high=1000),
)


def message_class(type_name: str):
    """The Python class of `pkg/msg/Type`, imported from its generated package."""
    pkg, _, name = record.normalize_type(type_name).split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise record.RecordingError(f"message type {type_name} is not installed here: {exc}") from exc


def _offered(profile: QoSProfile) -> record.OfferedQos:
    """rclpy's view of a publisher's QoS in the recording's (rosbag2's) terms."""
    return record.OfferedQos(
        reliability=profile.reliability.name.lower(), durability=profile.durability.name.lower(),
        history=profile.history.name.lower(), depth=int(profile.depth),
        deadline_ns=profile.deadline.nanoseconds, lifespan_ns=profile.lifespan.nanoseconds,
        liveliness=profile.liveliness.name.lower(),
        liveliness_lease_duration_ns=profile.liveliness_lease_duration.nanoseconds,
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions))


def replay_qos(offered: list[record.OfferedQos], fallback: QoSProfile) -> QoSProfile:
    """The QoS to republish a topic with: rosbag2's rule (reliable / transient-local only when every
    recorded publisher offered it), the deepest recorded queue (discovery reports none: then the
    fallback's); `fallback` alone for recordings without offers."""
    if not offered:
        return fallback
    return QoSProfile(
        depth=max(q.depth for q in offered) or fallback.depth,
        reliability=ReliabilityPolicy.RELIABLE if all(q.reliability == "reliable" for q in offered)
        else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if all(q.durability == "transient_local"
                                                           for q in offered)
        else DurabilityPolicy.VOLATILE)


def _type_qos(cls) -> QoSProfile:
    """This package's QoS for a message type: for recordings that carry no offered QoS."""
    return qos.FRAMES if cls.__name__ in ("Image", "CompressedImage") else qos.EXPRESSIONS


class BagNode(GuardedNode):
    """Records topics to MCAP or replays an MCAP recording, by the `mode` parameter."""

    def __init__(self) -> None:
        super().__init__("gaga_bag")
        self.p = declare(self, PARAMS)
        if self.p["mode"] not in MODES:
            raise InputError(f"mode {self.p['mode']!r} is not one of {', '.join(MODES)}")
        self.meter = RateMeter()
        self.state = "starting"
        self.error = ""
        self.recorder: record.Recorder | None = None
        self.path = self.p["path"]  # record: the file actually written
        self.worker: threading.Thread | None = None
        self.stopping = threading.Event()
        if self.p["mode"] == "record":
            self._start_recording()
        else:
            self._start_replay()
        self.diagnostics = Diagnostics(self, lambda: (
            ERROR if self.error else OK if self.state != "waiting" else WARN,
            self.error or f"{self.p['mode']} {self.path}: {self.state}",
            {"messages": self.meter.count, "message_rate": self.meter.rate}))

    # -- record ---------------------------------------------------------------------------------
    def _start_recording(self) -> None:
        wanted = self.p["topics"] + ([names.IMAGE_COMPRESSED] if self.p["compressed"] else [])
        self.pending = list(dict.fromkeys(self.resolve_topic_name(t) for t in wanted))
        self.recorder = record.Recorder(self.p["path"])
        self.path = str(self.recorder.path)
        self.get_logger().info(self.recorder.new.describe())
        self.lock = threading.Lock()
        self.t_first: int | None = None
        self.subs: list[Any] = []  # rclpy subscriptions, kept alive
        self.state = "waiting"
        self._discover()
        self.discovery = self.create_timer(0.2, self._discover)
        # quiet topics bring no write() that would write out the chunk in progress
        self.flusher = self.create_timer(record.CHUNK_S / 2, self._flush)
        self.get_logger().info(f"recording {', '.join(self.pending)} to {self.path}")

    def _flush(self) -> None:
        with self.lock:
            if self.recorder is not None:
                self.recorder.flush(record.CHUNK_S)

    def _discover(self) -> None:
        """Subscribe to each wanted topic once a publisher shows its type (and QoS) on the graph."""
        types = dict(self.get_topic_names_and_types())
        for topic in list(self.pending):
            if topic not in types or not self.get_publishers_info_by_topic(topic):
                continue
            type_name = types[topic][0]
            offered = [_offered(i.qos_profile) for i in self.get_publishers_info_by_topic(topic)]
            reliable = all(q.reliability == "reliable" for q in offered)
            profile = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE if reliable
                                 else ReliabilityPolicy.BEST_EFFORT)
            with self.lock:
                assert self.recorder is not None  # recording mode: made before discovery starts
                self.recorder.add_topic(topic, type_name, offered_qos=offered)
            self.subs.append(self.create_subscription(
                message_class(type_name), topic, lambda data, t=topic: self._on_message(t, data), profile,
                raw=True))
            self.pending.remove(topic)
            self.state = f"recording; no publisher yet on {', '.join(self.pending)}" if self.pending \
                else "recording"
            kind = "reliable" if reliable else "best effort"
            self.get_logger().info(f"recording {topic} ({type_name}, {kind})")

    def _on_message(self, topic: str, data: bytes) -> None:
        now = self.get_clock().now().nanoseconds  # ROS time: /clock's under use_sim_time, as rosbag2
        with self.lock:
            if self.recorder is None:
                return
            self.t_first = now if self.t_first is None else self.t_first
            if now - self.t_first > self.p["max_seconds"] * 1e9:
                self.state = "full (max_seconds reached)"
                return
            self.recorder.write(topic, data, now)
        self.meter.tick()

    # -- replay ---------------------------------------------------------------------------------
    def _start_replay(self) -> None:
        wanted = {self.resolve_topic_name(t) for t in self.p["topics"]}
        with warnings.catch_warnings(record=True) as caught:  # to the node's log, once
            warnings.simplefilter("always", record.UnclosedRecordingWarning)
            found = record.topics(self.p["path"])
            recorded_qos = record.offered_qos(self.p["path"])
            self.replayed = {t: v[0] for t, v in found.items() if t in wanted} or {
                t: v[0] for t, v in found.items()}
            self.messages = list(record.read(self.p["path"], only=self.replayed))
        for message in dict.fromkeys(str(w.message) for w in caught):
            self.get_logger().warning(message)
        self.classes = {t: message_class(ty) for t, ty in self.replayed.items()}
        self.pubs = {t: self.create_publisher(cls, t, replay_qos(recorded_qos.get(t, []), _type_qos(cls)))
                     for t, cls in self.classes.items()}
        if not self.messages:
            raise record.RecordingError(f"{self.p['path']} holds no messages on {sorted(self.replayed)}")
        self.offsets = record.schedule([m.log_time_ns for m in self.messages], self.p["rate"])
        self.clock_pub = (self.create_publisher(Clock, names.CLOCK, qos.CLOCK) if self.p["clock_hz"] > 0
                          else None)
        self.get_logger().info(f"replaying {len(self.messages)} messages on {sorted(self.replayed)} "
                               f"({self.offsets[-1]:.1f} s at rate {self.p['rate']})")
        self.worker = self.guard.worker("replay", self._replay)

    def _subscribers(self) -> int:
        return sum(pub.get_subscription_count() for pub in self.pubs.values())

    def _replay(self) -> None:
        self.state = "waiting"
        while self._subscribers() < self.p["wait_for_subscribers"]:
            if self.stopping.wait(0.05):
                return
        while not self.stopping.is_set():
            self.state = "replaying"
            start = time.monotonic()
            for msg, offset in zip(self.messages, self.offsets, strict=True):
                if self._wait_until(start, offset):
                    return
                self._publish(msg)
            if not self.p["loop"]:
                break
            # loop: keep the recorded gap between the end and the start, at least one frame's worth
            gap = self.offsets[-1] / max(1, len(self.offsets) - 1)
            if self.stopping.wait(gap):
                return
        self.state = "finished"
        self.get_logger().info(f"replay of {self.p['path']} finished")

    def _wait_until(self, start: float, offset: float) -> bool:
        """Sleep until `offset` s after `start` (publishing /clock meanwhile); True when stopping."""
        period = 1.0 / self.p["clock_hz"] if self.clock_pub is not None else float("inf")
        while True:
            elapsed = time.monotonic() - start
            if self.clock_pub is not None:  # the recording's time that corresponds to now
                bag_ns = self.messages[0].log_time_ns + int(elapsed * self.p["rate"] * 1e9)
                self.clock_pub.publish(Clock(clock=stamps.from_ns(bag_ns)))
            remaining = offset - elapsed
            if remaining <= 0:
                return self.stopping.is_set()
            if self.stopping.wait(min(remaining, period)):
                return True

    def _publish(self, msg: record.RecordedMessage) -> None:
        pub = self.pubs[msg.topic]
        if self.p["restamp"]:
            obj = deserialize_message(msg.data, self.classes[msg.topic])
            if hasattr(obj, "header"):
                obj.header.stamp = self.get_clock().now().to_msg()
            pub.publish(obj)
        else:
            pub.publish(msg.data)
        self.meter.tick()

    def close(self) -> None:
        self.stopping.set()
        if self.worker is not None:
            self.worker.join(timeout=2)
        if self.recorder is not None:
            with self.lock:
                self.recorder.close()
                counts = self.recorder.counts
                self.recorder = None
            self.get_logger().info(f"wrote {sum(counts.values())} messages to {self.path}: {counts}")


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(BagNode, args)


if __name__ == "__main__":
    main()
