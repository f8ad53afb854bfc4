"""gaga_ros/GaussianAvatar message <-> the core Avatar value."""

from __future__ import annotations

import numpy as np
import torch

from gaga_ros.avatar.base import _MESSAGE_FIELDS, Avatar
from gaga_ros.msg import GaussianAvatar


def to_msg(avatar: Avatar, stamp, frame_id: str = "avatar") -> GaussianAvatar:
    """A message carrying `avatar` (arrays copied to the CPU once, at reconstruction time)."""
    msg = GaussianAvatar()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    for name, value in avatar.to_arrays().items():
        setattr(msg, name, value.tobytes() if name == "extra" else value)
    return msg


def from_msg(msg: GaussianAvatar, device: torch.device | str) -> Avatar:
    """The avatar on `device`; raises AvatarError when the arrays are inconsistent."""
    fields = {name: getattr(msg, name) for name in _MESSAGE_FIELDS}
    fields["extra"] = np.frombuffer(bytes(msg.extra), np.uint8)
    return Avatar.from_arrays(fields, device)
