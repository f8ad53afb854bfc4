"""Process entry for one node: init, spin on a multi-threaded executor, shut down cleanly."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions


def _stop_request(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _second_signal_kills() -> None:
    """Once shutdown has begun, another Ctrl-C (or SIGTERM, launch's escalation) ends the process at
    once, without a traceback. Launchers send each node exactly one SIGINT: `ros2 launch` only when
    the terminal has not (see its ExecuteLocal), `gaga-ros launch` from its own session."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def spin(make_node: Callable[[], Node], args: list[str] | None = None) -> None:
    """Run one node until Ctrl-C, SIGTERM or shutdown; exits 0 after a clean stop, non-zero when the
    node cannot start."""
    # Ctrl-C arrives as KeyboardInterrupt here (not through rclpy's handler, which would invalidate
    # the context while worker threads still publish), so workers stop before the context goes.
    # SIGTERM asks for the same clean stop.
    rclpy.init(args=args if args is not None else sys.argv, signal_handler_options=SignalHandlerOptions.NO)
    signal.signal(signal.SIGTERM, _stop_request)
    node = None
    try:
        node = make_node()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # a node that cannot start says why in one line, not a traceback
        if node is None:
            print(f"[gaga_ros] cannot start: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        _second_signal_kills()
        if node is not None:
            close = getattr(node, "close", None)
            if close is not None:
                close()
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
