"""The node graph as data: read by launch/telepresence.launch.py and by `gaga-ros launch` alike.

Data flow: capture -> tracking -> avatar/expression -> render (avatar cached on the device)
-> avatar/image -> bridge; source photo -> reconstruction -> avatar/model (latched) -> render.
The telepresence loop (driver:=operator): the operator's page -> bridge -> camera/image_raw ->
tracking -> render -> bridge -> kiosk page; the operator's voice -> bridge -> the kiosk's speaker and
operator/audio -> voice (the mouth, while the face is lost); an idle driver holds the face between
operators. Node names say what they are (gaga_render, ...), so they read clearly beside a robot's
own nodes; with `namespace:=robot1` every node and topic of the graph moves under /robot1, and a
second graph in another namespace (with its own bridge `port:=`) runs beside it in the same ROS graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gaga_ros.errors import InputError
from gaga_ros.nodes import names

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


@dataclass(frozen=True)
class NodeSpec:
    """One node of a graph: its ROS name, the module under gaga_ros.nodes, extra parameters, and
    its namespace ("" or "/robot1")."""

    name: str
    module: str
    parameters: dict = field(default_factory=dict)
    lifecycle: bool = False
    namespace: str = ""

    @property
    def qualified(self) -> str:
        """The node's fully qualified name, e.g. /robot1/gaga_render."""
        return f"{self.namespace}/{self.name}"


#: Launch arguments of the telepresence graph, with defaults and meaning.
ARGUMENTS = {
    "profile": ("demo", "Parameter profile: a YAML in config/ (demo = CPU, gpu, kiosk)."),
    "driver": ("scripted", "What drives the avatar: scripted (built-in), video, webcam, topic (a "
               "camera driver of yours publishes camera/image_raw; tracking only) or operator (the "
               "telepresence loop: the operator's page at <bridge>/operator drives the face with camera "
               "and voice; an idle face between operators)."),
    "camera_transport": ("raw", "driver:=topic: raw (sensor_msgs/Image on /camera/image_raw) or "
                         "compressed (JPEG/PNG CompressedImage on /camera/image_raw/compressed)."),
    "tracking": ("auto", "Face model of camera tracking: mesh (mediapipe, no assets), flame (needs a "
                 "FLAME model, see `gaga-ros assets`) or auto (flame when it is present, else mesh). "
                 "Every avatar backend renders both."),
    "video": ("", "Video file for driver:=video."),
    "camera": ("0", "Webcam device index for driver:=webcam."),
    "source": ("", "Source photo (inside the reconstruction node's source_dir); empty: built-in."),
    "record": ("", "Record as well: an .mp4 gets /avatar/image as video, an .mcap gets the expression "
               "and image topics for ROS 2 tools, Foxglove and replay (empty: do not record)."),
    "bridge": ("true", "Start the WebRTC bridge."),
    "port": ("8080", "TCP port of the bridge's pages (viewer /, kiosk /kiosk, operator /operator); "
             "give each namespace its own."),
    "sfu": ("none", "How viewer pages get the stream: none (from the bridge itself, the default) or janus "
            "(the bridge publishes once into a Janus VideoRoom and viewer and kiosk pages subscribe there: "
            "many viewers; the room secret in GAGA_ROS_JANUS_SECRET)."),
    "janus_url": ("", "sfu:=janus: Janus's HTTP API (empty: the bridge's default, "
                  "http://127.0.0.1:8088/janus, where `gaga-ros janus` serves it)."),
    "janus_room": ("", "sfu:=janus: the VideoRoom number (empty: the bridge's default, 1234); one bridge "
                   "per room, so give each namespace its own."),
    "robot_camera": ("", "driver:=operator: an Image topic of the robot's camera, shown on the operator's "
                     "page (empty: none)."),
    "render": ("true", "Start the render node (false: a fleet node elsewhere renders this namespace's "
               "avatar; see gaga_ros/nodes/fleet.py)."),
    "namespace": ("", "ROS namespace of every node and topic, e.g. robot1: /robot1/avatar/image, "
                  "/robot1/gaga_render. Two graphs in two namespaces share one ROS graph (give each "
                  "bridge its own port:=)."),
}

