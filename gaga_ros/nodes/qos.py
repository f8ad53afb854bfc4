"""The QoS profiles of the graph, chosen on purpose and named for their use."""

from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)

#: Camera and avatar frames: best effort, newest only. A late frame is worth nothing.
FRAMES = qos_profile_sensor_data

#: Expressions: reliable but shallow, so a burst never builds latency.
EXPRESSIONS = QoSProfile(depth=2, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)

#: Sound: best effort and shallow like frames (a late chunk is worth nothing), but deeper, since a
#: voice comes in 20 ms chunks that a burst of scheduling delay must not drop.
AUDIO = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT,
                   durability=DurabilityPolicy.VOLATILE)

#: State that late joiners need (the avatar, tracking status): reliable and transient-local, so a
#: restarted render node gets the current avatar back without anyone republishing it.
LATCHED = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)

#: /clock from a replay: what rclpy's time source subscribes with (best effort, depth 1): only the
#: newest time matters.
CLOCK = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT)
