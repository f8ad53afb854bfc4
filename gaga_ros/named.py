"""Named expressions and look_at: a face API that robots and agents can speak.

A `NamedCommand` holds ARKit-52 blendshape weights (gaga_ros.blendshapes.NAMES) and a head turn;
a `LookAt` names a point for the eyes (and, past EYE_LIMIT, the head) to turn to. `FaceMixer` holds
the newest command of each layer and the newest look_at and combines them with the live driver:

- With a live driver, each live expression gets the overlay added: MESH mode adds the named fields to
  its vertices; FLAME mode adds jawOpen to the jaw pose and the eyeLook* names to the eye poses (the
  other names need MESH); the head turn is applied in the head's own frame before the live pose.
- Without one (no live expression for LIVE_TIMEOUT_S), `idle()` gives the neutral face with the
  overlay, so frames keep coming while a command holds and fades, ending on one neutral frame.
- A command ramps in over ATTACK_S from what was shown (over the time since the previous command on
  its layer when that is shorter: a stream of commands, like the voice's 60 a second, is followed,
  not smoothed once more), holds for its hold_s (counted from its arrival), then fades to nothing
  over FADE_S. Commands go on layers, the default one and at most MAX_LAYERS named ones: a newer
  command replaces the older one on its own layer, and the layers add, so the voice's mouth (layer
  "voice", gaga_ros.voice) never erases a robot's smile on the default layer. A look_at
  replaces the previous look_at the same way and adds to the commands.

Bad input raises NamedError (a ValueError, so node guards log, count and report it) and leaves the
mixer as it was: the face keeps following its other drivers.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from gaga_ros.blendshapes import EYE_LOOK_MAX, JAW_OPEN, NAMES, displacement, eye_angles, head_rotation
from gaga_ros.camera import frontal_transform
from gaga_ros.errors import InputError
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES

#: Hold of a command that gives none (hold_s 0), and the longest accepted (longer is clamped): a
#: robot that wants a face held longer repeats the command.
DEFAULT_HOLD_S, MAX_HOLD_S = 1.0, 10.0
#: Ramp from what was shown to a new command, and the fade back after its hold: short enough to
#: read as a reaction, long enough not to jump.
ATTACK_S, FADE_S = 0.1, 0.3
#: Largest head rotation a command or a look_at adds, per axis, radians (40 degrees): more would
#: show the back of the head.
MAX_HEAD = math.radians(40.0)
#: The eyes turn up to EYE_LIMIT toward a look_at target; the head turns for the rest.
EYE_LIMIT = math.radians(15.0)
#: A live driver counts as gone when its last expression is older than this (a 30 fps driver that
#: stalls for 15 frames): then idle() shows the overlay on the neutral face.
LIVE_TIMEOUT_S = 0.5
#: How long a look_at holds before the eyes return (a robot tracking a person repeats it).
DEFAULT_LOOK_HOLD_S = 2.0
#: Named layers of commands held at once besides the default one "" (which is never refused), and
#: the longest layer name: a layer is a source of commands (a behaviour, the voice), not a
#: per-command id.
MAX_LAYERS, MAX_LAYER_NAME = 8, 32
#: Fields of the JSON form (bridge POST /expression and data channel).
JSON_FIELDS = ("named", "head", "hold_s", "look_at", "layer")
HEAD_AXES = ("yaw", "pitch", "roll")


class NamedError(InputError):
    """A named command or look_at that cannot be used; the message says what is accepted."""


def _clamp(value: float, limit: float) -> float:
    return max(-limit, min(limit, value))


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise NamedError(f"{name} {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise NamedError(f"{name} is {value}: accepted are finite numbers")
    return value


@dataclass(frozen=True)
class Pose:
    """What an overlay adds to a face: blendshape weights and head angles (radians)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0

    def blend(self, other: Pose, a: float) -> Pose:
        """(1 - a) self + a other."""
        names = set(self.weights) | set(other.weights)
        return Pose({n: (1 - a) * self.weights.get(n, 0.0) + a * other.weights.get(n, 0.0) for n in names},
                    *((1 - a) * getattr(self, k) + a * getattr(other, k) for k in HEAD_AXES))

    def __add__(self, other: Pose) -> Pose:
        """Both together, each weight at most 1 and each head angle within +-MAX_HEAD."""
        names = set(self.weights) | set(other.weights)
        return Pose({n: min(1.0, self.weights.get(n, 0.0) + other.weights.get(n, 0.0)) for n in names},
                    *(_clamp(getattr(self, k) + getattr(other, k), MAX_HEAD) for k in HEAD_AXES))

    @property
    def empty(self) -> bool:
        return not any(self.weights.values()) and not (self.yaw or self.pitch or self.roll)


