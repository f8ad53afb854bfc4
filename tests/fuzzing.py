"""Hypothesis strategies for every input the graph takes, and the targets that send them.

Shared by tests/test_hardening.py (a bounded run in CI) and bench/fuzz_bench.py (a long run). Each
message strategy mixes wholly random messages (refused at the first check) with valid messages
that have one to three fields replaced by hostile values (NaN, infinities, huge or negative
numbers, wrong lengths, odd strings), which get past the first checks into the deeper ones.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

import numpy as np
from hypothesis import strategies as st

#: Integer ranges of the ROS primitive types.
INT_RANGES = {"int8": (-2**7, 2**7 - 1), "uint8": (0, 2**8 - 1), "int16": (-2**15, 2**15 - 1),
              "uint16": (0, 2**16 - 1), "int32": (-2**31, 2**31 - 1), "uint32": (0, 2**32 - 1),
              "int64": (-2**63, 2**63 - 1), "uint64": (0, 2**64 - 1), "octet": (0, 255),
              "char": (0, 255)}
#: Longest random sequence; valid messages keep their own lengths unless a mutation changes them.
MAX_SEQUENCE = 64

HOSTILE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45, 0.0, -0.0, 1e9])


def _float32(v: float) -> float:
    """A value a float32 field can hold (rclpy refuses finite values beyond float32's range)."""
    return v if not math.isfinite(v) else float(np.clip(v, -3.4e38, 3.4e38))


def scalar(type_name: str) -> st.SearchStrategy:
    if type_name in INT_RANGES:
        lo, hi = INT_RANGES[type_name]
        return st.one_of(st.sampled_from([lo, hi, 0, 1]), st.integers(lo, hi))
    if type_name in ("float", "double"):
        floats = st.floats(allow_nan=True, allow_infinity=True, width=32 if type_name == "float" else 64)
        return st.one_of(HOSTILE_FLOATS, floats).map(_float32 if type_name == "float" else float)
    if type_name == "boolean":
        return st.booleans()
    if type_name in ("string", "wstring") or type_name.startswith("string<"):
        odd = ["", "../../etc/passwd", "/dev/zero", "%s%n", "\u202e", "x" * 10000]
        return st.one_of(st.sampled_from(odd), st.text(max_size=40))
    raise ValueError(f"no strategy for {type_name}")


def _element(type_name: str) -> tuple[str, int | None, bool]:
    """(element type, fixed length or None, is a sequence) of a field type string."""
    if type_name.startswith("sequence<"):
        return type_name[9:-1].split(",")[0], None, True
    if type_name.endswith("]"):
        base, _, n = type_name[:-1].partition("[")
        return base, int(n), True
    return type_name, None, False


def field_value(type_name: str) -> st.SearchStrategy:
    """Random values of a ROS field type (nested messages recursively)."""
    elem, length, is_seq = _element(type_name)
    one = scalar(elem) if "/" not in elem else message(_class(elem))
    if not is_seq:
        return one
    if elem in ("uint8", "octet", "char") and length is None:
        return st.binary(max_size=MAX_SEQUENCE * 16)
    size = {"min_size": length, "max_size": length} if length else {"max_size": MAX_SEQUENCE}
    return st.lists(one, **size)


def _class(type_name: str):
    package, _, name = type_name.partition("/")
    return getattr(importlib.import_module(f"{package}.msg"), name)


def _fill(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        setattr(msg, name, value)
    return msg


def message(cls) -> st.SearchStrategy:
    """Wholly random messages of a ROS message class."""
    fields = cls.get_fields_and_field_types()
    return st.fixed_dictionaries({k: field_value(t) for k, t in fields.items()}).map(
        lambda values: _fill(cls, values))


def _mutation(type_name: str, current) -> st.SearchStrategy:
    """A hostile replacement for one field of a valid message, often close to its current value."""
    elem, length, is_seq = _element(type_name)
    if not is_seq or elem in ("uint8", "octet", "char") or "/" in elem:
        return field_value(type_name)
    arr = np.asarray(current, dtype=np.float64)
    choices = [field_value(type_name)]
    if arr.size and elem in ("float", "double"):
        choices += [HOSTILE_FLOATS.map(lambda v: np.full(arr.size, v, np.float32).tolist()),
                    st.floats(-1e6, 1e6).map(lambda k: (arr * k).astype(np.float32).tolist()),
                    st.integers(0, arr.size - 1).flatmap(lambda i: HOSTILE_FLOATS.map(
                        lambda v: np.where(np.arange(arr.size) == i, v, arr).astype(np.float32).tolist()))]
    if length is None and arr.size:
        choices += [st.integers(0, max(arr.size - 1, 0)).map(lambda n: arr[:n].astype(np.float32).tolist()
                                                              if elem in ("float", "double")
                                                              else arr[:n].astype(np.int64).tolist())]
    return st.one_of(choices)


def mutated(valid) -> st.SearchStrategy:
    """`valid` with one to three fields replaced by hostile values (header stamps included)."""
    cls = type(valid)
    fields = cls.get_fields_and_field_types()
    names = sorted(fields)

    def build(draw_names, replacements):
        msg = cls()
        for name in names:
            setattr(msg, name, getattr(valid, name))
        for name, value in zip(draw_names, replacements, strict=True):
            setattr(msg, name, value)
        return msg

    @st.composite
    def strategy(draw):
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
        values = [draw(_mutation(fields[n], getattr(valid, n))) for n in chosen]
        msg = build(chosen, values)
        if "header" in fields and draw(st.booleans()):
            msg.header.stamp.sec = draw(st.sampled_from([-1, -(2**31), 2**31 - 1, 0]))
            msg.header.stamp.nanosec = draw(st.sampled_from([0, 999_999_999, 2**32 - 1]))
        return msg

    return strategy()


def message_inputs(valid) -> st.SearchStrategy:
    """Random and mutated-valid messages of `valid`'s type, about one random to three mutated."""
    return st.one_of(message(type(valid)), mutated(valid), mutated(valid), mutated(valid))


# ---- JSON for the bridge (HTTP and data channel) -----------------------------------------------

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=40)


def expression_json(valid: dict) -> st.SearchStrategy:
    """Bodies for /expression: random JSON, broken text, and `valid` with fields replaced."""
    def replace(fields: dict, name: str, value) -> str:
        out = dict(fields)
        out[name] = value
        return json.dumps(out)

    odd_numbers = st.one_of(st.sampled_from([1e308, -1e308, 3e38, 1e-320, 2**64, -1]),
                            st.floats(allow_nan=False, allow_infinity=False))
    field_names = st.sampled_from(sorted(valid) + ["unknown", "__proto__", ""])
    return st.one_of(
        JSON_VALUES.map(json.dumps),
        st.text(max_size=200),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
        st.tuples(field_names, st.one_of(JSON_VALUES, odd_numbers,
                                         st.lists(odd_numbers, min_size=1, max_size=1500)))
        .map(lambda nv: replace(valid, *nv)),
        st.just("[" * 100000),  # deep nesting
        st.just('{"face_model": 1, "vertices": [' + ",".join(["1e999"] * 1434) + "]}"),  # inf via JSON
    )


# ---- targets: what is sent where, and what counts as an explained refusal -----------------------

def graph_params(workdir, media_dir) -> dict[str, dict]:
    """The fuzzed graph: every node that subscribes to something, small enough for 2 shared cores."""
    return {"driver": {"rate": 15.0},
            "reconstruction": {"grid": 96, "source_dir": str(media_dir)},
            "render": {"device": "cpu", "size": 128},
            "bridge": {},
            "tracking": {},
            "recorder": {"path": str(workdir / "rec.mp4")}}


def drive(strategy: st.SearchStrategy, examples: int, send) -> None:
    """Feed `examples` draws of `strategy` to `send` (no shrinking: a failure names its input)."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value) -> None:
        send(value)

    run()


class Tally:
    """Per target: inputs sent, refused (with a reason), and refused without one (must stay 0)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, int]] = {}

    def add(self, target: str, refused: bool = False, explained: bool = True) -> None:
        row = self.rows.setdefault(target, {"sent": 0, "refused": 0, "unexplained": 0})
        row["sent"] += 1
        row["refused"] += int(refused)
        row["unexplained"] += int(refused and not explained)


