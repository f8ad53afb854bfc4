"""Process entry for one node: init, spin, shut down cleanly.

Executor: a node whose class sets `executor_threads = 1` (its callbacks are short: heavy work runs
on its own worker threads) spins on rclpy's single-threaded executor, which costs far less CPU than
the multi-threaded one's wait-set churn (the voice node at 60 commands a second: 12-15 % of a core
against 18-98 %); the others get EXECUTOR_THREADS threads, so a slow service never blocks their
subscriptions.

Stopping: the first SIGINT or SIGTERM only sets a flag that the spin loop reads between waits (at
most POLL_S later), so no KeyboardInterrupt lands inside a lock held by rclpy, threading or a
library (a process interrupted that way can hang at exit until it is killed: seen under load). The
node then closes (workers joined, files finalised) and the process exits 0. A second signal ends the
process at once. Launchers send each node exactly one SIGINT: `ros2 launch` only when the terminal
has not (its ExecuteLocal), `gaga-ros launch` from its own session (gaga_ros.cli.Supervisor).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions

#: Threads of the multi-threaded executor, for nodes that do not choose one.
EXECUTOR_THREADS = 4
#: Longest wait of the spin loop: how late a stop request may be noticed when nothing else happens.
POLL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Exit status of a node that cannot start (bad parameters, missing files): launchers do not restart
#: it, since it would fail the same way.
EXIT_CANNOT_START = 2

#: The running spin loop's stop flag and the exit status it ends with (one node per process).
_stop: threading.Event | None = None
_exit_code = 0


def request_exit(code: int) -> None:
    """Stop the node as Ctrl-C would, then exit with `code` (a node that cannot go on asks this)."""
    global _exit_code
    _exit_code = code
    if _stop is not None:
        _stop.set()


def _install_stop_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # the second one: end now, without cleanup or traceback
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


def spin(make_node: Callable[[], Node], args: list[str] | None = None) -> None:
    """Run one node until Ctrl-C, SIGTERM or shutdown; exits 0 after a clean stop, 2 when the node
    cannot start, and the code given to request_exit() when the node asked to end."""
    # rclpy's own handler would invalidate the context while worker threads still publish.
    rclpy.init(args=args if args is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    global _stop
    stop = _stop = threading.Event()
    _install_stop_handlers(stop)  # a stop during a long start (model loading) is honoured after it
    node = None
    executor: Executor | None = None
    try:
        node = make_node()
        threads = getattr(node, "executor_threads", EXECUTOR_THREADS)
        executor = SingleThreadedExecutor() if threads == 1 else MultiThreadedExecutor(num_threads=threads)
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=POLL_S)
    except ExternalShutdownException:
        pass
    except Exception as exc:  # a node that cannot start says why in one line, not a traceback
        if node is None:
            print(f"[gaga_ros] cannot start: {exc}", file=sys.stderr)
            sys.exit(EXIT_CANNOT_START)
        raise
    finally:
        stop.set()  # from here a signal ends the process at once
        if node is not None:
            close = getattr(node, "close", None)
            if close is not None:
                close()
            if executor is not None:
                executor.remove_node(node)
            node.destroy_node()
        if executor is not None:
            executor.shutdown()
        if rclpy.ok():
            rclpy.shutdown()
    if _exit_code:
        sys.exit(_exit_code)