#: ros2 launch starts a node again this long after it failed (a crash, or a worker that died and
#: ended its process: gaga_ros.nodes.guard); `gaga-ros launch` restarts at once.
RESPAWN_DELAY_S = 2.0

DRIVERS = ("scripted", "video", "webcam", "topic", "operator")
TRANSPORTS = ("raw", "compressed")
TRACKING_MODES = ("mesh", "flame", "auto")
SFUS = ("none", "janus")

#: Fast DDS reads a default profile from this variable (the FASTDDS_ name is not honoured by the
#: Jazzy wheels' Fast DDS 2.14, seen).
DDS_PROFILE_VAR = "FASTRTPS_DEFAULT_PROFILES_FILE"


def config_dir() -> Path:
    """Where the profile YAMLs live: the source tree, or share/gaga_ros/config when installed."""
    if CONFIG_DIR.is_dir():
        return CONFIG_DIR
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("gaga_ros")) / "config"


def dds_environment(environ: dict[str, str]) -> dict[str, str]:
    """The shared-memory Fast DDS profile for nodes on one host, unless the user chose one."""
    if DDS_PROFILE_VAR in environ or "FASTDDS_DEFAULT_PROFILES_FILE" in environ:
        return {}
    return {DDS_PROFILE_VAR: str(config_dir() / "fastdds_shm.xml")}


def profile_file(profile: str) -> Path:
    """The YAML parameter file of a profile; raises ValueError naming the profiles that exist."""
    path = config_dir() / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in config_dir().glob("*.yaml"))
        raise InputError(f"unknown profile {profile!r}: known are {', '.join(known)}")
    yaml.safe_load(path.read_text())  # a broken profile fails here, not in six nodes at once
    return path


def node_parameters(specs: list[NodeSpec], profile: str) -> dict[str, dict]:
    """Each node's parameters as a launch gives them, keyed by module: its profile's
    (`/**/gaga_<module>` in config/<profile>.yaml) overlaid by the graph's. For tests and benches that
    start the nodes themselves, so a default set here or in a profile reaches them too."""
    profiles = yaml.safe_load(profile_file(profile).read_text()) or {}
    return {spec.module: {**profiles.get(f"/**/{spec.name}", {}).get("ros__parameters", {}),
                          **spec.parameters} for spec in specs}


