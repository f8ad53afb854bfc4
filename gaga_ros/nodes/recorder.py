"""Recorder node: /avatar/image -> an H.264 mp4 file, so a run can be watched without a viewer.

The file is a fragmented mp4 with a keyframe about every KEYFRAME_S: each fragment is on disk once the
next keyframe starts, so a recorder killed mid-run leaves a playable file that lacks about the last
second. Frames are timed by their header stamps; a stamp that jumps (backwards, or far ahead) is a
discontinuity and does not derail the timeline (`Timeline`).
"""

from __future__ import annotations

import threading
from fractions import Fraction
from typing import Any

import av
from sensor_msgs.msg import Image

from gaga_ros import record
from gaga_ros.nodes import names, qos, stamps
from gaga_ros.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, RateMeter
from gaga_ros.nodes.guard import GuardedNode
from gaga_ros.nodes.image_msg import from_msg
from gaga_ros.nodes.parameters import Param, declare

PARAMS = (
    Param("path", "out/avatar.mp4", "mp4 file to write; its folder is created. An existing file is never "
          "overwritten: the recording then goes to the first free name-N.mp4 beside it."),
    Param("topic", names.IMAGE, "Image topic to record."),
    Param("max_seconds", 600.0, "Stop writing after this much recorded time (bounds the file).",
          low=1.0, high=86400.0),
)

#: Fragmented mp4: a header without sample tables, then one moof+mdat per keyframe interval, each
#: written when complete, so the file plays up to its last fragment even if the recorder is killed.
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"
#: Keyframe (and so fragment) spacing in recorded time: about what a killed recorder loses.
KEYFRAME_S = 1.0
#: A short lookahead and no B-frames: x264 holds 6 frames (0.2 s at 30 fps) before their packets come
#: out, where preset medium holds 41 (1.4 s) that a killed recorder would lose on top of the fragment.
#: Measured on 150 frames of a talking-head video at 512x512: the same size as medium's (220 vs 228 KiB); tune
#: zerolatency holds none but, without lookahead (no mb-tree), makes the file 38 % larger.
X264_OPTIONS = {"x264-params": "rc-lookahead=5:bframes=0"}
#: A stamp more than this ahead of the previous frame's is a discontinuity (a clock jump or a bogus
#: stamp), not a pause: longer than the pipeline's own stalls (the FLAME identity fit, ~1 s).
MAX_GAP_S = 3.0
#: Frame interval (Hz) assumed until two frames have shown the real one; also the stream's nominal rate.
NOMINAL_RATE = 30
#: Least time between two log lines about frames that failed to encode (they may fail at frame rate).
LOG_THROTTLE_S = 5.0
#: The mp4 timeline's unit: milliseconds.
TIME_BASE = Fraction(1, 1000)
_TICKS_PER_S = TIME_BASE.denominator
_NS_PER_TICK = stamps.NS_PER_S // _TICKS_PER_S


class Timeline:
    """Header stamps -> presentation times (ms from the first frame), increasing whatever the stamps do.

    A frame whose stamp goes backwards, repeats, or leaps more than MAX_GAP_S ahead is a discontinuity:
    it is placed one frame interval (the last normal one) after the previous frame, and later stamps
    count from there. So a bad first stamp (negative, or years ahead) or one bad stamp mid-run costs
    nothing but a count, where anchoring on it would push every later frame out of the recording.
    """

    def __init__(self) -> None:
        self.anchor_ns: int | None = None  # the stamp that maps to pts 0 (moved at discontinuities)
        self.last_pts = 0
        self.interval = round(_TICKS_PER_S / NOMINAL_RATE)
        self.discontinuities = 0

    def place(self, stamp_ns: int) -> int:
        """The presentation time (ms) of a frame with this stamp, after every frame placed before."""
        if self.anchor_ns is None:
            self.anchor_ns = stamp_ns
            return 0
        pts = (stamp_ns - self.anchor_ns) // _NS_PER_TICK
        step = pts - self.last_pts
        if 0 < step <= MAX_GAP_S * _TICKS_PER_S:
            self.interval = step
        else:
            self.discontinuities += 1
            pts = self.last_pts + self.interval
            self.anchor_ns = stamp_ns - pts * _NS_PER_TICK
        self.last_pts = pts
        return pts


