"""Recordings: ROS 2 messages (CDR bytes) in MCAP files that `ros2 bag` and Foxglove open.

ROS-free: the nodes serialize with rclpy and hand the bytes here. Each channel carries its schema
the way rosbag2 writes it (encoding `ros2msg`, the .msg text of the type followed by every type it
uses, each after a `MSG: pkg/msg/Type` separator), so a recording decodes without the package.

A recording never overwrites a file (`create_new_file`), and a recorder that is killed loses only the
chunk it was building, about `CHUNK_S`: the reading functions read a file that was never closed up to
its last complete record, with an `UnclosedRecordingWarning`.
"""

from __future__ import annotations

import io
import itertools
import mmap
import os
import re
import struct
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml
from mcap.exceptions import EndOfFile, McapError
from mcap.reader import make_reader
from mcap.records import Channel, Message, Schema
from mcap.stream_reader import CRCValidationError, StreamReader
from mcap.writer import MCAP0_MAGIC, CompressionType, Writer

from gaga_ros.errors import InputError

#: rosbag2's separator between the definitions of a type and of the types it uses.
SEPARATOR = "=" * 80

_PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
               "uint32", "int64", "uint64", "string", "wstring"}
_TYPE_NAME = re.compile(r"^([A-Za-z][\w]*)/(?:msg/)?([A-Z]\w*)$")
_SOURCE_MSG_DIR = Path(__file__).resolve().parent.parent / "msg"


#: Longest time a message waits in the chunk being built before the chunk is written to the file, so
#: about what a killed recorder loses (chunks are compressed whole: much smaller ones compress worse).
CHUNK_S = 1.0
#: Every MCAP record starts with its opcode (uint8) and its length (uint64).
_RECORD_HEAD = struct.Struct("<BQ")


class RecordingError(InputError):
    """A recording cannot be written or read as asked: the message says what was wrong."""


class UnclosedRecordingWarning(UserWarning):
    """A recording was never closed (its recorder was killed): it is read up to its last complete
    chunk, and what the recorder still held is lost."""


@dataclass(frozen=True)
class NewFile:
    """A file just created for a recording: `path`, unbuffered `file`, and the `requested` name,
    which was taken when the two differ."""

    path: Path
    requested: Path
    file: BinaryIO

    def describe(self) -> str:
        """Where the recording goes, for the log: says so when the requested name was taken."""
        if self.path == self.requested:
            return f"recording to {self.path}"
        return f"{self.requested} exists: recording to {self.path}"


def create_new_file(path: str | Path) -> NewFile:
    """Create `path` (and its folder), or the first free `stem-N.suffix` beside it when it exists, so a
    recording never overwrites another. Exclusive create (O_EXCL): of two recorders starting at once
    each gets its own file."""
    requested = Path(path).expanduser()
    if requested.is_dir():
        raise RecordingError(f"recording path {requested} is a folder: give a file name")
    try:
        requested.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count():
            candidate = requested.with_name(f"{requested.stem}-{n}{requested.suffix}") if n else requested
            try:
                return NewFile(candidate, requested, open(candidate, "xb", buffering=0))
            except FileExistsError:
                continue
    except OSError as exc:
        raise RecordingError(f"cannot create a recording at {requested}: {exc}") from exc
    raise AssertionError("itertools.count() does not end")


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
    """Writes CDR messages to a new MCAP file (never over an existing one: see `create_new_file`), one
    channel per topic (ros2 profile, zstd chunks of at most about CHUNK_S)."""

    def __init__(self, path: str | Path) -> None:
        self.new = create_new_file(path)
        self.path = self.new.path
        self._file = io.BufferedWriter(self.new.file)  # closed in close(); the writer does not flush it
        self._writer = Writer(self._file, compression=CompressionType.ZSTD)
        self._writer.start(profile="ros2", library="gaga_ros")
        self._writer.flush()  # the header at once: a recorder killed before its first chunk leaves MCAP
        self._held_since: float | None = None  # monotonic time of the oldest message not yet in the file
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
        if self._held_since is None:
            self._held_since = time.monotonic()
        self.flush(CHUNK_S)

    def flush(self, older_than_s: float = 0.0) -> None:
        """Write the chunk being built to the file if it holds a message at least `older_than_s` old:
        what is written survives the recorder being killed. Call it when messages stop coming too."""
        if self._held_since is not None and time.monotonic() - self._held_since >= older_than_s:
            self._writer.flush()
            self._held_since = None

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


@contextmanager
def _readable(path: str | Path) -> Iterator[None]:
    """Turns the MCAP library's errors about a damaged file into a RecordingError naming it."""
    try:
        yield
    except RecordingError:
        raise
    except (McapError, ValueError, EOFError, KeyError, struct.error) as exc:
        raise RecordingError(f"{path} is not a readable MCAP file: {exc}") from exc


