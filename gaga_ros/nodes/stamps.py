"""Header stamps <-> integer nanoseconds, total in both directions.

rclpy's `Time.from_msg` raises on a negative `sec` and `Time(nanoseconds=...)` on a negative value,
so one message with such a stamp used to stop a node. Here every stamp a publisher can send (int32
seconds, uint32 nanoseconds, so also nanosec >= 1e9) maps to an integer, and every integer maps back
to a valid stamp, clamped to what the message can hold. Deciding whether a stamp makes sense (the
recorder's timeline, a latency figure) is the reader's business, not the conversion's.
"""

from __future__ import annotations

from builtin_interfaces.msg import Time as TimeMsg

NS_PER_S = 1_000_000_000
#: builtin_interfaces/Time.sec is an int32.
SEC_MIN, SEC_MAX = -(2**31), 2**31 - 1


def to_ns(stamp: TimeMsg) -> int:
    """Nanoseconds since the epoch of a header stamp (negative before it); never raises."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def from_ns(ns: int) -> TimeMsg:
    """A stamp for `ns` nanoseconds, clamped to the int32 seconds a stamp can carry."""
    sec, nanosec = divmod(int(ns), NS_PER_S)
    if sec < SEC_MIN:
        return TimeMsg(sec=SEC_MIN, nanosec=0)
    if sec > SEC_MAX:
        return TimeMsg(sec=SEC_MAX, nanosec=NS_PER_S - 1)
    return TimeMsg(sec=sec, nanosec=nanosec)
