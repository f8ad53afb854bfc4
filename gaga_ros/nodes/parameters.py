"""Parameters declared up front with descriptors, from one table per node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.node import Node


@dataclass(frozen=True)
class Param:
    """One node parameter: name, default, what it does, and whether it may change live."""

    name: str
    default: Any
    description: str
    read_only: bool = True
    low: float | None = None
    high: float | None = None


#: Shared by the render and fleet nodes (the values: gaga_ros.avatar.gagavatar.backend.COMPILE_MODES).
COMPILE = Param("compile", "", "GAGAvatar fast path: torch.compile mode of the refiner: '' (eager, ready "
                "in seconds), default (about 2x faster at batch 16, about 75 s of compiling per batch "
                "size on the first frame) or max-autotune-no-cudagraphs (more than 8 minutes of "
                "compiling at batch 1 on an H200, for no measured gain: bench/FAST_NOTES.md).")


def declare(node: Node, params: tuple[Param, ...]) -> dict[str, Any]:
    """Declare every parameter with its descriptor and return the current values by name."""
    for p in params:
        desc = ParameterDescriptor(description=p.description, read_only=p.read_only)
        if p.low is not None and p.high is not None:
            if isinstance(p.default, int) and not isinstance(p.default, bool):
                desc.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=0)]
            else:
                desc.floating_point_range = [FloatingPointRange(from_value=float(p.low),
                                                                to_value=float(p.high), step=0.0)]
        node.declare_parameter(p.name, p.default, desc)
    return {p.name: node.get_parameter(p.name).value for p in params}
