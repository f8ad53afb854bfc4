"""The graph's topic and service names, said once.

Every name is relative, so a node started in a namespace (``namespace:=robot1``) publishes
``/robot1/avatar/image`` and two avatars share one ROS graph without crossing; without a namespace
the names resolve to ``/avatar/image`` and so on. Remapping works on these names as usual.
``/diagnostics`` and ``/clock`` stay absolute: ROS tools (the diagnostic aggregator, every node's
time source) listen there, and each diagnostic status names its node, so nothing is lost.
"""

import re

from gaga_ros.errors import InputError

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Driving the face: capture -> tracking -> expressions -> render.
CAMERA_IMAGE = "camera/image_raw"
CAMERA_IMAGE_COMPRESSED = "camera/image_raw/compressed"
EXPRESSION = "avatar/expression"
NAMED_EXPRESSION = "avatar/named_expression"
LOOK_AT = "avatar/look_at"
LOOK_AT_DISPLAY = "avatar/look_at_display"
TRACKING_STATUS = "tracking/status"
RESET_REFERENCE = "tracking/reset_reference"

# The avatar: source photo -> reconstruction -> model (latched) -> render -> image.
SOURCE_IMAGE = "avatar/source_image"
SET_SOURCE = "avatar/set_source"
MODEL = "avatar/model"
IMAGE = "avatar/image"
IMAGE_COMPRESSED = "avatar/image/compressed"

# The telepresence loop, through the bridge: the operator's camera and voice in, the robot's voice
# (its microphone or text-to-speech) and camera out to the operator's page.
OPERATOR_IMAGE = "operator/image_raw"
OPERATOR_AUDIO = "operator/audio"
ROBOT_AUDIO = "robot/audio"

# Absolute on purpose (module docstring).
DIAGNOSTICS = "/diagnostics"
CLOCK = "/clock"


def namespace(ns: str) -> str:
    """`ns` as ROS spells a namespace: "" for the root, else "/robot1" (or "/site/robot1"). A ValueError
    says what is accepted: ROS refuses other names only when the node starts, with less to go on."""
    tokens = [t for t in ns.strip().split("/") if t]
    bad = [t for t in tokens if not _TOKEN.fullmatch(t)]
    if bad:
        raise InputError(f"namespace {ns!r}: accepted are names of letters, digits and _ that do not start "
                         "with a digit, separated by / (e.g. robot1 or site/robot1)")
    return "/" + "/".join(tokens) if tokens else ""


def in_namespace(ns: str, name: str) -> str:
    """The absolute name of relative `name` inside namespace `ns` ("robot1", "avatar/image" ->
    "/robot1/avatar/image"): what a node in that namespace resolves it to."""
    return f"{namespace(ns)}/{name}"
