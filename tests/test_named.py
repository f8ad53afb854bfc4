"""Named expressions and look_at: the core rules (exact, on an injected clock), pixels of the real
geometric avatar, and the ROS topic and bridge paths through the real nodes."""

from __future__ import annotations

import asyncio
import json
import math
import time

import cv2
import numpy as np
import pytest

from gaga_ros.blendshapes import (
    EYE_LOOK_MAX,
    JAW_OPEN,
    MIDLINE_BLEND,
    NAMES,
    displacement,
    fields,
    head_rotation,
)
from gaga_ros.camera import Camera
from gaga_ros.driver import ScriptedDriver
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.faces.mediapipe_mesh import CANONICAL_VERTICES, REGIONS
from gaga_ros.named import (
    ATTACK_S,
    DEFAULT_HOLD_S,
    EYE_LIMIT,
    FADE_S,
    LIVE_TIMEOUT_S,
    MAX_HEAD,
    MAX_HOLD_S,
    MAX_LAYER_NAME,
    MAX_LAYERS,
    Display,
    FaceMixer,
    LookAt,
    NamedCommand,
    NamedError,
    apply_pose,
    check_frame,
    neutral,
    parse_json,
)

SIZE = 256


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ---- core: validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"weights": {"smile": 1.0}}, ["unknown expression names ['smile']", "mouthSmileLeft",
                                   "eyeBlinkRight"]),
    ({"weights": {"jawOpen": math.nan}}, ["jawOpen", "finite"]),
    ({"weights": {"jawOpen": math.inf}}, ["jawOpen", "finite"]),
    ({"weights": {"jawOpen": "wide"}}, ["not a number"]),
    ({"weights": {}, "yaw": math.nan}, ["yaw", "finite"]),
    ({"weights": {}, "hold_s": -1.0}, ["hold_s", "accepted"]),
])
def test_bad_commands_are_refused_with_what_is_accepted(kwargs, words):
    with pytest.raises(NamedError) as err:
        NamedCommand.parse(**kwargs)
    assert isinstance(err.value, ValueError)  # node guards log, count and report ValueErrors
    for word in words:
        assert word in str(err.value)


def test_out_of_range_values_are_clamped():
    cmd = NamedCommand.parse({"jawOpen": 1.7, "eyeBlinkLeft": -0.3}, yaw=3.0, pitch=-3.0, hold_s=99.0)
    assert cmd.pose.weights == {"jawOpen": 1.0, "eyeBlinkLeft": 0.0}
    assert (cmd.pose.yaw, cmd.pose.pitch) == (MAX_HEAD, -MAX_HEAD)
    assert cmd.hold_s == MAX_HOLD_S
    assert NamedCommand.parse({}).hold_s == DEFAULT_HOLD_S


def test_message_lists_must_pair_up():
    with pytest.raises(NamedError, match="2 names but 1 weights"):
        NamedCommand.from_lists(["jawOpen", "mouthClose"], [0.5])
    with pytest.raises(NamedError, match="twice"):
        NamedCommand.from_lists(["jawOpen", "jawOpen"], [0.5, 0.2])


def test_json_form():
    cmd, look = parse_json({"named": {"mouthSmileLeft": 0.8, "mouthSmileRight": 0.8, "eyeBlinkLeft": 1.0},
                            "head": {"yaw": 0.2}, "hold_s": 1.5})
    assert look is None and cmd.hold_s == 1.5 and cmd.pose.yaw == pytest.approx(0.2)
    assert cmd.pose.weights["mouthSmileLeft"] == pytest.approx(0.8)
    cmd, look = parse_json({"look_at": {"u": 0.8, "v": 0.5}})
    assert cmd is None and look.uv == (0.8, 0.5)
    for body, word in [({"named": {"grin": 1}}, "jawOpen"), ({"face": 1}, "accepted are"),
                       ({"head": {"tilt": 1}}, "yaw"), ({"named": [1]}, "JSON objects"),
                       ({"look_at": {"u": 0.5}}, "look_at"),
                       ({"look_at": {"x": 0, "y": 0, "z": -1}}, "behind"),
                       ({"look_at": {"u": 1.5, "v": 0.5}}, "off the display")]:
        with pytest.raises(NamedError, match=word):
            parse_json(body)