@dataclass(frozen=True)
class NamedCommand:
    """A validated command: weights clamped to [0, 1], head angles to +-MAX_HEAD, hold to MAX_HOLD_S."""

    pose: Pose
    hold_s: float = DEFAULT_HOLD_S
    layer: str = ""

    @classmethod
    def parse(cls, weights: Mapping[str, float], yaw: float = 0.0, pitch: float = 0.0,
              roll: float = 0.0, hold_s: float = 0.0, layer: str = "") -> NamedCommand:
        """Validate and clamp; raise NamedError for unknown names, NaN/inf, a negative hold or a bad
        layer name."""
        unknown = sorted(set(weights) - set(NAMES))
        if unknown:
            raise NamedError(f"unknown expression names {unknown}: accepted are {list(NAMES)}")
        clean = {n: min(1.0, max(0.0, _finite(f"weight of {n}", w))) for n, w in weights.items()}
        head = [_clamp(_finite(k, v), MAX_HEAD) for k, v in zip(HEAD_AXES, (yaw, pitch, roll), strict=True)]
        hold = _finite("hold_s", hold_s)
        if hold < 0:
            raise NamedError(f"hold_s {hold:g}: accepted is 0 (the default, {DEFAULT_HOLD_S:g} s) to "
                             f"{MAX_HOLD_S:g} s")
        return cls(Pose(clean, *head), min(hold, MAX_HOLD_S) if hold > 0 else DEFAULT_HOLD_S,
                   _layer_name(layer))

    @classmethod
    def from_lists(cls, names: list[str], weights, yaw: float = 0.0, pitch: float = 0.0,
                   roll: float = 0.0, hold_s: float = 0.0, layer: str = "") -> NamedCommand:
        """From the message's parallel names[] and weights[]; a name given twice is refused."""
        names, weights = list(names), [float(w) for w in weights]
        if len(names) != len(weights):
            raise NamedError(f"{len(names)} names but {len(weights)} weights: accepted is one weight "
                             "per name")
        if len(set(names)) != len(names):
            raise NamedError(f"a name is given twice in {names}: accepted is each name once")
        return cls.parse(dict(zip(names, weights, strict=True)), yaw, pitch, roll, hold_s, layer)


def _layer_name(layer) -> str:
    if not isinstance(layer, str) or len(layer) > MAX_LAYER_NAME or not layer.isprintable():
        raise NamedError(f"layer {layer!r}: accepted is a printable name of at most {MAX_LAYER_NAME} "
                         'characters, e.g. "voice", or empty for the default layer')
    return layer


@dataclass(frozen=True)
class LookAt:
    """A look_at target: a point in the display frame (metres) or a point on the display (u, v)."""

    point: tuple[float, float, float] | None = None
    uv: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if (self.point is None) == (self.uv is None):
            raise NamedError("look_at needs either a point (x, y, z metres in the display frame) or "
                             "u, v (fractions of the display)")
        if self.uv is not None:
            u, v = (_finite(k, x) for k, x in zip("uv", self.uv, strict=True))
            if not (0.0 <= u <= 1.0 and 0.0 <= v <= 1.0):
                raise NamedError(f"look_at u, v = {u:g}, {v:g} is off the display: accepted are "
                                 "fractions in [0, 1] (u from the left edge, v from the top edge)")
            object.__setattr__(self, "uv", (u, v))
        elif self.point is not None:  # always, since exactly one of the two is given
            x, y, z = (_finite(k, c) for k, c in zip("xyz", self.point, strict=True))
            if z < 0:
                raise NamedError(f"look_at point z = {z:g} m is behind the display: accepted are "
                                 "points with z >= 0 (z points out of the screen toward the viewer)")
            object.__setattr__(self, "point", (x, y, z))


def check_frame(frame_id: str, display_frame: str) -> None:
    """A look_at point must be in the display frame (this package does no tf lookups)."""
    if frame_id not in ("", display_frame):
        raise NamedError(f"look_at frame {frame_id!r}: accepted is {display_frame!r} (x right, y up, "
                         "z toward the viewer, metres, origin at the display's centre) or empty")


