"""Recordings: ROS 2 messages (CDR bytes) in MCAP files that `ros2 bag` and Foxglove open.

ROS-free: the nodes serialize with rclpy and hand the bytes here. Each channel carries its schema
the way rosbag2 writes it (encoding `ros2msg`, the .msg text of the type followed by every type it
uses, each after a `MSG: pkg/msg/Type` separator), so a recording decodes without the package.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from mcap.exceptions import McapError
from mcap.reader import make_reader
from mcap.writer import CompressionType, Writer

#: rosbag2's separator between the definitions of a type and of the types it uses.
SEPARATOR = "=" * 80

_PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
               "uint32", "int64", "uint64", "string", "wstring"}
_TYPE_NAME = re.compile(r"^([A-Za-z][\w]*)/(?:msg/)?([A-Z]\w*)$")
_SOURCE_MSG_DIR = Path(__file__).resolve().parent.parent / "msg"


class RecordingError(ValueError):
    """A recording cannot be written or read as asked: the message says what was wrong."""


@dataclass(frozen=True)
class RecordedMessage:
    """One message of a recording: its topic and type, CDR bytes and times (ns since the epoch)."""

    topic: str
    type_name: str
    data: bytes
    log_time_ns: int
    publish_time_ns: int
    sequence: int


@dataclass(frozen=True)
class OfferedQos:
    """One publisher's QoS, as rosbag2 (Jazzy, bag format 9) stores it in a channel's
    `offered_qos_profiles` metadata: policy names as rmw spells them, durations as sec/nsec, so
    `ros2 bag play` republishes with the QoS the topic had. Durations are ns; 0 is unspecified."""

    reliability: str  # reliable | best_effort
    durability: str  # volatile | transient_local
    history: str = "keep_last"
    depth: int = 0
    deadline_ns: int = 0
    lifespan_ns: int = 0
    liveliness: str = "automatic"
    liveliness_lease_duration_ns: int = 0
    avoid_ros_namespace_conventions: bool = False


_DURATIONS = ("deadline", "lifespan", "liveliness_lease_duration")


def qos_yaml(profiles: Iterable[OfferedQos]) -> str:
    """The `offered_qos_profiles` text of a channel: a YAML list, one entry per publisher."""
    entries = []
    for q in profiles:
        entry = {"history": q.history, "depth": q.depth, "reliability": q.reliability,
                 "durability": q.durability, "liveliness": q.liveliness,
                 "avoid_ros_namespace_conventions": q.avoid_ros_namespace_conventions}
        for name in _DURATIONS:
            sec, nsec = divmod(getattr(q, f"{name}_ns"), 1_000_000_000)
            entry[name] = {"sec": sec, "nsec": nsec}
        entries.append(entry)
    return yaml.safe_dump(entries, sort_keys=False)


def parse_qos_yaml(text: str) -> list[OfferedQos]:
    """The profiles of an `offered_qos_profiles` text; raises RecordingError when it is not one."""
    try:
        entries = yaml.safe_load(text) or []
        return [OfferedQos(reliability=str(e["reliability"]), durability=str(e["durability"]),
                           history=str(e["history"]), depth=int(e["depth"]),
                           liveliness=str(e["liveliness"]),
                           avoid_ros_namespace_conventions=bool(e["avoid_ros_namespace_conventions"]),
                           **{f"{n}_ns": int(e[n]["sec"]) * 1_000_000_000 + int(e[n]["nsec"])
                              for n in _DURATIONS})
                for e in entries]
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise RecordingError(f"offered_qos_profiles is not a rosbag2 QoS list: {exc}") from exc


def normalize_type(type_name: str) -> str:
    """`pkg/Type` or `pkg/msg/Type` -> `pkg/msg/Type`; raises RecordingError for anything else."""
    match = _TYPE_NAME.match(type_name)
    if not match:
        raise RecordingError(f"message type {type_name!r} is not of the form pkg/msg/Type or pkg/Type")
    return f"{match.group(1)}/msg/{match.group(2)}"


def _search_dirs() -> list[Path]:
    prefixes = [p for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    return [Path(p) / "share" for p in [*prefixes, sys.prefix]]


def _msg_file(type_name: str) -> Path:
    pkg, _, name = normalize_type(type_name).split("/")
    candidates = [d / pkg / "msg" / f"{name}.msg" for d in _search_dirs()]
    if pkg == "gaga_ros":
        candidates.insert(0, _SOURCE_MSG_DIR / f"{name}.msg")
    for path in candidates:
        if path.is_file():
            return path
    raise RecordingError(f"no definition of {type_name}: looked for {pkg}/msg/{name}.msg in the source "
                         f"msg/ folder and in share/ of AMENT_PREFIX_PATH and {sys.prefix}")


def _field_types(text: str, pkg: str) -> list[str]:
    """The non-primitive types a .msg text uses, as pkg/msg/Type, in order of first use."""
    found: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        base = re.split(r"[\[<]", line.split()[0], maxsplit=1)[0]
        if base in _PRIMITIVES:
            continue
        full = normalize_type(base if "/" in base else f"{pkg}/{base}")
        if full not in found:
            found.append(full)
    return found


def message_definition(type_name: str) -> str:
    """The full definition text of a message type as rosbag2 stores it (`ros2msg` encoding)."""
    top = normalize_type(type_name)
    parts = [_msg_file(top).read_text()]
    seen = {top}
    queue = _field_types(parts[0], top.split("/")[0])
    while queue:
        dep = queue.pop(0)
        if dep in seen:
            continue
        seen.add(dep)
        text = _msg_file(dep).read_text()
        parts.append(f"{SEPARATOR}\nMSG: {dep}\n{text}")
        queue.extend(_field_types(text, dep.split("/")[0]))
    return "\n".join(p.rstrip("\n") for p in parts) + "\n"


class Recorder:
    """Writes CDR messages to an MCAP file, one channel per topic (ros2 profile, zstd chunks)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise RecordingError(f"recording path {self.path} is a folder: give a file name (*.mcap)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb")  # closed in close()
        self._writer = Writer(self._file, compression=CompressionType.ZSTD)
        self._writer.start(profile="ros2", library="gaga_ros")
        self._channels: dict[str, int] = {}
        self._schemas: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self._closed = False

    def add_topic(self, topic: str, type_name: str, definition: str | None = None,
                  offered_qos: Iterable[OfferedQos] = ()) -> None:
        """Declare a topic and its type (the definition is looked up unless given) with the QoS its
        publishers offer."""
        if topic in self._channels:
            return
        full = normalize_type(type_name)
        if full not in self._schemas:
            text = definition if definition is not None else message_definition(full)
            self._schemas[full] = self._writer.register_schema(full, "ros2msg", text.encode())
        offered = list(offered_qos)
        metadata = {"offered_qos_profiles": qos_yaml(offered)} if offered else {}
        self._channels[topic] = self._writer.register_channel(topic, "cdr", self._schemas[full], metadata)
        self.counts[topic] = 0

    def write(self, topic: str, data: bytes, log_time_ns: int, publish_time_ns: int | None = None) -> None:
        """Append one serialized message received at `log_time_ns` on a declared topic."""
        if topic not in self._channels:
            raise RecordingError(f"topic {topic!r} was not added to the recording; added: "
                                 f"{sorted(self._channels)}")
        self._writer.add_message(self._channels[topic], log_time=log_time_ns, data=bytes(data),
                                 publish_time=log_time_ns if publish_time_ns is None else publish_time_ns,
                                 sequence=self.counts[topic])
        self.counts[topic] += 1

    def close(self) -> None:
        """Write the summary (so readers can seek) and close the file."""
        if not self._closed:
            self._closed = True
            self._writer.finish()
            self._file.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: str | Path):
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecordingError(f"recording {path} does not exist")
    return path.open("rb")