def test_look_at_refusals():
    with pytest.raises(NamedError, match="behind the display"):
        LookAt(point=(0.0, 0.0, -0.2))
    with pytest.raises(NamedError, match="finite"):
        LookAt(point=(math.nan, 0.0, 1.0))
    with pytest.raises(NamedError, match="'display'"):
        check_frame("base_link", "display")
    check_frame("", "display")
    check_frame("display", "display")


# ---- core: fields and the combination rule ------------------------------------------------------

def test_every_name_has_a_local_field():
    table = fields()
    assert set(table) == set(NAMES)
    for name, field in table.items():
        moved = np.abs(field).max(1) > 1e-4
        assert field.shape == (478, 3) and 0 < moved.sum() < 300, name  # jawOpen: the lower face
        if name.endswith(("Left", "Right")):  # one side: the other half stays put past the midline
            x = CANONICAL_VERTICES[:, 0] * (1 if name.endswith("Left") else -1)
            assert not np.abs(field[x <= -MIDLINE_BLEND]).any(), name


def test_driver_performs_with_the_same_fields():
    driver = ScriptedDriver()
    w = driver.weights(4.0)  # the smile segment
    expected = CANONICAL_VERTICES + displacement({
        "jawOpen": w["jaw"] / JAW_OPEN, "mouthSmileLeft": w["smile"], "mouthSmileRight": w["smile"],
        "eyeBlinkLeft": w["blink"], "eyeBlinkRight": w["blink"]})
    np.testing.assert_allclose(driver.expression_at(4.0).vertices, expected, atol=1e-6)


def test_command_ramps_holds_fades_and_is_replaced():
    clock = Clock()
    mixer = FaceMixer(clock)
    t0 = clock.t
    mixer.command(NamedCommand.parse({"mouthSmileLeft": 0.8}, yaw=0.2, hold_s=1.0))
    expect = {0.0: 0.0, ATTACK_S / 2: 0.4, ATTACK_S: 0.8, 1.0: 0.8, 1.0 + FADE_S / 2: 0.4, 1.0 + FADE_S: 0.0}
    for dt, w in expect.items():
        pose = mixer.overlay(t0 + dt)
        assert pose.weights.get("mouthSmileLeft", 0.0) == pytest.approx(w), dt
        assert pose.yaw == pytest.approx(0.2 * w / 0.8), dt
    # A newer command replaces the older one, ramping from what is shown now.
    clock.t = t0 + 0.5
    mixer.command(NamedCommand.parse({"eyeBlinkLeft": 1.0}, hold_s=0.5))
    half = mixer.overlay(clock.t + ATTACK_S / 2)
    assert half.weights["mouthSmileLeft"] == pytest.approx(0.4)
    assert half.weights["eyeBlinkLeft"] == pytest.approx(0.5)
    assert mixer.overlay(clock.t + ATTACK_S).weights["mouthSmileLeft"] == pytest.approx(0.0)
    assert mixer.overlay(clock.t + 0.5 + FADE_S).empty


def test_layers_add_and_a_command_replaces_only_its_own_layer():
    clock = Clock()
    mixer = FaceMixer(clock)
    t0 = clock.t
    mixer.command(NamedCommand.parse({"mouthSmileLeft": 0.8, "jawOpen": 0.2}, yaw=0.1, hold_s=5.0))
    mixer.command(NamedCommand.parse({"jawOpen": 0.5}, hold_s=0.2, layer="voice"))
    pose = mixer.overlay(t0 + ATTACK_S)
    assert pose.weights["mouthSmileLeft"] == pytest.approx(0.8)  # the voice did not erase the smile
    assert pose.weights["jawOpen"] == pytest.approx(0.7) and pose.yaw == pytest.approx(0.1)
    clock.t = t0 + ATTACK_S
    mixer.command(NamedCommand.parse({"jawOpen": 0.1}, hold_s=0.2, layer="voice"))  # replaces the voice's
    pose = mixer.overlay(clock.t + ATTACK_S)
    assert pose.weights["jawOpen"] == pytest.approx(0.3)
    assert pose.weights["mouthSmileLeft"] == pytest.approx(0.8)
    # The voice fades out by itself; the default layer holds on.
    pose = mixer.overlay(clock.t + 0.2 + FADE_S)
    assert pose.weights["jawOpen"] == pytest.approx(0.2)
    assert pose.weights["mouthSmileLeft"] == pytest.approx(0.8)
    # Weights that add past 1 are clamped to 1.
    mixer.command(NamedCommand.parse({"mouthSmileLeft": 0.9}, layer="greeting"))
    assert mixer.overlay(clock.t + ATTACK_S).weights["mouthSmileLeft"] == 1.0