@dataclass(frozen=True)
class Display:
    """Where the face is shown. The display frame has its origin at the screen's centre, x to the
    viewer's right, y up, z out of the screen toward the viewer, metres; the avatar's eyes are taken
    to sit eye_depth_m behind the screen's centre, as a head seen through a window."""

    width_m: float = 0.30
    height_m: float = 0.30
    eye_depth_m: float = 0.30

    def point(self, target: LookAt) -> np.ndarray:
        """The target as a point in the display frame (u, v lie on the screen, z = 0)."""
        if target.uv is not None:
            u, v = target.uv
            return np.array([(u - 0.5) * self.width_m, (0.5 - v) * self.height_m, 0.0])
        return np.array(target.point, np.float64)

    def pose(self, target: LookAt) -> Pose:
        """Eyes toward the target up to EYE_LIMIT per axis, the head turned for the rest (bounded)."""
        d = self.point(target) + np.array([0.0, 0.0, self.eye_depth_m])
        yaw = math.atan2(d[0], d[2])
        pitch = math.atan2(d[1], math.hypot(d[0], d[2]))
        eye_yaw, eye_pitch = _clamp(yaw, EYE_LIMIT), _clamp(pitch, EYE_LIMIT)
        head_yaw, head_pitch = _clamp(yaw - eye_yaw, MAX_HEAD), _clamp(pitch - eye_pitch, MAX_HEAD)
        h, v = eye_yaw / EYE_LOOK_MAX, eye_pitch / EYE_LOOK_MAX
        weights = {"eyeLookOutLeft": max(h, 0.0), "eyeLookInRight": max(h, 0.0),
                   "eyeLookInLeft": max(-h, 0.0), "eyeLookOutRight": max(-h, 0.0),
                   "eyeLookUpLeft": max(v, 0.0), "eyeLookUpRight": max(v, 0.0),
                   "eyeLookDownLeft": max(-v, 0.0), "eyeLookDownRight": max(-v, 0.0)}
        return Pose(weights, head_yaw, head_pitch, 0.0)


def parse_json(payload: Mapping) -> tuple[NamedCommand | None, LookAt | None]:
    """The JSON form: {"named": {name: weight}, "head": {"yaw", "pitch", "roll"}, "hold_s": s,
    "layer": name, "look_at": {"u", "v"} or {"x", "y", "z"}}; every field optional, at least one of
    them but "layer" given; "layer" goes with a command (named, head or hold_s)."""
    unknown = sorted(set(payload) - set(JSON_FIELDS))
    if unknown:
        raise NamedError(f"unknown fields {unknown}: accepted are {list(JSON_FIELDS)}")
    content = [k for k in JSON_FIELDS if k != "layer"]
    if not any(k in payload for k in content):
        raise NamedError(f"a named expression needs one of {content}")
    named, head = payload.get("named", {}), payload.get("head", {})
    if not isinstance(named, dict) or not isinstance(head, dict):
        raise NamedError('named and head must be JSON objects, e.g. {"named": {"jawOpen": 0.5}, '
                         '"head": {"yaw": 0.2}}')
    bad_axes = sorted(set(head) - set(HEAD_AXES))
    if bad_axes:
        raise NamedError(f"unknown head angles {bad_axes}: accepted are {list(HEAD_AXES)} (radians)")
    command = None
    if "named" in payload or "head" in payload or "hold_s" in payload:
        yaw, pitch, roll = (head.get(k, 0.0) for k in HEAD_AXES)
        command = NamedCommand.parse(named, yaw, pitch, roll, hold_s=payload.get("hold_s", 0.0),
                                     layer=payload.get("layer", ""))
    elif "layer" in payload:
        raise NamedError('"layer" goes with a command: give "named", "head" or "hold_s" with it')
    look = None
    if "look_at" in payload:
        spec = payload["look_at"]
        if not isinstance(spec, dict) or set(spec) not in ({"u", "v"}, {"x", "y", "z"}):
            raise NamedError('look_at: accepted is {"u": .., "v": ..} (fractions of the display) or '
                             '{"x": .., "y": .., "z": ..} (metres in the display frame)')
        look = LookAt(uv=(spec["u"], spec["v"])) if "u" in spec else LookAt(
            point=(spec["x"], spec["y"], spec["z"]))
    return command, look


def apply_pose(expr: Expression, pose: Pose) -> Expression:
    """`expr` with `pose` added (see the module's combination rule); `expr` itself is unchanged."""
    if pose.empty:
        return expr
    weights = {n: w for n, w in pose.weights.items() if w}
    head = head_rotation(pose.yaw, pose.pitch, pose.roll)
    transform = expr.transform.copy()
    transform[:, :3] = head.T @ transform[:, :3]  # x_cam = (x head^T) R: turned in the head's frame
    vertices, jaw, eyes = expr.vertices, expr.jaw_pose, expr.eye_pose
    if expr.face_model is FaceModel.MESH:
        vertices = expr.vertices + displacement(weights)
    else:
        jaw = jaw + np.array([JAW_OPEN * weights.get("jawOpen", 0.0), 0, 0], np.float32)
        ly, lp, ry, rp = eye_angles(weights)
        eyes = eyes + np.array([-lp, ly, 0, -rp, ry, 0], np.float32)  # axis-angle: pitch about -x
    return Expression(expr.face_model, transform=transform, stamp_ns=expr.stamp_ns,
                      frame_id=expr.frame_id, expression=expr.expression, jaw_pose=jaw,
                      neck_pose=expr.neck_pose, eye_pose=eyes, vertices=vertices,
                      confidence=expr.confidence)


