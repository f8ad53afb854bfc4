"""Streaming the avatar to browsers over WebRTC, ROS-free (the ROS node wraps StreamServer)."""

from gaga_ros.stream.tracks import FrameError, read_code, stamp_code
from gaga_ros.stream.webrtc import StreamConfigError, StreamServer, parse_expression

__all__ = ["FrameError", "StreamConfigError", "StreamServer", "parse_expression", "read_code",
           "stamp_code"]
