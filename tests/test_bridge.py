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
from conftest import wait_for

pytestmark = pytest.mark.skipif(chromium_path() is None,
                                reason="chromium missing: apt-get install -y chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
                body = {"face_model": 0, "jaw_pose": [0.2, 0, 0], "confidence": 1.0}
                async with http.post(url + "expression", json=body) as r:
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