def neutral(stamp_ns: int = 0) -> Expression:
    """The canonical neutral face, frontal (what a named command starts from with no live driver)."""
    return Expression(FaceModel.MESH, transform=frontal_transform(), stamp_ns=stamp_ns,
                      vertices=CANONICAL_VERTICES)


@dataclass
class _Ramp:
    """One overlay: ramps from `start` to `target` over `attack` from `t0`, holds until t0 + hold,
    then fades out over FADE_S."""

    start: Pose
    target: Pose
    t0: float
    hold: float
    attack: float = ATTACK_S

    def at(self, t: float) -> Pose:
        a = min(1.0, max(0.0, (t - self.t0) / self.attack)) if self.attack > 0 else 1.0
        fade = min(1.0, max(0.0, (t - self.t0 - self.hold) / FADE_S))
        return Pose().blend(self.start.blend(self.target, a), 1.0 - fade)

    def end(self) -> float:
        return self.t0 + self.hold + FADE_S


class FaceMixer:
    """The newest command of each layer and the newest look_at, combined with the live driver;
    `clock()` gives seconds.

    Thread-safe: commands arrive on subscription threads while frames are made on others.
    """

    def __init__(self, clock: Callable[[], float], display: Display | None = None,
                 look_hold_s: float = DEFAULT_LOOK_HOLD_S) -> None:
        self.clock = clock
        self.display = display or Display()
        self.look_hold_s = float(look_hold_s)
        self._lock = threading.Lock()
        self._commands: dict[str, _Ramp] = {}
        self._look: _Ramp | None = None
        self._last_live = -math.inf
        self._settled = True  # idle() has shown the neutral face after the last overlay

    def command(self, command: NamedCommand) -> None:
        """Replace the command on its layer (ramping from what that layer shows now); raise
        NamedError, changing nothing, when it would be a named layer beyond MAX_LAYERS."""
        with self._lock:
            t = self.clock()
            self._commands = {k: r for k, r in self._commands.items() if t < r.end()}
            previous = self._commands.get(command.layer)
            named = sorted(k for k in self._commands if k)
            if previous is None and command.layer and len(named) >= MAX_LAYERS:
                raise NamedError(f"layer {command.layer!r} refused: {MAX_LAYERS} named layers are in use "
                                 f"({named}); accepted are commands on those layers or on the default "
                                 "layer (empty), or a new layer once one of them has faded out")
            start, attack = Pose(), ATTACK_S
            if previous is not None:
                start, attack = previous.at(t), min(ATTACK_S, t - previous.t0)
            self._commands[command.layer] = _Ramp(start, command.pose, t, command.hold_s, attack)
            self._settled = False

    def look_at(self, target: LookAt) -> None:
        """Replace the current look_at target."""
        pose = self.display.pose(target)
        with self._lock:
            t = self.clock()
            start = self._look.at(t) if self._look is not None else Pose()
            self._look = _Ramp(start, pose, t, self.look_hold_s)
            self._settled = False

    def overlay(self, t: float | None = None) -> Pose:
        """What the commands and the look_at add at time t (now by default)."""
        with self._lock:
            return self._overlay(self.clock() if t is None else t)

    def _ramps(self) -> list[_Ramp]:
        return [*self._commands.values(), *([self._look] if self._look is not None else [])]

    def _overlay(self, t: float) -> Pose:
        pose = Pose()
        for ramp in self._ramps():
            if t < ramp.end():
                pose = pose + ramp.at(t)
        return pose

    def apply(self, live: Expression) -> Expression:
        """A live driver's expression with the overlay added; marks the driver live."""
        with self._lock:
            t = self.clock()
            self._last_live = t
            pose = self._overlay(t)
        return apply_pose(live, pose)

    def idle(self) -> Expression | None:
        """Without a live driver: the neutral face with the overlay while one is active, then one
        neutral frame; None when there is nothing new to show or a live driver carries the overlay."""
        with self._lock:
            t = self.clock()
            if t - self._last_live < LIVE_TIMEOUT_S:
                return None
            active = any(t < ramp.end() for ramp in self._ramps())
            if not active:
                if self._settled:
                    return None
                self._settled = True
            pose = self._overlay(t)
        return apply_pose(neutral(int(t * 1e9)), pose)
