"""gaga_ros/Expression and NamedExpression messages <-> their core values (validated on the way in)."""

from __future__ import annotations

import numpy as np

from gaga_ros.expression import Expression, FaceModel
from gaga_ros.msg import Expression as ExpressionMsg
from gaga_ros.msg import NamedExpression
from gaga_ros.named import NamedCommand
from gaga_ros.nodes.stamps import to_ns


def to_msg(expr: Expression, stamp) -> ExpressionMsg:
    """A message for `expr` with the given header stamp (the driving frame's capture time)."""
    msg = ExpressionMsg(face_model=int(expr.face_model), confidence=float(expr.confidence))
    msg.header.stamp = stamp
    msg.header.frame_id = expr.frame_id
    msg.expression = expr.expression.astype(np.float32)
    msg.jaw_pose = expr.jaw_pose.astype(np.float32)
    msg.neck_pose = expr.neck_pose.astype(np.float32)
    msg.eye_pose = expr.eye_pose.astype(np.float32)
    if expr.vertices is not None:
        msg.vertices = expr.vertices.reshape(-1).astype(np.float32)
    msg.transform = expr.transform.reshape(-1).astype(np.float32)
    return msg


def from_msg(msg: ExpressionMsg) -> Expression:
    """The validated core value; raises ExpressionError saying what is wrong and what is accepted."""
    return Expression(
        face_model=FaceModel(msg.face_model) if msg.face_model in (0, 1) else msg.face_model,
        transform=np.asarray(msg.transform, np.float32),
        stamp_ns=to_ns(msg.header.stamp),
        frame_id=msg.header.frame_id,
        expression=np.asarray(msg.expression, np.float32),
        jaw_pose=np.asarray(msg.jaw_pose, np.float32),
        neck_pose=np.asarray(msg.neck_pose, np.float32),
        eye_pose=np.asarray(msg.eye_pose, np.float32),
        vertices=np.asarray(msg.vertices, np.float32) if len(msg.vertices) else None,
        confidence=float(msg.confidence),
    )


def named_to_msg(command: NamedCommand, stamp) -> NamedExpression:
    """A NamedExpression message for a validated command (its hold resolved, weights clamped)."""
    pose = command.pose
    msg = NamedExpression(names=list(pose.weights), weights=[float(w) for w in pose.weights.values()],
                          yaw=pose.yaw, pitch=pose.pitch, roll=pose.roll, hold_s=command.hold_s,
                          layer=command.layer)
    msg.header.stamp = stamp
    return msg


def named_from_msg(msg: NamedExpression) -> NamedCommand:
    """The validated command; raises NamedError saying what is wrong and what is accepted."""
    return NamedCommand.from_lists(msg.names, msg.weights, msg.yaw, msg.pitch, msg.roll, msg.hold_s,
                                   msg.layer)
