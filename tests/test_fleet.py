"""Many avatars from one render process: the core (gaga_ros.render.fleet) on real geometric avatars of
two real photos, and the fleet node serving two namespaces over real DDS (joins, leaves, faults)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import start_node, stop_process, wait_for

from gaga_ros.avatar.base import AvatarError
from gaga_ros.avatar.geometric import GeometricAvatar
from gaga_ros.driver import ScriptedDriver
from gaga_ros.expression import Expression, FaceModel
from gaga_ros.render.fleet import MIB, Fleet, MemoryRefused, avatar_bytes
from gaga_ros.source import default_source, load_image

SIZE = 96
GRID = 48

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def backend(name: str = "geometric", models_dir: str | None = None) -> GeometricAvatar:
    if name != "geometric":
        raise AvatarError(f"avatar backend {name!r}: accepted are geometric and gagavatar")
    return GeometricAvatar(grid=GRID, raster_backend="cpu", models_dir=models_dir)


@pytest.fixture(scope="module")
def avatars(media_dir):
    """Two different people: the built-in astronaut and monroe.jpg."""
    b = backend()
    return {"a": b.reconstruct(default_source()), "b": b.reconstruct(load_image(media_dir / "monroe.jpg"))}


def expression(t: float, stamp_ns: int = 0) -> Expression:
    expr = ScriptedDriver().expression_at(t)
    expr.stamp_ns = stamp_ns
    return expr


def differs(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float32) - y.astype(np.float32)).mean())


# ---- the core ----------------------------------------------------------------------------------


def test_a_round_renders_each_member_its_own_avatar(avatars):
    fleet = Fleet(backend, "cpu", SIZE)
    fleet.set_avatar("a", avatars["a"])
    fleet.set_avatar("b", avatars["b"])
    fleet.join("quiet")  # no avatar, no expressions: in no round
    assert not fleet.wait(0.0)
    fleet.put("a", expression(0.3, 1))
    fleet.put("a", expression(0.6, 2))  # replaces the unread one
    fleet.put("b", expression(1.2, 3))
    assert fleet.wait(0.0)
    result = fleet.render_round()
    assert not result.errors
    frames = {f.key: f for f in result.frames}
    assert sorted(frames) == ["a", "b"] and frames["a"].expression.stamp_ns == 2
    direct = backend()
    for key, t in (("a", 0.6), ("b", 1.2)):
        own = direct.render(avatars[key], expression(t), SIZE)
        other = direct.render(avatars["b" if key == "a" else "a"], expression(t), SIZE)
        assert differs(frames[key].image, own) < 0.5 < 5 < differs(frames[key].image, other), key
    assert fleet.members["a"].dropped == 1 and fleet.members["a"].frames == 1
    assert not fleet.wait(0.0) and fleet.render_round().frames == []  # nothing new, nothing rendered


def test_a_failing_member_never_holds_up_the_others(avatars, tmp_path):
    # Without a FLAME model (an empty models folder) the geometric backend refuses FLAME-mode input.
    fleet = Fleet(lambda name: backend(name, str(tmp_path)), "cpu", SIZE)
    fleet.set_avatar("a", avatars["a"])
    fleet.set_avatar("b", avatars["b"])
    broken = avatars["a"].to("cpu")
    broken.backend = "nope"
    with pytest.raises(AvatarError, match="avatar backend 'nope'"):
        fleet.set_avatar("c", broken)  # fails to build: "c" joined but has no avatar
    assert fleet.members["c"].avatar is None
    fleet.put("a", Expression(FaceModel.FLAME, expression=np.zeros(50, np.float32)))
    fleet.put("b", expression(0.5))
    fleet.put("c", expression(0.5))
    result = fleet.render_round()
    assert [f.key for f in result.frames] == ["b"]
    assert list(result.errors) == ["a"] and "FLAME model" in str(result.errors["a"])
    assert "FLAME model" in fleet.members["a"].error
    fleet.put("a", expression(0.7))  # a good expression: "a" serves again
    assert [f.key for f in fleet.render_round().frames] == ["a"] and fleet.members["a"].error == ""


def test_a_join_beyond_the_memory_cap_is_refused_with_the_figures(avatars):
    need = avatar_bytes(avatars["a"])
    fleet = Fleet(backend, "cpu", SIZE, memory_cap_mb=1.5 * need / MIB)
    fleet.set_avatar("a", avatars["a"])
    assert fleet.used_bytes() == need
    with pytest.raises(MemoryRefused) as refused:
        fleet.set_avatar("b", avatars["a"])
    assert refused.value.needed == need and refused.value.available == int(1.5 * need) - need
    assert f"needs {need / MIB:.1f} MiB" in str(refused.value) and "available" in str(refused.value)
    assert fleet.members["b"].avatar is None and fleet.used_bytes() == need
    fleet.put("a", expression(0.2))
    assert [f.key for f in fleet.render_round().frames] == ["a"]  # the running avatar keeps going
    fleet.leave("a")
    fleet.set_avatar("b", avatars["a"])  # its memory came back
    assert fleet.keys() == ["b"] and fleet.used_bytes() == need


# ---- the fleet node over real DDS ----------------------------------------------------------------


class Namespaces:
    """Per-namespace frames and the fleet node's diagnostics, seen from the test's node."""

    def __init__(self, node, spaces: list[str]) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image

        from gaga_ros.msg import Expression as ExpressionMsg
        from gaga_ros.msg import GaussianAvatar
        from gaga_ros.nodes import qos

        self.node = node
        self.frames: dict[str, list] = {ns: [] for ns in spaces}
        self.status = ("", {})
        self.models, self.expressions = {}, {}
        for ns in spaces:
            node.create_subscription(Image, f"/{ns}/avatar/image", self.frames[ns].append, qos.FRAMES)
            self.models[ns] = node.create_publisher(GaussianAvatar, f"/{ns}/avatar/model", qos.LATCHED)
            self.expressions[ns] = node.create_publisher(ExpressionMsg, f"/{ns}/avatar/expression",
                                                         qos.EXPRESSIONS)
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 20)

    def _on_diag(self, msg) -> None:
        for s in msg.status:
            if s.name == "gaga_ros: gaga_fleet":
                self.status = (s.message, {kv.key: kv.value for kv in s.values})

    def send(self, ns: str, t: float, stamp_ns: int) -> None:
        from gaga_ros.nodes.expression_msg import to_msg
        from gaga_ros.nodes.stamps import from_ns

        self.expressions[ns].publish(to_msg(expression(t), from_ns(stamp_ns)))

    def drive(self, spaces: list[str], frames: int, timeout: float) -> bool:
        """Send expressions to `spaces` until each got `frames` more images."""
        start = {ns: len(self.frames[ns]) for ns in spaces}
        i = 0

        def enough() -> bool:
            nonlocal i
            i += 1
            for k, ns in enumerate(spaces):
                self.send(ns, 0.5, stamp_ns(k, i))
            return all(len(self.frames[ns]) - start[ns] >= frames for ns in spaces)

        return wait_for(enough, timeout, 0.1)

    def set_namespaces(self, spaces: list[str]) -> bool:
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        client = self.node.create_client(SetParameters, "/gaga_fleet/set_parameters")
        assert client.wait_for_service(30)
        value = ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=spaces)
        request = SetParameters.Request(parameters=[Parameter(name="namespaces", value=value)])
        future = client.call_async(request)
        assert wait_for(future.done, 30)
        return future.result().results[0].successful


def stamp_ns(k: int, i: int) -> int:
    """Stamps that say which namespace an expression went to: second 1000 + 1000 k, frame i."""
    return (1000 + 1000 * k) * 10**9 + i * 1000


def test_one_fleet_node_serves_two_namespaces_and_nothing_crosses(ros_node, avatars, tmp_path):
    from gaga_ros.nodes.avatar_msg import to_msg
    from gaga_ros.nodes.image_msg import from_msg

    seen = Namespaces(ros_node, ["ra", "rb", "rc", "rd"])
    now = ros_node.get_clock().now().to_msg()
    seen.models["ra"].publish(to_msg(avatars["a"], now))
    seen.models["rb"].publish(to_msg(avatars["b"], now))
    # rc is listed but never gets an avatar: the namespace that is not there must stall nothing.
    proc = start_node("fleet", params={"device": "cpu", "size": SIZE, "namespaces": ["ra", "rb", "rc"]},
                      tmp_path=tmp_path)
    try:
        assert seen.drive(["ra", "rb"], 3, 180), stop_process(proc)[-3000:]
        direct = backend()
        for k, (ns, key) in enumerate((("ra", "a"), ("rb", "b"))):
            msg = seen.frames[ns][-1]
            sent = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            assert sent // 10**12 == 1 + k, f"{ns} showed an expression sent to another namespace"
            image = from_msg(msg)
            own = direct.render(avatars[key], expression(0.5), SIZE)
            other = direct.render(avatars["b" if key == "a" else "a"], expression(0.5), SIZE)
            assert differs(image, own) < 1.0 < 5 < differs(image, other), ns
        assert not seen.frames["rc"] and not seen.frames["rd"]
        assert ros_node.count_publishers("/avatar/image") == 0
        assert ros_node.count_publishers("/rd/avatar/image") == 0

        # rd joins live, with an avatar that cannot be built: refused and reported, the others go on
        assert seen.set_namespaces(["ra", "rb", "rc", "rd"])
        assert wait_for(lambda: ros_node.count_subscribers("/rd/avatar/model") == 1, 30)
        broken = to_msg(avatars["a"], now)
        broken.backend = "nope"
        seen.models["rd"].publish(broken)
        assert wait_for(lambda: "rd" in seen.status[0] and "nope" in seen.status[0], 30), seen.status
        assert seen.drive(["ra", "rb"], 3, 60)
        assert seen.status[1].get("/rd state", "").startswith("avatar refused"), seen.status

        # a name that is no namespace is refused; rb leaves: its topics go, ra keeps serving
        assert not seen.set_namespaces(["ra", "2bad"])
        assert seen.set_namespaces(["ra"])
        assert wait_for(lambda: ros_node.count_subscribers("/rb/avatar/expression") == 0
                        and ros_node.count_publishers("/rb/avatar/image") == 0, 30)
        before = len(seen.frames["rb"])
        assert seen.drive(["ra"], 3, 60)
        seen.send("rb", 0.5, stamp_ns(1, 0))
        assert wait_for(lambda: seen.status[1].get("avatars") == "1", 30), seen.status
        assert len(seen.frames["rb"]) == before
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]


def test_fleet_node_refuses_a_join_beyond_its_memory_cap_and_keeps_serving(ros_node, avatars, tmp_path):
    from gaga_ros.nodes.avatar_msg import to_msg

    seen = Namespaces(ros_node, ["ra", "rb"])
    need = avatar_bytes(avatars["a"])
    seen.models["ra"].publish(to_msg(avatars["a"], ros_node.get_clock().now().to_msg()))
    proc = start_node("fleet", params={"device": "cpu", "size": SIZE, "namespaces": ["ra", "rb"],
                                       "memory_cap_mb": 1.5 * need / MIB}, tmp_path=tmp_path)
    try:
        assert seen.drive(["ra"], 3, 180), stop_process(proc)[-3000:]
        seen.models["rb"].publish(to_msg(avatars["a"], ros_node.get_clock().now().to_msg()))
        refused = re.compile(r"/rb: join refused: needs [0-9.]+ MiB, [0-9.]+ MiB available")
        assert wait_for(lambda: refused.search(seen.status[0]), 30), seen.status
        assert seen.drive(["ra"], 5, 60)  # the running avatar keeps going
        assert not seen.frames["rb"]
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0, out[-3000:]


def test_fleet_node_discovers_a_namespace_and_forgets_it_when_it_disappears(ros_node, avatars, tmp_path):
    from gaga_ros.nodes.avatar_msg import to_msg

    seen = Namespaces(ros_node, ["rz"])
    seen.models["rz"].publish(to_msg(avatars["a"], ros_node.get_clock().now().to_msg()))
    proc = start_node("fleet", params={"device": "cpu", "size": SIZE, "discover": True, "forget_s": 1.0},
                      tmp_path=tmp_path)
    try:
        assert seen.drive(["rz"], 3, 180), stop_process(proc)[-3000:]  # found by its avatar/model
        ros_node.destroy_publisher(seen.models["rz"])  # the namespace's nodes go away
        ros_node.destroy_publisher(seen.expressions["rz"])
        assert wait_for(lambda: ros_node.count_subscribers("/rz/avatar/expression") == 0, 60), seen.status
        assert wait_for(lambda: seen.status[1].get("avatars") == "0", 30), seen.status
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0 and "no longer serving /rz" in out, out[-3000:]


def test_fleet_node_serves_named_expressions_per_namespace(ros_node, avatars, tmp_path):
    """A named command on NS/avatar/named_expression shows on that namespace's neutral face while it
    has no live driver (then fades and settles), nothing crosses to the other namespace, and a bad
    name is refused and reported while the fleet keeps serving: the render node's rules."""
    import time

    from sensor_msgs.msg import Image

    from gaga_ros.msg import NamedExpression
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.avatar_msg import to_msg
    from gaga_ros.nodes.image_msg import from_msg

    seen = Namespaces(ros_node, ["na", "nb"])
    now = ros_node.get_clock().now().to_msg()
    seen.models["na"].publish(to_msg(avatars["a"], now))
    seen.models["nb"].publish(to_msg(avatars["b"], now))
    named = {ns: ros_node.create_publisher(NamedExpression, f"/{ns}/avatar/named_expression",
                                           qos.EXPRESSIONS) for ns in ("na", "nb")}
    arrived: dict[str, list[float]] = {"na": [], "nb": []}
    for ns in arrived:
        ros_node.create_subscription(Image, f"/{ns}/avatar/image",
                                     lambda m, ns=ns: arrived[ns].append(time.monotonic()), qos.FRAMES)

    def quiet(ns: str, seconds: float) -> bool:
        return wait_for(lambda: time.monotonic() - max(arrived[ns], default=0.0) > seconds, 30, 0.05)

    proc = start_node("fleet", params={"device": "cpu", "size": SIZE, "namespaces": ["na", "nb"]},
                      tmp_path=tmp_path)
    try:
        assert seen.drive(["na", "nb"], 2, 180), stop_process(proc)[-3000:]
        assert quiet("na", 1.0) and quiet("nb", 0.0)  # the live driver has stopped
        before_b = len(seen.frames["nb"])
        t0 = time.monotonic()
        jaw = NamedExpression(names=["jawOpen"], weights=[1.0], hold_s=1.0)
        assert wait_for(lambda: (named["na"].publish(jaw) or True)
                        and sum(t > t0 for t in arrived["na"]) >= 3, 60, 0.3), seen.status
        opened = from_msg(seen.frames["na"][-1]).astype(np.float64)
        assert quiet("na", 1.0)  # held, faded, then one neutral frame and nothing more
        closed = from_msg(seen.frames["na"][-1]).astype(np.float64)
        assert np.abs(opened - closed).max(2)[52:86].mean() > 3.0  # the mouth moved and closed again
        assert np.abs(opened - closed).max(2)[:24].mean() < 1.0  # the hair did not
        assert len(seen.frames["nb"]) == before_b, "a command to /na reached /nb"

        named["nb"].publish(NamedExpression(names=["grin"], weights=[1.0]))
        refused = "refused /nb/avatar/named_expression: unknown expression names ['grin']"
        assert wait_for(lambda: refused in seen.status[0], 30), seen.status
        assert seen.drive(["na", "nb"], 2, 60)
        assert int(seen.status[1].get("named_commands", "0")) >= 1, seen.status  # the good ones counted
    finally:
        out = stop_process(proc)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]