def _summary(path: str | Path):
    with _open(path) as f:
        try:
            summary = make_reader(f).get_summary()
        except (McapError, ValueError, EOFError) as exc:
            raise RecordingError(f"{path} is not a readable MCAP file: {exc}") from exc
    if summary is None:
        raise RecordingError(f"{path} has no MCAP summary (was the recording closed?)")
    return summary


def topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """Topic -> (message type, message count) of a recording, from its summary."""
    summary = _summary(path)
    counts = summary.statistics.channel_message_counts if summary.statistics else {}
    return {ch.topic: (summary.schemas[ch.schema_id].name, counts.get(cid, 0))
            for cid, ch in summary.channels.items()}


def offered_qos(path: str | Path) -> dict[str, list[OfferedQos]]:
    """Topic -> the QoS its publishers offered when recorded (empty when the recording has none)."""
    summary = _summary(path)
    return {ch.topic: parse_qos_yaml(ch.metadata["offered_qos_profiles"])
            if "offered_qos_profiles" in ch.metadata else [] for ch in summary.channels.values()}


def read(path: str | Path, only: Iterable[str] | None = None) -> Iterator[RecordedMessage]:
    """The CDR messages of a recording in log-time order, optionally only some topics."""
    with _open(path) as f:
        try:
            reader = make_reader(f)
            for schema, channel, message in reader.iter_messages(
                    topics=list(only) if only is not None else None, log_time_order=True):
                if channel.message_encoding != "cdr" or schema is None or schema.encoding != "ros2msg":
                    raise RecordingError(f"{path}: topic {channel.topic} is {channel.message_encoding} "
                                         "without a ros2msg schema; only ROS 2 (CDR) recordings replay")
                yield RecordedMessage(channel.topic, schema.name, message.data, message.log_time,
                                      message.publish_time, message.sequence)
        except (McapError, EOFError) as exc:
            raise RecordingError(f"{path} is not a readable MCAP file: {exc}") from exc


def schedule(log_times_ns: list[int], rate: float = 1.0) -> list[float]:
    """Seconds after the start at which to replay messages logged at these times, `rate` x faster."""
    if not rate > 0:
        raise RecordingError(f"replay rate must be > 0 (1 = original timing), got {rate}")
    if not log_times_ns:
        return []
    t0 = log_times_ns[0]
    return [(t - t0) * 1e-9 / rate for t in log_times_ns]