def _closed(f: BinaryIO, path: str | Path) -> bool:
    """Whether the recording was closed (it ends with its footer and the MCAP magic); warns when not."""
    if f.read(len(MCAP0_MAGIC)) != MCAP0_MAGIC:
        raise RecordingError(f"{path} is not a readable MCAP file: it does not start with the MCAP magic")
    size = f.seek(0, os.SEEK_END)
    f.seek(size - len(MCAP0_MAGIC))
    closed = size > len(MCAP0_MAGIC) and f.read(len(MCAP0_MAGIC)) == MCAP0_MAGIC
    f.seek(0)  # where the readers expect to start
    if closed:
        return True
    warnings.warn(f"{path} was not closed (its recorder was killed or lost power): reading it up to its "
                  "last complete chunk; what the recorder still held is lost", UnclosedRecordingWarning,
                  stacklevel=3)  # at read()'s caller
    return False


def _unclosed_messages(f: BinaryIO) -> Iterator[tuple[Schema | None, Channel, Message]]:
    """The messages of a recording that was not closed, in file order, from its complete records only:
    the last one a killed writer was writing is cut short, and reading stops before it."""
    size = f.seek(0, os.SEEK_END)
    end = len(MCAP0_MAGIC)
    while end + _RECORD_HEAD.size <= size:
        f.seek(end)
        _, length = _RECORD_HEAD.unpack(f.read(_RECORD_HEAD.size))
        if end + _RECORD_HEAD.size + length > size:
            break
        end += _RECORD_HEAD.size + length
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    with mmap.mmap(f.fileno(), end, access=mmap.ACCESS_READ) as data:
        try:
            # mcap's hints want a file object; an mmap reads like one (chunk CRCs catch torn writes)
            for record in StreamReader(data, validate_crcs=True).records:  # type: ignore[arg-type]
                if isinstance(record, Schema):
                    schemas[record.id] = record
                elif isinstance(record, Channel):
                    channels[record.id] = record
                elif isinstance(record, Message):
                    channel = channels[record.channel_id]
                    yield schemas.get(channel.schema_id), channel, record
        except (EndOfFile, CRCValidationError):
            return  # past the last complete record (no footer follows), or at a chunk torn by power loss


def _messages(f: BinaryIO, closed: bool,
              topics: Iterable[str] | None) -> Iterator[tuple[Schema | None, Channel, Message]]:
    """(schema, channel, message) of the wanted topics in log-time order; an unclosed recording is
    read whole into memory to sort it."""
    wanted = None if topics is None else list(topics)
    if closed:
        return make_reader(f).iter_messages(topics=wanted, log_time_order=True)
    return iter(sorted((m for m in _unclosed_messages(f) if wanted is None or m[1].topic in wanted),
                       key=lambda m: m[2].log_time))


def _channels(path: str | Path) -> list[tuple[Channel, str, int]]:
    """Each channel of a recording with its type and message count: from the summary of a closed
    recording, else counted by reading the messages."""
    with _open(path) as f, _readable(path):
        closed = _closed(f, path)
        summary = make_reader(f).get_summary() if closed else None
        if summary is not None:
            counts = summary.statistics.channel_message_counts if summary.statistics else {}
            return [(ch, summary.schemas[ch.schema_id].name, counts.get(cid, 0))
                    for cid, ch in summary.channels.items()]
        found: dict[int, tuple[Channel, str, int]] = {}
        for schema, channel, _ in _messages(f, closed, None):
            count = found[channel.id][2] if channel.id in found else 0
            found[channel.id] = (channel, schema.name if schema else "", count + 1)
        return list(found.values())


def topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """Topic -> (message type, message count) of a recording."""
    return {ch.topic: (type_name, count) for ch, type_name, count in _channels(path)}


def offered_qos(path: str | Path) -> dict[str, list[OfferedQos]]:
    """Topic -> the QoS its publishers offered when recorded (empty when the recording has none)."""
    return {ch.topic: parse_qos_yaml(ch.metadata["offered_qos_profiles"])
            if "offered_qos_profiles" in ch.metadata else [] for ch, _, _ in _channels(path)}


def read(path: str | Path, only: Iterable[str] | None = None) -> Iterator[RecordedMessage]:
    """The CDR messages of a recording in log-time order, optionally only some topics."""
    with _open(path) as f, _readable(path):
        for schema, channel, message in _messages(f, _closed(f, path), only):
            if channel.message_encoding != "cdr" or schema is None or schema.encoding != "ros2msg":
                raise RecordingError(f"{path}: topic {channel.topic} is {channel.message_encoding} "
                                     "without a ros2msg schema; only ROS 2 (CDR) recordings replay")
            yield RecordedMessage(channel.topic, schema.name, message.data, message.log_time,
                                  message.publish_time, message.sequence)


def schedule(log_times_ns: list[int], rate: float = 1.0) -> list[float]:
    """Seconds after the start at which to replay messages logged at these times, `rate` x faster."""
    if not rate > 0:
        raise RecordingError(f"replay rate must be > 0 (1 = original timing), got {rate}")
    if not log_times_ns:
        return []
    t0 = log_times_ns[0]
    return [(t - t0) * 1e-9 / rate for t in log_times_ns]