def test_a_stream_of_commands_is_followed_within_one_interval():
    """Commands 30 times a second (the voice's) each ramp over the interval since the previous one,
    not over ATTACK_S: the face reaches each target as the next one arrives."""
    clock = Clock()
    mixer = FaceMixer(clock)
    step = 1 / 30
    targets = [0.0, 0.6, 0.1, 0.5, 0.5, 0.0]
    for target in targets:
        mixer.command(NamedCommand.parse({"jawOpen": target}, hold_s=0.15, layer="voice"))
        clock.t += step
        assert mixer.overlay().weights["jawOpen"] == pytest.approx(target)
    # A lone command after a pause ramps over ATTACK_S again.
    clock.t += 1.0
    mixer.command(NamedCommand.parse({"jawOpen": 0.8}, layer="voice"))
    assert mixer.overlay(clock.t + ATTACK_S / 2).weights["jawOpen"] == pytest.approx(0.4)


def test_a_ninth_named_layer_is_refused_until_one_fades():
    clock = Clock()
    mixer = FaceMixer(clock)
    for i in range(1, MAX_LAYERS + 1):
        mixer.command(NamedCommand.parse({"browInnerUp": 0.1}, hold_s=0.5 * i, layer=f"l{i}"))
    before = mixer.overlay(clock.t + ATTACK_S)
    with pytest.raises(NamedError) as err:
        mixer.command(NamedCommand.parse({"jawOpen": 1.0}, layer="extra"))
    assert isinstance(err.value, ValueError)
    assert f"{MAX_LAYERS} named layers are in use" in str(err.value) and "'l8'" in str(err.value)
    assert mixer.overlay(clock.t + ATTACK_S) == before  # the refused command changed nothing
    mixer.command(NamedCommand.parse({"browInnerUp": 0.2}, layer="l3"))  # a layer in use is fine
    mixer.command(NamedCommand.parse({"mouthSmileLeft": 0.5}))  # and so is the default layer, always
    assert mixer.overlay(clock.t + ATTACK_S).weights["mouthSmileLeft"] == pytest.approx(0.5)
    clock.t += 0.5 + FADE_S + 0.01  # l1's command has faded out: its place is free
    mixer.command(NamedCommand.parse({"jawOpen": 1.0}, layer="extra"))
    assert mixer.overlay(clock.t + ATTACK_S).weights["jawOpen"] == pytest.approx(1.0)


@pytest.mark.parametrize("layer, word", [("x" * (MAX_LAYER_NAME + 1), "at most"), ("a\nb", "printable"),
                                         (3, "printable")])
def test_bad_layer_names_are_refused(layer, word):
    with pytest.raises(NamedError, match=word):
        NamedCommand.parse({"jawOpen": 0.5}, layer=layer)
    with pytest.raises(NamedError, match=word):
        parse_json({"named": {"jawOpen": 0.5}, "layer": layer})


def test_layer_in_json_and_in_the_message():
    from gaga_ros.nodes.expression_msg import named_from_msg, named_to_msg

    cmd, look = parse_json({"named": {"jawOpen": 0.4}, "layer": "voice", "hold_s": 0.2})
    assert cmd.layer == "voice" and look is None
    assert parse_json({"named": {"jawOpen": 0.4}})[0].layer == ""
    with pytest.raises(NamedError, match='"layer" goes with a command'):
        parse_json({"look_at": {"u": 0.5, "v": 0.5}, "layer": "voice"})
    with pytest.raises(NamedError, match="needs one of"):
        parse_json({"layer": "voice"})
    back = named_from_msg(named_to_msg(cmd, stamp=named_msg([], []).header.stamp))
    assert back.layer == "voice" and back.hold_s == pytest.approx(0.2)
    assert back.pose.weights["jawOpen"] == pytest.approx(0.4)  # float32 on the wire