def _check_alive(graph) -> None:
    dead = {n: p.returncode for n, p in graph.procs.items() if p.poll() is not None}
    assert not dead, f"nodes exited: {dead}"


def topic_targets(obs, media_dir) -> list[tuple]:
    """(name, topic, message class, QoS, valid example, nodes that read it, pause s) per subscription."""
    from geometry_msgs.msg import Point, PointStamped
    from sensor_msgs.msg import Image

    from gaga_ros.avatar.geometric import GeometricAvatar
    from gaga_ros.driver import ScriptedDriver
    from gaga_ros.msg import DisplayPoint, GaussianAvatar, NamedExpression, TrackingStatus
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.nodes import qos
    from gaga_ros.nodes.avatar_msg import to_msg as avatar_to_msg
    from gaga_ros.nodes.expression_msg import to_msg as expression_to_msg
    from gaga_ros.nodes.image_msg import to_msg as image_to_msg
    from gaga_ros.source import load_image

    now = obs.node.get_clock().now().to_msg()
    face = load_image(media_dir / "monroe.jpg")[::4, ::4].copy()
    small = GeometricAvatar(grid=32).reconstruct(face)
    avatar = avatar_to_msg(small, now)
    return [
        ("expression", "/avatar/expression", ExpressionMsg, qos.EXPRESSIONS,
         expression_to_msg(ScriptedDriver().expression_at(1.0), now), ("render",), 0.02),
        ("avatar", "/avatar/model", GaussianAvatar, qos.LATCHED, avatar, ("render",), 0.05),
        ("named expression", "/avatar/named_expression", NamedExpression, qos.EXPRESSIONS,
         NamedExpression(yaw=0.1, hold_s=0.2),  # a nod (the mutator changes numbers, not names)
         ("render",), 0.02),
        ("look_at", "/avatar/look_at", PointStamped, qos.EXPRESSIONS,
         PointStamped(point=Point(x=0.1, y=0.0, z=0.5)), ("render",), 0.02),
        ("look_at display", "/avatar/look_at_display", DisplayPoint, qos.EXPRESSIONS,
         DisplayPoint(u=0.3, v=0.6), ("render",), 0.02),
        ("tracking status", "/tracking/status", TrackingStatus, qos.LATCHED,
         TrackingStatus(face_found=True, confidence=0.9, message="tracking"), ("render",), 0.02),
        ("avatar image", "/avatar/image", Image, qos.FRAMES, image_to_msg(face[:64, :64], now, "avatar"),
         ("bridge", "recorder"), 0.02),
        ("camera image", "/camera/image_raw", Image, qos.FRAMES, image_to_msg(face, now, "camera"),
         ("tracking",), 0.15),
        ("source image", "/avatar/source_image", Image, 1, image_to_msg(face, now, "camera"),
         ("reconstruction",), 0.3),
    ]


