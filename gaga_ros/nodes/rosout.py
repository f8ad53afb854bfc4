"""Python `logging` records of the ROS-free core -> the node's logger, so they reach /rosout.

The stream server (gaga_ros.stream) logs with the standard library, as a library should; a node that
runs it forwards those records, so `ros2 topic echo /rosout`, rqt_console and log files see viewers
come and go like any other node output.
"""

from __future__ import annotations

import logging

from rclpy.node import Node


class RosoutHandler(logging.Handler):
    """Sends each record to the node's rclpy logger at the matching severity."""

    def __init__(self, node: Node) -> None:
        super().__init__()
        self._logger = node.get_logger()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        if record.levelno >= logging.ERROR:
            self._logger.error(text)
        elif record.levelno >= logging.WARNING:
            self._logger.warning(text)
        elif record.levelno >= logging.INFO:
            self._logger.info(text)
        else:
            self._logger.debug(text)


def forward(node: Node, logger_name: str, level: int = logging.INFO) -> RosoutHandler:
    """Forward `logger_name`'s records at `level` and above; returns the handler for remove()."""
    handler = RosoutHandler(node)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    source = logging.getLogger(logger_name)
    source.setLevel(level)
    source.addHandler(handler)
    source.propagate = False  # once, on /rosout and the console through rclpy, not twice
    return handler


def remove(logger_name: str, handler: RosoutHandler) -> None:
    logging.getLogger(logger_name).removeHandler(handler)