class RecorderNode(GuardedNode):
    """Encodes every received frame, timed by its header stamp (variable frame rate)."""

    def __init__(self) -> None:
        super().__init__("gaga_recorder")
        self.p = declare(self, PARAMS)
        new = record.create_new_file(self.p["path"])
        self.path = new.path
        self.file = new.file  # unbuffered: each fragment reaches the file as the muxer writes it
        self.container: av.container.OutputContainer | None = av.open(
            self.file, mode="w", format="mp4", options={"movflags": MOVFLAGS})
        # close() runs on the main thread while an executor thread may be encoding a frame: the
        # encoder must not be flushed and freed under it (a segfault at Ctrl-C, seen).
        self.lock = threading.Lock()
        self.stream: Any = None  # the video stream, added on the first frame (its size is the frame's)
        self.timeline = Timeline()
        self.next_keyframe = 0  # pts from which the next frame is made a keyframe
        self.full = False
        self.error = ""
        self.encode_errors = 0
        self.meter = RateMeter()
        self.create_subscription(Image, self.p["topic"], self._on_image, qos.FRAMES)
        self.diagnostics = Diagnostics(self, self._report)
        self.get_logger().info(f"{self.p['topic']}: {new.describe()}")

    def _report(self) -> tuple[int, str, dict[str, object]]:
        level = ERROR if self.error else WARN if self.full else OK
        state = "full (max_seconds reached)" if self.full else "recording"
        return level, self.error or f"{state} to {self.path}", {
            "path": str(self.path), "frames": self.meter.count,
            "discontinuities": self.timeline.discontinuities, "encode_errors": self.encode_errors}

    def _on_image(self, msg: Image) -> None:
        rgb = from_msg(msg)  # an unreadable frame raises: the guard refuses it, the recording goes on
        with self.lock:
            if self.container is None:
                return
            try:
                self._encode(rgb, stamps.to_ns(msg.header.stamp))
            except Exception as exc:  # one frame (or a full disk) must not end the recording
                self.encode_errors += 1
                self.error = f"{self.encode_errors} frames failed to encode; last: {exc}"
                self.get_logger().error(f"frame not recorded ({self.encode_errors} so far): {exc}",
                                        throttle_duration_sec=LOG_THROTTLE_S)

    def _encode(self, rgb, stamp_ns: int) -> None:
        assert self.container is not None  # frames arrive only while the file is open
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=NOMINAL_RATE, options=X264_OPTIONS)
            height, width = (max(2, side // 2 * 2) for side in rgb.shape[:2])  # yuv420p: even sides
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p"
            self.stream.time_base = TIME_BASE
            self.stream.codec_context.time_base = TIME_BASE
        pts = self.timeline.place(stamp_ns)
        if pts > self.p["max_seconds"] * _TICKS_PER_S:
            self.full = True
            return
        frame = av.VideoFrame.from_ndarray(rgb[: self.stream.height, : self.stream.width], format="rgb24")
        frame.pts, frame.time_base = pts, TIME_BASE
        if pts >= self.next_keyframe:  # by time, not frame count: the frame rate is the publisher's
            frame.pict_type = av.video.frame.PictureType.I
            self.next_keyframe = pts + round(KEYFRAME_S * _TICKS_PER_S)
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.meter.tick()

    def close(self) -> None:
        with self.lock:
            if self.container is None:
                return
            try:
                if self.stream is not None:
                    for packet in self.stream.encode():
                        self.container.mux(packet)
                self.container.close()
            except Exception as exc:  # the fragments written so far stay playable
                self.get_logger().error(f"could not finish {self.path}: {exc}")
            finally:
                self.container = None
                self.file.close()
        self.get_logger().info(f"wrote {self.meter.count} frames to {self.path} "
                               f"({self.timeline.discontinuities} stamp discontinuities, "
                               f"{self.encode_errors} frames failed to encode)")


def main(args: list[str] | None = None) -> None:
    from gaga_ros.nodes.runtime import spin

    spin(RecorderNode, args)


if __name__ == "__main__":
    main()
