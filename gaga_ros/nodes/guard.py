"""No single message, request or timer tick stops a node; a worker that dies is never silent.

rclpy re-raises an exception from any callback out of the executor's spin, which ends the process:
one malformed message used to stop a node, and its restart lost state (the recorder's file, the
render node's cached avatar). Every callback that a `Guarded` node registers runs under its `Guard`:
an exception there is logged (throttled per input), counted per input, and the node's /diagnostics
says WARN with the latest reason for REASON_HOLD_S. The cost is one try/except per callback.

Worker threads run under `Guard.worker`. A worker that dies anyway is a bug the node cannot work
around (its queue would stop being served while the process looks alive), so the node reports ERROR
on /diagnostics at once and ends its process with EXIT_WORKER_DIED, which `gaga-ros launch` and
`ros2 launch` (respawn) answer by starting it again.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from rclpy.node import Node

from gaga_ros.mailbox import Mailbox
from gaga_ros.nodes import runtime
from gaga_ros.nodes.diagnostics import ERROR, WARN

#: How long the latest refusal stays in the node's diagnostics message after it happened.
REASON_HOLD_S = 10.0
#: Least time between two log lines about the same input (a flood of bad messages logs a trickle).
LOG_EVERY_S = 5.0
#: Exit status of a node whose worker thread died (EX_SOFTWARE of sysexits.h: an internal error).
EXIT_WORKER_DIED = 70

T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    """One input a node could not use: which input, why, and when (time.monotonic())."""

    what: str
    reason: str
    at: float


class Guard:
    """Counts and explains what a node refused; wraps callbacks and runs workers."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.last: Refusal | None = None
        self.fatal = ""
        self._logged: dict[str, float] = {}
        self.on_fatal: list[Callable[[], None]] = []

    @property
    def total(self) -> int:
        """Inputs refused since start, all kinds together."""
        return sum(self.counts.values())

    def refuse(self, what: str, reason: str) -> None:
        """Record that input `what` was refused for `reason` (logged, counted, shown in diagnostics)."""
        now = time.monotonic()
        with self._lock:
            self.counts[what] += 1
            self.last = Refusal(what, reason, now)
            log = now - self._logged.get(what, -LOG_EVERY_S) >= LOG_EVERY_S
            if log:
                self._logged[what] = now
            n = self.counts[what]
        if log:
            self._node.get_logger().warning(f"{what} refused ({n} so far): {reason}")

    def wrap(self, what: str, callback: Callable) -> Callable:
        """`callback` that refuses its input instead of raising; service replies say why.

        A service response with `success`/`message` fields (std_srvs/Trigger, SetSource, ...) is
        returned with success false and the reason; others come back as they are.
        """
        @functools.wraps(callback)
        def guarded(*args):
            try:
                return callback(*args)
            except Exception as exc:  # noqa: BLE001 - the point: nothing escapes to the executor
                reason = describe(exc)
                self.refuse(what, reason)
                if len(args) == 2:  # a service: (request, response)
                    response = args[1]
                    if hasattr(response, "success"):
                        response.success = False
                    if hasattr(response, "message"):
                        response.message = f"refused: {reason}"
                    return response
                return None

        return guarded

    def worker(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """A started daemon thread running `target`; if it raises, the node fails loudly (see above)."""
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - reported, then the process ends
                self.die(f"worker {name} died: {describe(exc)}", traceback.format_exc())

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        return thread

    def serve(self, name: str, what: str, mailbox: Mailbox[T],
              handle: Callable[[T], None]) -> threading.Thread:
        """A worker handing each item of `mailbox` to `handle` until the mailbox closes; an item whose
        handling raises is refused as input `what`, and the worker goes on with the next."""
        handle = self.wrap(what, handle)

        def loop() -> None:
            while not mailbox.closed:
                item = mailbox.get()
                if item is not None:
                    handle(item)

        return self.worker(name, loop)

    def die(self, reason: str, details: str = "") -> None:
        """ERROR on /diagnostics now, then end the process so that its launcher restarts it."""
        self.fatal = reason
        self._node.get_logger().error(f"{reason}; exiting so the launcher restarts this node\n{details}")
        for publish in self.on_fatal:
            try:
                publish()
            except Exception:  # noqa: BLE001 - the exit below matters more than the last report
                pass
        runtime.request_exit(EXIT_WORKER_DIED)

    def assess(self, level: int, message: str) -> tuple[int, str]:
        """The node's own (level, message), raised to WARN while a refusal is recent, ERROR once fatal."""
        if self.fatal:
            return ERROR, self.fatal
        last = self.last
        if last is not None and time.monotonic() - last.at < REASON_HOLD_S:
            return max(level, WARN), f"{message}; refused {last.what}: {last.reason}"
        return level, message


def describe(exc: BaseException) -> str:
    """One line for an exception: its message, prefixed by its type unless that is one of ours."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ValueError) and text:  # this package's refusals are ValueErrors that say why
        return text[:300]
    return f"{type(exc).__name__}: {text}"[:300]


if TYPE_CHECKING:  # the type checker sees the mixin as the node it is always mixed into
    _MixedInto = Node
else:
    _MixedInto = object


class Guarded(_MixedInto):
    """Mixin for rclpy nodes: every subscription, service and timer callback runs under `self.guard`.

    Put it before the rclpy node class (`class X(Guarded, Node)`), so these methods wrap rclpy's.
    """

    def __init__(self, node_name: str, **kwargs) -> None:
        self.guard = Guard(self)  # first: rclpy's constructor creates the parameter services
        super().__init__(node_name, **kwargs)

    # Inputs are named as the graph names them (namespace and remapping applied), in logs and counts.
    def create_subscription(self, msg_type, topic: str, callback: Callable, qos_profile, **kwargs):
        wrapped = self.guard.wrap(self.resolve_topic_name(topic), callback)
        return super().create_subscription(msg_type, topic, wrapped, qos_profile, **kwargs)

    def create_service(self, srv_type, srv_name: str, callback: Callable, **kwargs):
        wrapped = self.guard.wrap(self.resolve_service_name(srv_name), callback)
        return super().create_service(srv_type, srv_name, wrapped, **kwargs)

    def create_timer(self, timer_period_sec: float, callback: Callable, *args, **kwargs):
        name = getattr(callback, "__name__", "timer").strip("_<>")
        return super().create_timer(timer_period_sec, self.guard.wrap(f"timer {name}", callback),
                                    *args, **kwargs)


class GuardedNode(Guarded, Node):
    """A plain rclpy node whose callbacks cannot stop it."""