def telepresence(args: dict[str, str] | None = None) -> list[NodeSpec]:
    """The telepresence graph for the given launch arguments (unset ones take their defaults)."""
    a = {k: v[0] for k, v in ARGUMENTS.items()}
    unknown = set(args or {}) - set(a)
    if unknown:
        raise InputError(f"unknown launch arguments {sorted(unknown)}: known are {sorted(a)}")
    a.update(args or {})
    if a["driver"] not in DRIVERS:
        raise InputError(f"driver {a['driver']!r} is not one of {', '.join(DRIVERS)}")
    if a["camera_transport"] not in TRANSPORTS:
        raise InputError(f"camera_transport {a['camera_transport']!r} is not one of {', '.join(TRANSPORTS)}")
    if a["tracking"] not in TRACKING_MODES:
        raise InputError(f"tracking {a['tracking']!r} is not one of {', '.join(TRACKING_MODES)}")
    if a["camera_transport"] != "raw" and a["driver"] != "topic":
        raise InputError("camera_transport:=compressed reads a camera driver's compressed topic: use it "
                         "with driver:=topic (the built-in capture publishes raw images)")
    if a["sfu"] not in SFUS:
        raise InputError(f"sfu {a['sfu']!r} is not one of {', '.join(SFUS)}")
    bridge: dict[str, int | str] = {"port": _port(a["port"])}
    if a["sfu"] != "none":
        bridge["sfu"] = a["sfu"]
        if a["janus_url"]:
            bridge["janus_url"] = a["janus_url"]
        if a["janus_room"]:
            if not a["janus_room"].isdigit():
                raise InputError(f"janus_room {a['janus_room']!r}: accepted is a room number")
            bridge["janus_room"] = int(a["janus_room"])
    elif a["janus_url"] or a["janus_room"]:
        raise InputError("janus_url:= and janus_room:= choose the Janus of sfu:=janus: use them with it")
    nodes: list[NodeSpec] = []
    if a["driver"] == "operator":
        if not _true(a["bridge"]):
            raise InputError("driver:=operator needs the bridge (the operator's page is served by it)")
        bridge.update(upstream_topic=names.CAMERA_IMAGE, robot_camera=a["robot_camera"], operator_drives=True)
        nodes.append(_spec("driver", {"performance": "idle", "yield_to_tracking": True}))
        nodes.append(_spec("tracking", {"mode": a["tracking"]}))
    elif a["robot_camera"]:
        raise InputError("robot_camera:= shows the robot's camera on the operator's page: use it with "
                         "driver:=operator")
    elif a["driver"] == "scripted":
        nodes.append(_spec("driver"))
    elif a["driver"] == "topic":
        nodes.append(_spec("tracking", {"camera_transport": a["camera_transport"], "mode": a["tracking"]}))
    else:
        src = a["video"] if a["driver"] == "video" else a["camera"]
        if not src:
            raise InputError("driver:=video needs video:=<file>")
        nodes.append(_spec("capture", {"source": src}))
        nodes.append(_spec("tracking", {"mode": a["tracking"]}))
    # The voice moves the mouth with any driver: the robot's text-to-speech on robot/audio, and the
    # operator's voice while their face is lost (silence costs it under 1 % of a core).
    nodes.append(_spec("voice"))
    recon = {"source_path": a["source"]} if a["source"] else {}
    nodes.append(_spec("reconstruction", recon, lifecycle=True))
    if _true(a["render"]):
        nodes.append(_spec("render", lifecycle=True))
    if a["record"].endswith(".mcap"):
        nodes.append(_spec("bag", {"mode": "record", "path": a["record"]}))
    elif a["record"]:
        nodes.append(_spec("recorder", {"path": a["record"]}))
    if _true(a["bridge"]):
        nodes.append(_spec("bridge", bridge))
    return _placed(nodes, a["namespace"])


def node_name(module: str) -> str:
    """The ROS name of the node that module gaga_ros.nodes.<module> runs: gaga_<module>."""
    return f"gaga_{module}"


def _spec(module: str, parameters: dict | None = None, lifecycle: bool = False) -> NodeSpec:
    return NodeSpec(node_name(module), module, parameters or {}, lifecycle)


def _true(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def _port(port: str) -> int:
    """The bridge's port from launch argument `port`; InputError saying what is accepted."""
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f"port {port!r}: accepted is a TCP port, 0 to 65535")
    return int(port)


def _placed(nodes: list[NodeSpec], namespace: str) -> list[NodeSpec]:
    """The nodes inside `namespace` (ValueError saying what is accepted when it is no ROS namespace)."""
    ns = names.namespace(namespace)
    return [NodeSpec(n.name, n.module, n.parameters, n.lifecycle, ns) for n in nodes]


def capture_only(args: dict[str, str] | None = None) -> list[NodeSpec]:
    """Just the capture node (for checking a camera or video)."""
    a = {"source": "0", "namespace": "", **(args or {})}
    return _placed([_spec("capture", {"source": a["source"]})], a["namespace"])


def replay(args: dict[str, str] | None = None) -> list[NodeSpec]:
    """Drive the avatar from an MCAP recording at its original timing (path:=, rate:=, loop:=)."""
    a = {"path": "", "rate": "1.0", "loop": "false", "bridge": "true", "namespace": "", "port": "8080",
         **(args or {})}
    if not a["path"]:
        raise InputError("replay needs path:=<recording.mcap>")
    bag = {"mode": "replay", "path": a["path"], "rate": float(a["rate"]),
           "loop": _true(a["loop"]), "topics": [names.EXPRESSION]}
    nodes = [_spec("bag", bag), _spec("reconstruction", lifecycle=True), _spec("render", lifecycle=True)]
    if _true(a["bridge"]):
        nodes.append(_spec("bridge", {"port": _port(a["port"])}))
    return _placed(nodes, a["namespace"])


GRAPHS = {"telepresence": telepresence, "capture": capture_only, "replay": replay}