def test_alone_frames_come_while_holding_and_fading_then_one_neutral():
    clock = Clock()
    mixer = FaceMixer(clock)
    assert mixer.idle() is None  # nothing to show
    mixer.command(NamedCommand.parse({"jawOpen": 1.0}, hold_s=0.5))
    shown = []
    for _ in range(40):  # 30 Hz for 1.33 s
        clock.t += 1 / 30
        expr = mixer.idle()
        if expr is not None:
            shown.append((clock.t, expr))
    ends = [t for t, _ in shown]
    assert ends[-1] >= 100.0 + 0.5 + FADE_S and len(shown) == int((0.5 + FADE_S) * 30) + 1
    np.testing.assert_array_equal(shown[-1][1].vertices, CANONICAL_VERTICES)  # back to neutral
    mid = shown[len(shown) // 3][1]
    np.testing.assert_allclose(mid.vertices, CANONICAL_VERTICES + displacement({"jawOpen": 1.0}),
                               atol=1e-6)
    assert mid.face_model is FaceModel.MESH
    assert mid.stamp_ns == int(shown[len(shown) // 3][0] * 1e9)


def test_added_on_top_of_the_live_driver():
    clock = Clock()
    mixer = FaceMixer(clock)
    live = ScriptedDriver().expression_at(11.0)  # speaking and turned
    mixer.command(NamedCommand.parse({"mouthSmileRight": 1.0}, yaw=0.1, pitch=-0.05, roll=0.02))
    clock.t += ATTACK_S
    out = mixer.apply(live)
    np.testing.assert_allclose(out.vertices, live.vertices + displacement({"mouthSmileRight": 1.0}),
                               atol=1e-6)
    head = head_rotation(0.1, -0.05, 0.02)
    np.testing.assert_allclose(out.transform[:, :3], head.T @ live.transform[:, :3], atol=1e-6)
    np.testing.assert_array_equal(out.transform[:, 3], live.transform[:, 3])
    assert out.stamp_ns == live.stamp_ns
    # While the driver is live the overlay rides on its frames; idle() shows nothing of its own.
    clock.t += LIVE_TIMEOUT_S / 2
    assert mixer.idle() is None
    clock.t += LIVE_TIMEOUT_S
    assert mixer.idle() is not None  # the driver went quiet: the overlay on the neutral face


def test_flame_live_gets_jaw_and_eyes():
    clock = Clock()
    mixer = FaceMixer(clock)
    live = Expression(FaceModel.FLAME, jaw_pose=np.array([0.05, 0, 0]))
    mixer.command(NamedCommand.parse({"jawOpen": 0.5, "eyeLookOutLeft": 1.0, "eyeLookUpRight": 0.5}))
    clock.t += ATTACK_S
    out = mixer.apply(live)
    assert out.face_model is FaceModel.FLAME and out.vertices is None
    np.testing.assert_allclose(out.jaw_pose, [0.05 + 0.5 * JAW_OPEN, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out.eye_pose, [0, EYE_LOOK_MAX, 0, -0.5 * EYE_LOOK_MAX, 0, 0], atol=1e-6)


def test_look_at_turns_eyes_then_head_bounded():
    display = Display(width_m=0.3, height_m=0.3, eye_depth_m=0.3)
    small = display.pose(LookAt(uv=(0.6, 0.5)))  # 5.7 degrees right: the eyes alone
    angle = math.atan2(0.03, 0.3)
    assert small.weights["eyeLookOutLeft"] == pytest.approx(angle / EYE_LOOK_MAX)
    assert small.weights["eyeLookInRight"] == pytest.approx(angle / EYE_LOOK_MAX)
    assert small.yaw == 0.0 and small.pitch == 0.0
    far = display.pose(LookAt(point=(-1.0, 0.0, 0.7)))  # 50 degrees left: eyes at the limit, head the rest
    assert far.weights["eyeLookInLeft"] == pytest.approx(EYE_LIMIT / EYE_LOOK_MAX)
    assert far.yaw == pytest.approx(-(math.atan2(1.0, 1.0) - EYE_LIMIT))
    up = display.pose(LookAt(point=(0.0, 5.0, 0.0)))  # straight up the screen: bounded
    assert up.pitch == MAX_HEAD and up.weights["eyeLookUpLeft"] == pytest.approx(EYE_LIMIT / EYE_LOOK_MAX)


def test_look_at_and_command_add():
    clock = Clock()
    mixer = FaceMixer(clock, look_hold_s=5.0)
    mixer.command(NamedCommand.parse({"eyeBlinkLeft": 1.0}, yaw=0.3))
    mixer.look_at(LookAt(point=(-1.0, 0.0, 0.7)))
    pose = mixer.overlay(clock.t + ATTACK_S)
    assert pose.weights["eyeBlinkLeft"] == pytest.approx(1.0) and pose.weights["eyeLookInLeft"] > 0
    assert pose.yaw == pytest.approx(0.3 - (math.atan2(1.0, 1.0) - EYE_LIMIT))
    assert mixer.overlay(clock.t + 2.0).weights["eyeLookInLeft"] > 0  # the look holds longer


# ---- pixels of the real geometric avatar --------------------------------------------------------

@pytest.fixture(scope="module")
def rendered():
    """A function rendering the astronaut's geometric avatar with a pose; and the avatar."""
    import torch

    from gaga_ros.avatar.geometric import GeometricAvatar
    from gaga_ros.source import default_source

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = GeometricAvatar(raster_backend="cpu")
    avatar = backend.reconstruct(default_source())

    def render(expr: Expression) -> np.ndarray:
        return backend.render(avatar, expr, SIZE).astype(np.float64)

    yield render, avatar
    torch.set_num_threads(threads)


def hull(avatar, indices: np.ndarray, grow: int, field: np.ndarray | None = None) -> np.ndarray:
    """Pixels inside the grown convex hull of the source's landmarks `indices`, from its camera;
    with `field`, of the landmarks both where they are and where the field moves them."""
    from gaga_ros.avatar.geometric import face_size

    cam = Camera.from_transform(avatar.source_transform, SIZE)
    points = avatar.neutral_vertices.numpy()[indices]
    if field is not None:
        scale = face_size(avatar.neutral_vertices.numpy()) / face_size(CANONICAL_VERTICES)
        points = np.r_[points, points + scale * field[indices]]
    xy = cam.project(points)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.fillConvexPoly(mask, cv2.convexHull(xy.astype(np.int32)), 1)
    return cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)


def eye(side: str) -> np.ndarray:
    return np.r_[REGIONS[f"{side}_eye_upper"], REGIONS[f"{side}_eye_lower"]]


@pytest.mark.parametrize("name", ["mouthSmileLeft", "mouthFrownRight", "eyeBlinkLeft", "browDownRight",
                                  "browInnerUp", "mouthPucker", "eyeLookUpRight",
                                  "eyeLookOutLeft", "jawOpen"])
def test_a_name_changes_its_region_and_nothing_else(rendered, name):
    render, avatar = rendered
    base = render(neutral())
    diff = np.abs(render(apply_pose(neutral(), NamedCommand.parse({name: 1.0}).pose)) - base).max(2)
    moving = np.flatnonzero(np.abs(fields()[name]).max(1) > 2e-3)
    region = hull(avatar, moving, grow=6, field=fields()[name])
    changed = diff > 25
    assert changed[region].sum() >= 15, f"{name}: only {changed[region].sum()} pixels changed in its region"
    assert changed[~region].sum() <= 3, f"{name}: {changed[~region].sum()} pixels changed outside its region"


def test_left_is_the_faces_own_left(rendered):
    """mouthSmileLeft moves the corner the viewer sees on the right, not the eyes or the other corner."""
    render, avatar = rendered
    base = render(neutral())
    diff = np.abs(render(apply_pose(neutral(), NamedCommand.parse({"mouthSmileLeft": 1.0}).pose)) - base)
    diff = diff.mean(2)
    corners = {"left": 291 if CANONICAL_VERTICES[291, 0] > 0 else 61}
    corners["right"] = 61 if corners["left"] == 291 else 291
    cam = Camera.from_transform(avatar.source_transform, SIZE)
    xy = {k: cam.project(avatar.neutral_vertices.numpy()[[i]])[0] for k, i in corners.items()}
    assert xy["left"][0] > SIZE / 2 > xy["right"][0]  # the face's left is on the image's right
    near = {k: hull(avatar, np.array([i]), grow=10) for k, i in corners.items()}
    eyes = hull(avatar, eye("left"), 3) | hull(avatar, eye("right"), 3)
    assert diff[near["left"]].mean() > 8.0 > 1.0 > diff[near["right"]].mean()
    assert diff[eyes].mean() < 0.5
    blink = np.abs(render(apply_pose(neutral(), NamedCommand.parse({"eyeBlinkLeft": 1.0}).pose)) - base)
    blink = blink.mean(2)
    assert blink[hull(avatar, eye("left"), 2)].mean() > 10.0
    assert blink[hull(avatar, eye("right"), 2)].mean() < 0.5


def iris_x(image: np.ndarray, mask: np.ndarray) -> float:
    """Column of the darkness-weighted centroid inside `mask`: where the iris is."""
    dark = np.clip(1.0 - image.mean(2) / 255.0, 0, 1) ** 4 * mask
    return float((dark.sum(0) * np.arange(SIZE)).sum() / dark.sum())


def test_look_at_turns_the_eyes_toward_the_side_asked(rendered):
    render, avatar = rendered
    display = Display()
    eyes = {s: hull(avatar, eye(s), 1) for s in ("left", "right")}
    views = {u: render(apply_pose(neutral(), display.pose(LookAt(uv=(u, 0.5)))))
             for u in (0.35, 0.5, 0.65)}
    assert display.pose(LookAt(uv=(0.65, 0.5))).yaw == 0.0  # within the eyes' own range
    for side, mask in eyes.items():
        xs = [iris_x(views[u], mask) for u in (0.35, 0.5, 0.65)]
        assert xs[0] < xs[1] - 0.5 and xs[2] > xs[1] + 0.5, (side, xs)


# ---- through the real nodes ---------------------------------------------------------------------

NAMED_GRAPH = {"reconstruction": {"grid": 96}, "render": {"device": "cpu", "size": 128}, "bridge": {}}


@pytest.fixture(scope="module")
def no_driver(tmp_path_factory):
    """Reconstruction, render and bridge as processes, with no live driver."""
    from conftest import wait_for
    from test_faults import Graph, Observer

    g = Graph(tmp_path_factory.mktemp("named"), NAMED_GRAPH)
    obs = Observer()
    g.start_all()
    try:
        ok = wait_for(lambda: obs.status("render")[1].startswith("rendering"), 150, 0.1)
        assert ok, "render never got its avatar:\n" + "\n".join(f"--- {n}\n{g.log(n)[-1500:]}"
                                                               for n in g.procs)
        yield g, obs
    finally:
        g.stop()
        obs.close()


def named_msg(names: list[str], weights: list[float], **head):
    from gaga_ros.msg import NamedExpression

    return NamedExpression(names=names, weights=weights, **head)


def quiet_for(obs, seconds: float) -> bool:
    """No frame for `seconds` (the face settled on neutral and rendering stopped)."""
    from conftest import wait_for

    def settled() -> bool:
        last = obs.frame_times[-1] if obs.frame_times else 0.0
        return time.monotonic() - last > seconds
    return wait_for(settled, 15, 0.05)


@pytest.mark.slow
def test_named_topic_alone_shows_then_settles(no_driver):
    from conftest import wait_for

    from gaga_ros.msg import NamedExpression
    from gaga_ros.nodes import qos

    g, obs = no_driver
    assert quiet_for(obs, 1.0)
    pub = obs.publisher(NamedExpression, "/avatar/named_expression", qos.EXPRESSIONS)
    t0 = time.monotonic()
    assert wait_for(lambda: (pub.publish(named_msg(["jawOpen"], [1.0], hold_s=1.0)) or True)
                    and obs.frames_since(t0) >= 3, 30, 0.3), g.log("render")[-1500:]
    opened = np.asarray(obs.last_frame.data, np.uint8).reshape(128, 128, 3).astype(np.float64)
    assert quiet_for(obs, 1.0)  # held, faded, then one neutral frame and nothing more
    closed = np.asarray(obs.last_frame.data, np.uint8).reshape(128, 128, 3).astype(np.float64)
    assert np.abs(opened - closed).max(2)[70:110].mean() > 3.0  # the mouth moved and closed again
    assert np.abs(opened - closed).max(2)[:40].mean() < 1.0  # the hair did not


@pytest.mark.slow
def test_bad_named_and_look_at_on_ros_are_refused_and_reported(no_driver):
    from conftest import wait_for
    from geometry_msgs.msg import PointStamped

    from gaga_ros.msg import NamedExpression
    from gaga_ros.nodes import qos

    g, obs = no_driver
    named = obs.publisher(NamedExpression, "/avatar/named_expression", qos.EXPRESSIONS)
    named.publish(named_msg(["grin"], [1.0]))
    assert wait_for(lambda: "refused /avatar/named_expression" in obs.status("render")[1], 20), \
        obs.status("render")
    assert "grin" in obs.status("render")[1] and "jawOpen" in obs.status("render")[1]
    look = obs.publisher(PointStamped, "/avatar/look_at", qos.EXPRESSIONS)
    behind = PointStamped()
    behind.header.frame_id = "display"
    behind.point.z = -0.5
    look.publish(behind)
    assert wait_for(lambda: "behind the display" in obs.status("render")[1], 20), obs.status("render")
    assert "unknown expression names ['grin']" in g.log("render")
    assert g.procs["render"].poll() is None
    # The face still follows: a good look_at afterwards renders frames.
    t0 = time.monotonic()
    ahead = PointStamped()
    ahead.point.x, ahead.point.z = 0.2, 0.5
    assert wait_for(lambda: (look.publish(ahead) or True) and obs.frames_since(t0) >= 3, 30, 0.3)


@pytest.mark.slow
def test_bridge_json_reaches_the_face_and_bad_json_gets_400(no_driver):
    from conftest import wait_for
    from test_bad_input import http_post

    g, obs = no_driver
    assert quiet_for(obs, 1.0)
    code, text = http_post(g.url + "expression", json.dumps(
        {"named": {"mouthSmileLeft": 0.8, "mouthSmileRight": 0.8, "eyeBlinkLeft": 1.0},
         "head": {"yaw": 0.2}, "hold_s": 0.5}).encode())
    assert code == 200, text
    t0 = time.monotonic()
    assert wait_for(lambda: obs.frames_since(t0 - 1.0) >= 3, 30, 0.1), g.log("render")[-1500:]
    code, text = http_post(g.url + "expression", b'{"look_at": {"u": 0.9, "v": 0.4}}')
    assert code == 200, text
    assert wait_for(lambda: int(obs.status("render")[2].get("named_commands", 0)) >= 2, 20), \
        obs.status("render")
    for body, word in [(b'{"named": {"grin": 1}}', "mouthSmileLeft"),
                       (b'{"named": {"jawOpen": NaN}}', "finite"),
                       (b'{"look_at": {"x": 0, "y": 0, "z": -2}}', "behind the display"),
                       (b'{"named": {}, "face_model": 1}', "unknown fields")]:
        code, text = http_post(g.url + "expression", body)
        assert code == 400 and word in text, (body, code, text)
    assert g.procs["bridge"].poll() is None and g.procs["render"].poll() is None


def test_data_channel_takes_named_expressions():
    """The page's data channel: named JSON is delivered, a bad one answered with the reason."""
    import aiohttp
    from fuzzing import expression_channel

    from gaga_ros.stream import StreamServer

    got = []
    with StreamServer(port=0, on_named=lambda c, look: got.append((c, look))) as server:
        async def post_offer(offer: dict) -> dict:
            async with aiohttp.ClientSession() as http:
                async with http.get(server.url + "config") as r:
                    headers = {"X-CSRF-Token": (await r.json())["csrf"]}
                async with http.post(server.url + "offer", json=offer, headers=headers) as r:
                    return await r.json()

        async def main() -> list[dict]:
            pc, channel, replies = await expression_channel(post_offer)
            out = []
            for body in ({"named": {"jawOpen": 0.5}, "hold_s": 2}, {"named": {"grin": 1}},
                         {"look_at": {"u": 0.2, "v": 0.5}}):
                channel.send(json.dumps(body))
                out.append(json.loads(await asyncio.wait_for(replies.get(), 30)))
            await pc.close()
            return out

        replies = asyncio.run(main())
    assert replies[0] == {"ok": True} and replies[2] == {"ok": True}
    assert not replies[1]["ok"] and "jawOpen" in replies[1]["error"]
    assert got[0][0].pose.weights == {"jawOpen": 0.5} and got[0][0].hold_s == 2.0 and got[0][1] is None
    assert got[1][0] is None and got[1][1].uv == (0.2, 0.5)
