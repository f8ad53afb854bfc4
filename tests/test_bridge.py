"""The bridge node streams the real /avatar/image of the demo graph to headless Chromium, and the
page's JSON expressions reach /avatar/expression. Needs `apt-get install -y chromium`."""

import asyncio
import signal
import socket
import subprocess
import sys

import aiohttp
import numpy as np
import pytest
from browser import Browser, chromium_path
from conftest import start_node, stop_process, wait_for

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="chromium missing: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_bitrate(node, kbps: int) -> bool:
    from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    client = node.create_client(SetParameters, "/bridge/set_parameters")
    assert client.wait_for_service(timeout_sec=10)
    value = ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=kbps)
    future = client.call_async(SetParameters.Request(parameters=[Parameter(name="bitrate_kbps",
                                                                           value=value)]))
    assert wait_for(future.done, timeout=10)
    return all(r.successful for r in future.result().results)


def test_browser_decodes_avatar_stream_from_graph(ros_node, tmp_path):
    from gaga_ros.msg import Expression as ExpressionMsg
    from gaga_ros.nodes import qos

    port = free_port()
    params = tmp_path / "bridge.yaml"
    params.write_text(f"bridge:\n  ros__parameters:\n    port: {port}\n")
    expressions: list[ExpressionMsg] = []
    ros_node.create_subscription(ExpressionMsg, "/avatar/expression", expressions.append,
                                 qos.EXPRESSIONS)
    graph = subprocess.Popen([sys.executable, "-m", "gaga_ros.cli", "launch", "telepresence",
                              "record:=", "bridge:=false"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    bridge = subprocess.Popen([sys.executable, "-m", "gaga_ros.cli", "node", "bridge", "--ros-args",
                               "--params-file", str(params), "-r", "__node:=bridge"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"

    async def scenario():
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(url) as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            async with Browser() as browser:
                page = await browser.new_page(url)
                await page.wait_for("gaga.stats.framesDecoded >= 30", timeout=180)
                mean = await page.evaluate("gaga.meanColor()")
                # bitrate is a live parameter: the encoder restarts and the stream goes on
                assert set_bitrate(ros_node, 300)
                before = await page.evaluate("gaga.stats.framesDecoded")
                await page.wait_for(f"gaga.stats.framesDecoded >= {before + 30}", timeout=60)
                kiosk = await browser.new_page(url + "kiosk")
                await kiosk.wait_for("gaga.stats.framesDecoded >= 10", timeout=60)
                body = {"face_model": 0, "jaw_pose": [0.2, 0, 0], "confidence": 1.0}
                async with http.get(url + "config") as r:  # the page's CSRF token, as viewer.js reads it
                    csrf = (await r.json())["csrf"]
                async with http.post(url + "expression", json=body, headers={"X-CSRF-Token": csrf}) as r:
                    assert r.status == 200, await r.text()
                return mean

    try:
        mean = asyncio.run(scenario())
        # the decoded picture is the avatar (a skin-toned face on black), not a blank or idle screen
        assert np.mean(mean) > 20
        assert wait_for(lambda: any(abs(m.jaw_pose[0] - 0.2) < 1e-6 for m in expressions), timeout=10)
    finally:
        for proc in (bridge, graph):
            proc.send_signal(signal.SIGINT)
        logs = [p.communicate(timeout=30)[0] for p in (bridge, graph)]
        print(logs[0][-2000:])


def test_stream_server_logs_reach_rosout(ros_node, tmp_path):
    """The stream server logs with the standard library; the bridge node forwards it to /rosout."""
    from rcl_interfaces.msg import Log
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    logs: list[Log] = []
    latched = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    ros_node.create_subscription(Log, "/rosout", logs.append, latched)
    bridge = start_node("bridge", params={"port": free_port()}, tmp_path=tmp_path)
    try:
        def forwarded() -> bool:
            wanted = "gaga_ros.stream.webrtc: avatar stream at"
            return any(m.name == "gaga_bridge" and wanted in m.msg for m in logs)

        assert wait_for(forwarded, timeout=120), stop_process(bridge)
    finally:
        out = stop_process(bridge)
    assert out.count("avatar stream at") == 1, "printed once (through rclpy), not also by logging"


def test_turn_credentials_come_from_the_environment_and_reach_every_page(ros_node, tmp_path, monkeypatch):
    """TURN across NAT: username:credential from an environment variable, never a parameter; every
    page gets them from /config; a TURN server without them refuses to start, saying what to set."""
    from rcl_interfaces.srv import GetParameters, ListParameters

    port = free_port()
    servers = ["stun:127.0.0.1:3478", "turn:127.0.0.1:3478?transport=udp"]
    monkeypatch.setenv("GAGA_ROS_TURN_CREDENTIALS", "robot:s3cret-turn-pass")
    bridge = start_node("bridge", params={"port": port, "ice_servers": servers}, tmp_path=tmp_path)
    try:
        async def config() -> dict:
            async with aiohttp.ClientSession() as s:
                for _ in range(600):
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/config") as r:
                            return await r.json()
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.2)
            raise AssertionError("the bridge never served /config")

        ice = asyncio.run(config())["iceServers"]
        assert ice == [{"urls": servers[0]},
                       {"urls": servers[1], "username": "robot", "credential": "s3cret-turn-pass"}]
        lister = ros_node.create_client(ListParameters, "/gaga_bridge/list_parameters")
        getter = ros_node.create_client(GetParameters, "/gaga_bridge/get_parameters")
        assert lister.wait_for_service(timeout_sec=30) and getter.wait_for_service(timeout_sec=30)
        names = lister.call_async(ListParameters.Request())
        assert wait_for(names.done, 30)
        values = getter.call_async(GetParameters.Request(names=list(names.result().result.names)))
        assert wait_for(values.done, 30)
        assert "s3cret" not in repr(values.result().values)  # not in any parameter
    finally:
        stop_process(bridge)
    monkeypatch.delenv("GAGA_ROS_TURN_CREDENTIALS")
    lacking = start_node("bridge", params={"port": free_port(), "ice_servers": servers}, tmp_path=tmp_path)
    out = lacking.communicate(timeout=120)[0]
    assert lacking.returncode == 2 and "GAGA_ROS_TURN_CREDENTIALS=username:credential" in out, out[-2000:]


def test_a_port_in_use_says_which_and_how_to_choose_another(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        bridge = start_node("bridge", params={"port": port}, tmp_path=tmp_path)
        out = bridge.communicate(timeout=120)[0]
    assert bridge.returncode == 2, out[-2000:]  # cannot start: the launchers do not restart it
    assert f"port {port} on 127.0.0.1 is already in use" in out and f"port:={port + 1}" in out, out[-2000:]
    assert "Traceback" not in out
