"""Faults: nodes killed (SIGKILL) and restarted while the graph runs, lifecycle cycling without
leaks, a capture source that vanishes and comes back.

The graph runs as real processes over DDS; `Graph` (below) starts them, and `Observer` watches
/avatar/image, /avatar/model and /diagnostics from this process. test_bad_input.py, test_soak.py
and bench/soak_bench.py reuse both.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import wait_for

#: Parameters of the test graph: small enough for 2 shared CPU cores, real in every part.
GRAPH_PARAMS = {
    "driver": {"rate": 15.0},
    "reconstruction": {"grid": 96},
    "render": {"device": "cpu", "size": 128},
    "bridge": {},
}
#: Frames must be back within this long of a restarted node's process answering. The target is
#: 2 s (met on an idle machine: see bench/RELIABILITY.md); the asserted bound leaves room for
#: 2 CPU cores shared with the rest of CI, where a loaded machine measured up to ~8 s.
RECOVERY_BOUND_S = float(os.environ.get("GAGA_RECOVERY_BOUND_S", "12"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """RSS (kB) and thread count of a live process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


class Graph:
    """The demo graph's nodes as separate processes, each restartable on its own."""

    def __init__(self, workdir: Path, params: dict[str, dict] | None = None, namespace: str = "") -> None:
        self.workdir, self.namespace = workdir, namespace
        self.params = {k: dict(v) for k, v in (params or GRAPH_PARAMS).items()}
        if "bridge" in self.params:
            self.params["bridge"].setdefault("port", free_port())
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at: dict[str, float] = {}
        self.logs: dict[str, collections.deque] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.params['bridge']['port']}/"

    def start(self, name: str) -> subprocess.Popen:
        path = self.workdir / f"{name}.yaml"
        key = f"/**/{name}" if self.namespace else name  # a params file names namespaced nodes by path
        path.write_text(yaml.safe_dump({key: {"ros__parameters": self.params[name]}}))
        cmd = [sys.executable, "-m", "gaga_ros.cli", "node", name, "--ros-args", "-r",
               f"__node:={name}", "--params-file", str(path)]
        if self.namespace:
            cmd += ["-r", f"__ns:={self.namespace}"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs[name], self.started_at[name] = proc, time.monotonic()
        log = self.logs.setdefault(name, collections.deque(maxlen=400))
        threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
        return proc

    def start_all(self) -> None:
        for name in self.params:
            self.start(name)

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def kill(self, name: str) -> None:
        """End a node abruptly, as a crash would (no cleanup, no goodbye on DDS)."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log(self, name: str) -> str:
        return "".join(self.logs.get(name, ()))

    def stop(self) -> dict[str, int | None]:
        """SIGINT every node, then their exit codes (None: had to be killed)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[name] = None
        return codes


class Observer:
    """An rclpy node in this process on its own context: frames, avatars and diagnostics seen.
    frames=False leaves /avatar/image alone (a bench timing the graph does not pay for taking them)."""

    def __init__(self, frames: bool = True) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from sensor_msgs.msg import Image

        from gaga_ros.msg import GaussianAvatar
        from gaga_ros.nodes import qos

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node(f"observer_{os.getpid()}_{id(self)}", context=self.ctx)
        self.frame_times: list[float] = []
        self.last_frame: Image | None = None
        self.avatar_ids: list[str] = []
        self.diag: dict[str, tuple[int, str, dict]] = {}
        self._entities: dict = {}
        if frames:
            self.node.create_subscription(Image, "/avatar/image", self._on_frame, qos.FRAMES)
        self.node.create_subscription(GaussianAvatar, "/avatar/model",
                                      lambda m: self.avatar_ids.append(m.avatar_id), qos.LATCHED)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.ctx)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_frame(self, msg) -> None:
        self.frame_times.append(time.monotonic())
        self.last_frame = msg

    def _on_diag(self, msg) -> None:
        for s in msg.status:
            level = s.level[0] if isinstance(s.level, bytes) else int(s.level)
            self.diag[s.name] = (level, s.message, {kv.key: kv.value for kv in s.values})

    def status(self, node: str) -> tuple[int, str, dict]:
        return self.diag.get(f"gaga_ros: {node}", (-1, "", {}))

    def frames_since(self, t: float) -> int:
        return sum(1 for x in self.frame_times[-2000:] if x > t)

    def first_frame_after(self, t: float) -> float | None:
        return next((x for x in self.frame_times[-2000:] if x > t), None)

    def serving(self, timeout: float = 20.0, frames: int = 3) -> bool:
        """True once `frames` new /avatar/image frames arrived (the graph is still serving)."""
        t = time.monotonic()
        return wait_for(lambda: self.frames_since(t) >= frames, timeout, 0.05)

    def publisher(self, msg_type, topic: str, qos_profile):
        """A publisher kept for the observer's life: destroying entities while the executor
        spins in another thread is not safe in rclpy, so nothing here is destroyed early."""
        key = ("pub", topic, msg_type)
        if key not in self._entities:
            self._entities[key] = self.node.create_publisher(msg_type, topic, qos_profile)
        return self._entities[key]

    def call(self, srv_type, name: str, request, timeout: float = 10.0):
        """Call a service; None when no answer came within `timeout`."""
        key = ("client", name, srv_type)
        if key not in self._entities:
            self._entities[key] = self.node.create_client(srv_type, name)
        client = self._entities[key]
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(request)
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if done.wait(timeout):
            return future.result()
        client.remove_pending_request(future)
        return None

    def up_since(self, srv_type, name: str, request, timeout: float) -> float | None:
        """Poll a service until a live server answers; the monotonic time of that answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.call(srv_type, name, request, timeout=0.3) is not None:
                return time.monotonic()
        return None

    def close(self) -> None:
        # the spin thread first: a context shut down under it fails its next wait set (a warning in
        # CI run ci50)
        self.executor.shutdown()
        self.thread.join(timeout=10)
        self.node.destroy_node()
        self.ctx.try_shutdown()


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    g = Graph(tmp_path_factory.mktemp("graph"))
    obs = Observer()
    g.start_all()
    try:
        ok = obs.serving(timeout=150)
        assert ok, "graph never served frames:\n" + "\n".join(f"--- {n}\n{g.log(n)[-1500:]}"
                                                             for n in g.procs)
        # Frames can come before the observer's own copy of the latched avatar: render and the
        # observer are separate readers of /avatar/model, and on a loaded machine the large
        # message reached render first (CI, 4 tests here read an empty avatar_ids).
        assert wait_for(lambda: obs.avatar_ids, timeout=60), "no /avatar/model reached the observer"
        yield g, obs
    finally:
        g.stop()
        obs.close()


def probe_for(node: str):
    """A cheap service every node has, to tell when a restarted process is up and answering."""
    from rcl_interfaces.srv import ListParameters

    return ListParameters, f"/{node}/list_parameters", ListParameters.Request(depth=1)


#: Recovery figures measured by test_kill_and_restart_each_node, for bench/RELIABILITY.md.
RECOVERY: dict[str, dict[str, float]] = {}


@pytest.mark.slow
@pytest.mark.parametrize("node", ["render", "driver", "reconstruction", "bridge"])
def test_kill_and_restart_each_node(graph, node):
    """SIGKILL one node, restart it: frames resume within RECOVERY_BOUND_S of the process being up,
    and the avatar served is the same one (render gets it back from the latched /avatar/model)."""
    import urllib.request

    g, obs = graph
    avatar_before, models_before = obs.avatar_ids[-1], len(obs.avatar_ids)
    g.kill(node)
    t_kill = time.monotonic()
    if node in ("render", "driver"):
        time.sleep(1.0)
        assert obs.frames_since(t_kill + 0.5) == 0, f"frames kept coming with {node} dead"
    else:  # reconstruction or bridge dead: the render node keeps serving from its cached avatar
        assert obs.serving(timeout=10), f"frames stopped while {node} was dead"
    t_start = time.monotonic()
    g.start(node)
    t_up = obs.up_since(*probe_for(node), timeout=60)
    assert t_up is not None, f"restarted {node} never answered:\n{g.log(node)[-2000:]}"
    if node == "bridge":
        def http_ok() -> bool:
            try:
                with urllib.request.urlopen(g.url, timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        assert wait_for(http_ok, timeout=RECOVERY_BOUND_S, interval=0.05), g.log(node)[-2000:]
        t_back = time.monotonic()
    else:
        assert wait_for(lambda: obs.first_frame_after(t_up - 0.3) is not None, timeout=30), \
            f"no frames after restarting {node}:\n{g.log(node)[-2000:]}"
        t_back = max(obs.first_frame_after(t_up - 0.3), t_up)
    RECOVERY[node] = {"process_up_s": t_up - t_start, "recovery_after_up_s": t_back - t_up}
    print(f"{node}: process up {t_up - t_start:.2f} s after restart, serving again "
          f"{t_back - t_up:.2f} s after that")
    assert t_back - t_up <= RECOVERY_BOUND_S, RECOVERY[node]
    assert obs.serving(timeout=10)
    if node == "reconstruction":  # it rebuilds the same photo: the same content id comes back
        assert wait_for(lambda: len(obs.avatar_ids) > models_before, timeout=60), g.log(node)
    assert obs.avatar_ids[-1] == avatar_before, "a restart must not change the avatar"


@pytest.mark.slow
def test_render_lifecycle_cycles_do_not_leak(graph):
    """Deactivate/activate and cleanup/configure the render node repeatedly via its lifecycle
    services: frames resume each time, and its RSS and thread count stay bounded."""
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState

    g, obs = graph
    pid = g.pid("render")

    def change(transition: int) -> None:
        resp = obs.call(ChangeState, "/render/change_state",
                        ChangeState.Request(transition=Transition(id=transition)))
        assert resp is not None and resp.success, f"transition {transition} failed"

    def cycle(full: bool) -> None:
        change(Transition.TRANSITION_DEACTIVATE)
        if full:
            change(Transition.TRANSITION_CLEANUP)
            change(Transition.TRANSITION_CONFIGURE)
        change(Transition.TRANSITION_ACTIVATE)
        assert obs.serving(timeout=15), (f"no frames after a {'full ' if full else ''}lifecycle "
                                         f"cycle; render says {obs.status('render')}")

    cycle(full=False)  # warm-up: the first cycle may allocate for good
    before = proc_status(pid)
    for _ in range(5):
        cycle(full=False)
    after = proc_status(pid)
    print(f"render lifecycle x5: RSS {before['VmRSS']} -> {after['VmRSS']} kB, threads "
          f"{before['Threads']} -> {after['Threads']}")
    assert after["Threads"] <= before["Threads"], "each activate must not leave a thread behind"
    assert after["VmRSS"] < before["VmRSS"] * 1.10 + 20_000
    cycle(full=True)  # cleanup drops the avatar; configure+activate must get it back


def test_capture_reports_a_vanished_folder_and_recovers(tmp_path, media_dir):
    """Capture from an image folder; empty the folder while it runs: diagnostics go ERROR saying
    which source, the node retries, and frames flow again once the images are back."""
    import cv2

    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    img = cv2.imread(str(media_dir / "monroe.jpg"))
    cv2.imwrite(str(frames_dir / "a.jpg"), cv2.resize(img, (160, 120)))
    g = Graph(tmp_path, {"capture": {"source": str(frames_dir), "rate": 10.0, "retry_seconds": 0.5}})
    obs = Observer()
    from sensor_msgs.msg import Image

    from gaga_ros.nodes import qos

    times: list[float] = []
    obs.node.create_subscription(Image, "/camera/image_raw", lambda m: times.append(time.monotonic()),
                                 qos.FRAMES)
    g.start("capture")
    try:
        assert wait_for(lambda: len(times) >= 5, timeout=60), g.log("capture")
        hidden = tmp_path / "hidden.jpg"
        (frames_dir / "a.jpg").rename(hidden)
        assert wait_for(lambda: obs.status("capture")[0] == 2, timeout=10), obs.status("capture")
        level, message, _ = obs.status("capture")
        assert str(frames_dir.name) in message or "a.jpg" in message, message
        t_back = time.monotonic()
        hidden.rename(frames_dir / "a.jpg")
        assert wait_for(lambda: any(t > t_back for t in times), timeout=10), g.log("capture")
        assert wait_for(lambda: obs.status("capture")[0] == 0, timeout=10), obs.status("capture")
        assert g.procs["capture"].poll() is None
    finally:
        g.stop()
        obs.close()
    assert "retrying" in g.log("capture")


def test_capture_video_file_removed_while_playing(tmp_path, media_dir):
    """A video file deleted while playing: the open handle keeps decoding (Linux keeps the inode),
    so the node keeps publishing; a path that is gone at start is a clean start failure (exit 2)."""
    import shutil

    from sensor_msgs.msg import Image

    from gaga_ros.nodes import qos

    video = tmp_path / "clip.mp4"
    shutil.copy(media_dir / "obama.mp4", video)
    g = Graph(tmp_path, {"capture": {"source": str(video), "rate": 10.0}})
    obs = Observer()
    times: list[float] = []
    obs.node.create_subscription(Image, "/camera/image_raw", lambda m: times.append(time.monotonic()),
                                 qos.FRAMES)
    g.start("capture")
    try:
        assert wait_for(lambda: len(times) >= 3, timeout=60), g.log("capture")
        video.unlink()
        t = time.monotonic()
        assert wait_for(lambda: sum(x > t for x in times) >= 10, timeout=10)
    finally:
        g.stop()
        obs.close()
    g2 = Graph(tmp_path, {"capture": {"source": str(video)}})
    proc = g2.start("capture")
    assert proc.wait(60) == 2
    assert "does not exist" in g2.log("capture") or wait_for(
        lambda: "does not exist" in g2.log("capture"), 2)