# ---- the batched GAGAvatar path (GPU machine) ----------------------------------------------------


@pytest.mark.gpu
def test_batched_fleet_matches_each_avatar_alone_on_gpu(tmp_path, media_dir):
    """GAGAvatar members on CUDA share one FastRenderer batch; each one's image stays within the fast
    path's 40 dB of its own fp32 reference render; a join takes a free slot of the batch."""
    import dataclasses

    import cv2
    from test_gagavatar_backend import make_models_dir

    from gaga_ros.avatar.gagavatar.backend import GagaAvatarBackend
    from gaga_ros.expression import frontal_transform

    gaga = GagaAvatarBackend.load(make_models_dir(tmp_path / "models"), config="tiny", device="cuda")
    gaga.model.cfg = dataclasses.replace(gaga.model.cfg, randomize_noise=False)  # comparable noise
    size = gaga.model.cfg.render_size
    photos = {"a": default_source(), "b": load_image(media_dir / "monroe.jpg"),
              "c": load_image(media_dir / "portrait_bw.jpg")}
    made = {k: gaga.reconstruct_crop(cv2.resize(v, (512, 512)), frontal_transform(9.0),
                                     np.zeros(300, np.float32)) for k, v in photos.items()}
    fleet = Fleet(lambda name: gaga, "cuda", size, slots=4)
    fleet.set_avatar("a", made["a"])
    fleet.set_avatar("b", made["b"])
    assert len(fleet.batches) == 1 and fleet.batches[0].owners[:2] == ["a", "b"]
    jaws = {"a": 0.05, "b": 0.3, "c": 0.15}
    expr = {k: Expression(FaceModel.FLAME, transform=made[k].source_transform, jaw_pose=[j, 0, 0])
            for k, j in jaws.items()}
    reference = GagaAvatarBackend(gaga.model, gaga.flame_assets, "cuda", fast=False)

    def check(keys: list[str]) -> None:
        for k in keys:
            fleet.put(k, expr[k])
        result = fleet.render_round()
        assert not result.errors and sorted(f.key for f in result.frames) == keys
        for frame in result.frames:
            alone = reference.render(made[frame.key], expr[frame.key], size).astype(np.float64)
            mse = np.mean((frame.image.astype(np.float64) - alone) ** 2)
            assert 10 * np.log10(255.0**2 / max(mse, 1e-12)) >= 40, frame.key

    check(["a", "b"])
    fleet.set_avatar("c", made["c"])  # a join into the batch's free slot: no new batch, no recapture
    assert len(fleet.batches) == 1 and fleet.batches[0].owners[:3] == ["a", "b", "c"]
    check(["a", "b", "c"])
    fleet.leave("b")
    assert fleet.batches[0].owners[:3] == ["a", None, "c"]
    check(["a", "c"])
