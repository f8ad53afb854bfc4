"""The graph's topic and service names, said once.

Every name is relative, so a node started in a namespace (``namespace:=robot1``) publishes
``/robot1/avatar/image`` and two avatars share one ROS graph without crossing; without a namespace
the names resolve to ``/avatar/image`` and so on. Remapping works on these names as usual.
``/diagnostics`` and ``/clock`` stay absolute: ROS tools (the diagnostic aggregator, every node's
time source) listen there, and each diagnostic status names its node, so nothing is lost.
"""

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
