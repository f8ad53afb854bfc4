"""The old name of gaga_ros.conventions, kept only while gaga_ros/avatar/gagavatar/fast.py imports it
(that file is being edited elsewhere; its next edit imports gaga_ros.conventions and deletes this)."""

from gaga_ros.conventions import FLAME_VERTICES

__all__ = ["FLAME_VERTICES"]