def fuzz_topics(graph, obs, media_dir, examples: int, tally: Tally) -> None:
    for name, topic, cls, profile, valid, readers, pause in topic_targets(obs, media_dir):
        pub = obs.publisher(cls, topic, profile)
        deadline = time.monotonic() + 20
        while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all("refused_inputs" in obs.status(n)[2] for n in readers), \
            {n: obs.status(n) for n in readers}  # every reader is a guarded node
        before = {n: int(obs.status(n)[2]["refused_inputs"]) for n in readers}
        reasons: set[str] = set()

        def send(msg, pub=pub, pause=pause, readers=readers, reasons=reasons) -> None:
            pub.publish(msg)
            time.sleep(pause)
            for n in readers:
                reasons.add(obs.status(n)[1])
            _check_alive(graph)

        n = examples if name != "source image" else max(4, examples // 4)  # each may reconstruct
        drive(message_inputs(valid), n, send)
        time.sleep(1.5)  # one diagnostics period: the counts of the last inputs
        for reader in readers:
            refused = int(obs.status(reader)[2].get("refused_inputs", 0)) - before[reader]
            said = any(f"refused {topic}" in r for r in reasons | {obs.status(reader)[1]})
            for i in range(n):
                tally.add(f"{name} -> {reader}", refused=i < refused, explained=said)


def fuzz_services(graph, obs, examples: int, tally: Tally) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    from gaga_ros.srv import SetSource

    def call(target, srv, name, request, explained) -> None:
        resp = obs.call(srv, name, request, timeout=60)
        assert resp is not None, f"{name}: no answer"
        refused = not getattr(resp, "success", True)
        tally.add(target, refused, explained(resp))
        _check_alive(graph)

    paths = st.one_of(scalar("string"), st.sampled_from(
        ["/etc/shadow", "../../../etc/passwd", "/proc/self/mem", "/dev/zero", ".", "", "monroe.jpg/.."]))
    requests = st.builds(lambda p, img, use: SetSource.Request(path=p, image=img if use else Image()),
                         paths, message(Image), st.booleans())
    said = lambda x: bool(x.message)  # noqa: E731
    drive(requests, max(4, examples // 4),
          lambda r: call("service /avatar/set_source", SetSource, "/avatar/set_source", r, said))
    drive(st.just(Trigger.Request()), 3, lambda r: call(
        "service /tracking/reset_reference", Trigger, "/tracking/reset_reference", r, said))
    allowed_while_active = {Transition.TRANSITION_DEACTIVATE, Transition.TRANSITION_ACTIVE_SHUTDOWN}
    transitions = st.one_of(
        st.integers(0, 255).filter(lambda i: i not in allowed_while_active).map(lambda i: Transition(id=i)),
        st.text(max_size=20).filter(lambda s: s not in ("deactivate", "shutdown")).map(
            lambda s: Transition(label=s)))
    for node in ("render", "reconstruction"):
        drive(transitions, max(4, examples // 2), lambda t, node=node: call(
            f"service /{node}/change_state", ChangeState, f"/{node}/change_state",
            ChangeState.Request(transition=t), lambda x: True))  # the reason is in the node's log
    # parameters: unknown names and declared names with values of the wrong type are refused
    text, double = ParameterType.PARAMETER_STRING, ParameterType.PARAMETER_DOUBLE
    wrong = {"render": ("size", ParameterValue(type=text, string_value="big")),
             "bridge": ("bitrate_kbps", ParameterValue(type=double, double_value=1e300)),
             "tracking": ("beta", ParameterValue(type=text, string_value="x"))}
    names = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(["use_sim_time.x", "a" * 300]))
    for node, (declared, value) in wrong.items():
        params = st.one_of(st.just(Parameter(name=declared, value=value)),
                           names.map(lambda n: Parameter(name=n, value=ParameterValue(
                               type=ParameterType.PARAMETER_INTEGER, integer_value=1))))

        def set_param(p, node=node) -> None:
            resp = obs.call(SetParameters, f"/{node}/set_parameters", SetParameters.Request(parameters=[p]),
                            timeout=30)
            assert resp is not None, f"/{node}/set_parameters: no answer"
            result = resp.results[0]
            tally.add(f"service /{node}/set_parameters", not result.successful,
                      result.successful or bool(result.reason))
            _check_alive(graph)

        drive(params, max(4, examples // 4), set_param)


def fuzz_http(graph, examples: int, tally: Tally, csrf_headers) -> None:
    """POST /expression and /offer bodies, odd paths: every answer below 500 and refusals with text."""
    from gaga_ros.driver import ScriptedDriver

    expr = ScriptedDriver().expression_at(1.0)
    valid = {"face_model": 1, "vertices": expr.vertices.reshape(-1).tolist(),
             "transform": expr.transform.reshape(-1).tolist(), "confidence": 1.0}

    def request(target: str, method: str, path: str, body: bytes | None) -> None:
        headers = {"Content-Type": "application/json", **csrf_headers()} if body is not None else {}
        req = urllib.request.Request(graph.url.rstrip("/") + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        tally.add(target, status >= 400, status < 500 and (status < 400 or bool(text.strip())))
        _check_alive(graph)

    drive(expression_json(valid), examples, lambda b: request(
        "http POST /expression", "POST", "/expression", b.encode("utf-8", "surrogatepass")))
    offers = st.one_of(JSON_VALUES.map(json.dumps), st.fixed_dictionaries(
        {"type": st.sampled_from(["offer", "answer", ""]), "sdp": st.text(max_size=300)}).map(json.dumps))
    drive(offers, max(4, examples // 2), lambda b: request("http POST /offer", "POST", "/offer", b.encode()))
    paths = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#?"),
                    max_size=60).map(lambda p: "/" + urllib.request.quote(p, safe="/%.-_~"))
    drive(paths, max(4, examples // 2), lambda p: request("http GET", "GET", p, None))


def bridge_json(graph, path: str, body: dict | None = None, headers: dict | None = None) -> dict:
    """GET (body None) or POST a JSON request to the bridge and return the JSON answer; a 429 or 503
    (offer rate or pending offers: the fuzzer's own offers) is retried after its Retry-After."""
    data = json.dumps(body).encode() if body is not None else None
    for _ in range(10):
        req = urllib.request.Request(graph.url.rstrip("/") + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503):
                raise
            time.sleep(float(e.headers.get("Retry-After", "1")))
    raise TimeoutError(f"{path}: the bridge kept answering 429/503")


async def expression_channel(post_offer: Callable[[dict], Awaitable[dict]]):
    """An open "expression" data channel to the bridge, as the page makes it (aiortc): the peer
    connection, the channel and a queue of its replies; post_offer sends the offer, gives the answer."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("expression")
    replies: asyncio.Queue = asyncio.Queue()
    opened = asyncio.Event()
    channel.on("open", opened.set)
    channel.on("message", replies.put_nowait)
    await pc.setLocalDescription(await pc.createOffer())
    answer = await post_offer({"sdp": pc.localDescription.sdp, "type": "offer"})
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    await asyncio.wait_for(opened.wait(), 60)
    return pc, channel, replies


def fuzz_data_channel(graph, examples: int, tally: Tally, csrf_headers) -> None:
    """Expressions over a real WebRTC data channel (aiortc as the page): every reply ok or explained."""
    from gaga_ros.driver import ScriptedDriver

    expr = ScriptedDriver().expression_at(1.0)
    valid = {"face_model": 1, "vertices": expr.vertices.reshape(-1).tolist(), "confidence": 1.0}
    payloads: list[str] = []
    drive(expression_json(valid).filter(lambda p: len(p.encode("utf-8", "surrogatepass")) < 60000),
          examples, payloads.append)

    async def session() -> None:
        loop = asyncio.get_running_loop()
        pc, channel, replies = await expression_channel(lambda offer: loop.run_in_executor(
            None, lambda: bridge_json(graph, "/offer", offer, csrf_headers())))
        try:
            for payload in payloads:
                channel.send(payload)
                reply = json.loads(await asyncio.wait_for(replies.get(), 30))
                tally.add("data channel expression", not reply["ok"], reply["ok"] or bool(reply.get("error")))
                _check_alive(graph)
        finally:
            await pc.close()

    asyncio.run(session())


def run_all(graph, obs, examples: int, media_dir, csrf_headers) -> dict[str, dict[str, int]]:
    """Every target in turn; the tally per target (sent, refused, unexplained)."""
    tally = Tally()
    fuzz_topics(graph, obs, media_dir, examples, tally)
    fuzz_services(graph, obs, examples, tally)
    fuzz_http(graph, examples, tally, csrf_headers)
    fuzz_data_channel(graph, examples, tally, csrf_headers)
    return tally.rows


def csrf_headers(graph) -> dict[str, str]:
    """What a page sends with its state-changing calls, read from /config as the page does."""
    config = bridge_json(graph, "/config")
    return {"X-CSRF-Token": config["csrf"]} if "csrf" in config else {}
