"""Many viewers through Janus (issue 19): a real Janus started here with a generated loopback
configuration, the real graph (driver, reconstruction, render on the CPU, the bridge with sfu:=janus)
over DDS, headless Chromium viewers that subscribe through the bridge and decode from Janus.

Needs `apt-get install -y janus chromium` (scripts/test.sh installs both when run as root).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pytest
from browser import Browser, chromium_path
from conftest import wait_for
from janus_process import ROOM, JanusProcess, janus_path
from test_faults import GRAPH_PARAMS, Graph, Observer
from test_loop import until

from gaga_ros.stream.janus import SfuConfigError, SfuSettings

pytestmark = [pytest.mark.skipif(janus_path() is None, reason="needs janus (test.sh installs it)")]
needs_chromium = pytest.mark.skipif(chromium_path() is None, reason="needs chromium (test.sh installs it)")
SECRET_ENV = "GAGA_ROS_JANUS_SECRET"
#: A late joiner's first picture, asserted as an event with room for 2 loaded shared cores; the
#: 1 s figure is bench/sfu_bench.py's.
LATE_JOINER_BOUND_S = 20.0
#: DiagnosticStatus levels as the Observer reports them (ints).
OK, ERROR = 0, 2


def janus_request(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return json.loads(reply.read())


def second_address() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


def test_settings_are_checked():
    with pytest.raises(SfuConfigError, match="Janus's HTTP API"):
        SfuSettings("ws://127.0.0.1:8188", ROOM, "long enough secret")
    with pytest.raises(SfuConfigError, match="shorter than 8"):
        SfuSettings("http://127.0.0.1:8088/janus", ROOM, "short")
    with pytest.raises(SfuConfigError, match="positive integer"):
        SfuSettings("http://127.0.0.1:8088/janus", 0, "long enough secret")


def test_peers_keyframe_requests_are_made_and_bounded():
    """PLI/FIR reach the shared encoder as keyframes, at most one per PEER_KEYFRAME_GAP_S however many
    arrive (those arriving while one waits are served by it); one that comes too soon after the
    joiner's keyframe is made later, not lost."""
    from gaga_ros.stream.tracks import PEER_KEYFRAME_GAP_S, NewestFrame, SharedEncoder

    async def main():
        frames = NewestFrame()
        frames.bind(asyncio.get_running_loop())
        encoder = SharedEncoder(frames, "VP8", 500, 30.0, None, keyframe_interval_s=1000.0)
        rng = np.random.default_rng(0)
        frames.put(rng.integers(0, 255, (64, 64, 3), np.uint8), 0)
        track = encoder.subscribe()
        await track.recv()  # the joiner's keyframe
        start = time.monotonic()
        for _ in range(20):  # a burst of requests, as from many subscribers at once
            encoder.peer_keyframe_request()
            frames.put(rng.integers(0, 255, (64, 64, 3), np.uint8), 0)
            await asyncio.sleep(0.01)

        def keyframes() -> int:  # in the stream since the joiner's
            return sum(p.keyframe for p in encoder.ring) - 1

        # the deferred request comes, and each request made becomes a keyframe in the stream
        while not 1 <= encoder.peer_keyframes <= keyframes():
            assert time.monotonic() - start < 30, (encoder.peer_keyframes, keyframes())
            await asyncio.sleep(0.01)
        elapsed = time.monotonic() - start
        track.stop()
        await encoder.close()
        return encoder.peer_keyframes, elapsed

    made, elapsed = asyncio.run(main())
    assert made <= elapsed / PEER_KEYFRAME_GAP_S + 1, (made, elapsed)


def test_launch_argument_sfu():
    from gaga_ros.graph import telepresence

    bridge = next(n for n in telepresence({"sfu": "janus"}) if n.module == "bridge")
    assert bridge.parameters["sfu"] == "janus"
    direct = next(n for n in telepresence() if n.module == "bridge")
    assert "sfu" not in direct.parameters  # the default stays the bridge's own: direct
    custom = next(n for n in telepresence({"sfu": "janus", "janus_url": "http://127.0.0.1:8188/janus",
                                           "janus_room": "7"}) if n.module == "bridge")
    assert custom.parameters["janus_url"] == "http://127.0.0.1:8188/janus"
    assert custom.parameters["janus_room"] == 7
    for wrong in ({"sfu": "janus", "janus_room": "lobby"}, {"janus_url": "http://127.0.0.1:8188/janus"}):
        with pytest.raises(ValueError, match="janus"):
            telepresence(wrong)
    with pytest.raises(ValueError, match="none, janus"):
        telepresence({"sfu": "mediasoup"})


def test_janus_not_running_is_said_with_its_url_and_retried(caplog):
    """No Janus at the URL: the server says so with the URL, retries with backoff, and a viewer's
    subscription gets 503 with the reason; one log line per attempt, no traceback."""
    from test_webrtc import csrf_headers, free_port

    from gaga_ros.stream import StreamServer

    url = f"http://127.0.0.1:{free_port()}/janus"
    caplog.set_level(logging.INFO, logger="gaga_ros.stream")
    with StreamServer(port=0, sfu=SfuSettings(url, ROOM, "a long enough secret")) as server:
        assert wait_for(lambda: server.stats()["sfu"]["publishes"] == 0 and
                        len([r for r in caplog.records if "retrying" in r.getMessage()]) >= 3, 30)
        sfu = server.stats()["sfu"]
        assert url in sfu["problem"] and "unreachable" in sfu["problem"], sfu

        async def subscribe():
            async with aiohttp.ClientSession() as http:
                json_type = {"Content-Type": "application/json"}
                async with http.post(server.url + "subscribe", data="{}", headers=json_type) as r:
                    forged = r.status  # a page of another site cannot read the CSRF token
                headers = {**await csrf_headers(http, server.url), **json_type}
                async with http.post(server.url + "subscribe", data="{}", headers=headers) as r:
                    return forged, r.status, await r.text()

        forged, status, text = asyncio.run(subscribe())
    assert forged == 403
    assert status == 503 and url in text, (status, text)
    waits = [float(r.getMessage().rsplit("retrying in ", 1)[1].split()[0]) for r in caplog.records
             if "retrying in" in r.getMessage()]
    assert waits[:3] == [0.5, 1.0, 2.0], waits  # backoff
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"


def test_generated_janus_is_loopback_only_with_one_plugin_and_a_secret():
    """The test's Janus: HTTP on 127.0.0.1 only, no admin API, only VideoRoom, API secret and room pin."""
    janus = JanusProcess().start()
    try:
        info = janus_request(janus.url, {"janus": "info", "transaction": "t"})
        assert list(info["plugins"]) == ["janus.plugin.videoroom"], info["plugins"]
        assert list(info["transports"]) == ["janus.transport.http"], info["transports"]
        assert info["api_secret"] is True
        refused = janus_request(janus.url, {"janus": "create", "transaction": "t"})
        assert refused["janus"] == "error" and refused["error"]["code"] == 403, refused
        with pytest.raises(urllib.error.HTTPError) as admin:
            urllib.request.urlopen(janus.url.replace("/janus", "/admin"), timeout=5)
        assert admin.value.code == 404
        other = second_address()
        if other:
            with pytest.raises(OSError):
                urllib.request.urlopen(janus.url.replace("127.0.0.1", other) + "/info", timeout=5)
        # the room exists, and joining it without its pin is refused
        session = janus_request(janus.url, {"janus": "create", "transaction": "t", "apisecret": janus.secret})
        base = f"{janus.url}/{session['data']['id']}"
        handle = janus_request(base, {"janus": "attach", "plugin": "janus.plugin.videoroom",
                                      "transaction": "t", "apisecret": janus.secret})["data"]["id"]
        listed = janus_request(f"{base}/{handle}", {
            "janus": "message", "transaction": "t", "apisecret": janus.secret,
            "body": {"request": "listparticipants", "room": ROOM}})
        assert listed["plugindata"]["data"].get("participants") == [], listed  # the configured room
        joined = janus_request(f"{base}/{handle}", {
            "janus": "message", "transaction": "t", "apisecret": janus.secret,
            "body": {"request": "join", "ptype": "publisher", "room": ROOM, "pin": "wrong pin!"}})
        assert joined["janus"] == "ack"  # refused asynchronously: read the event
        with urllib.request.urlopen(f"{base}?apisecret={janus.secret}&maxev=1", timeout=40) as reply:
            event = json.loads(reply.read())
        assert event["plugindata"]["data"]["error_code"] == 433, event  # unauthorized (pin)
    finally:
        janus.close()


@needs_chromium
def test_kiosk_takes_the_avatar_from_janus_and_sends_its_microphone_to_the_bridge(tmp_path):
    """A kiosk page through the SFU: the avatar (and the operator's voice) from Janus, its microphone
    (the robot's voice) on an audio-only connection straight to the bridge."""
    from browser import FAKE_CAMERA, tone_bursts
    from test_webrtc import Pusher

    from gaga_ros.stream import StreamServer

    janus = JanusProcess().start()
    wav = tone_bursts(tmp_path / "room.wav", seconds=4.0, freq=300, every=0.8, length=0.4, amplitude=0.3)
    try:
        with StreamServer(port=0, sfu=SfuSettings(janus.url, ROOM, janus.secret)) as server, Pusher(server):
            assert wait_for(lambda: server.stats()["sfu"]["state"] == "publishing", 60), server.stats()["sfu"]

            async def main():
                flags = [*FAKE_CAMERA, f"--use-file-for-fake-audio-capture={wav}"]
                async with Browser(extra_flags=flags) as b:
                    kiosk = await b.new_page(server.url + "kiosk")
                    await kiosk.wait_for("gaga.state === 'connected' && gaga.frames > 10", timeout=90)
                    assert await kiosk.evaluate("gaga.viaSfu")
                    assert await until(lambda: any(c["audio_frames"] > 50 for c in
                                                   server.stats()["per_client"].values()), 60)
                    return server.stats(), await decoding(kiosk, 20)

            stats, frames = asyncio.run(main())
    finally:
        janus.close()
    (client,) = stats["per_client"].values()  # the microphone's connection, and nothing else direct
    assert client["role"] == "kiosk" and client["frames_sent"] == 0, client
    assert stats["sfu"]["viewers"] == 1 and frames > 30


@pytest.fixture(scope="module")
def sfu_graph(tmp_path_factory):
    """Janus, then the test graph with the bridge publishing into it, and an Observer."""
    janus = JanusProcess().start()
    old = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = janus.secret  # the bridge reads it from its environment
    params = {k: dict(v) for k, v in GRAPH_PARAMS.items()}
    params["bridge"].update(sfu="janus", janus_url=janus.url, janus_room=ROOM)
    g = Graph(tmp_path_factory.mktemp("sfu_graph"), params)
    obs = Observer()
    g.start_all()
    try:
        assert obs.serving(timeout=150), "graph never served frames:\n" + "\n".join(
            f"--- {n}\n{g.log(n)[-1500:]}" for n in g.procs)
        assert wait_for(lambda: obs.status("bridge")[2].get("sfu_state") == "publishing", 60), (
            obs.status("bridge"), g.log("bridge")[-3000:], janus.tail())
        yield g, obs, janus
    finally:
        g.stop()
        obs.close()
        janus.close()
        if old is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = old


async def decoding(page, more: int = 10, timeout: float = 60.0) -> int:
    """Wait until the page decoded `more` further frames; the count."""
    start = await page.evaluate("gaga.frames")
    await page.wait_for(f"gaga.frames >= {start + more}", timeout=timeout)
    return await page.evaluate("gaga.frames")


@needs_chromium
@pytest.mark.slow
def test_viewers_decode_the_avatar_through_janus(sfu_graph):
    """Four viewers decode the rendered avatar from Janus; one killed leaves the others decoding and
    is dropped later; a late joiner gets a picture; Janus's keyframe requests reached the encoder."""
    g, obs, janus = sfu_graph

    async def main():
        async with Browser() as browser, Browser() as lone:
            pages = [await browser.new_page(g.url) for _ in range(3)]
            pages.append(await lone.new_page(g.url))
            for page in pages:
                await page.wait_for("gaga.state === 'connected' && gaga.frames > 5", timeout=90)
            assert all([await p.evaluate("gaga.viaSfu") for p in pages])
            # the operator's voice comes along (silence while no operator talks)
            assert await pages[0].evaluate("voice.srcObject.getAudioTracks()[0].readyState") == "live"
            # what the page shows is the rendered avatar: its size and colours
            shown = await pages[0].evaluate("[video.videoWidth, video.videoHeight, gaga.meanColor()]")
            assert await until(lambda: obs.status("bridge")[2].get("sfu_viewers") == "4", 30), \
                obs.status("bridge")
            lone.kill()  # a crashed viewer: no goodbye to Janus
            after = [await decoding(p, 20) for p in pages[:3]]
            joined = time.monotonic()
            late = await browser.new_page(g.url)
            await late.wait_for("gaga.frames > 0", timeout=LATE_JOINER_BOUND_S)
            first_frame_s = time.monotonic() - joined
            # Janus's ICE keepalive checks (minimal_config) find the killed viewer gone (about 50 s):
            # its subscription is freed, not kept forever
            assert await until(lambda: obs.status("bridge")[2].get("sfu_viewers") == "4", 150), \
                obs.status("bridge")
            return shown, after, first_frame_s

    (width, height, mean), after, first_frame_s = asyncio.run(main())
    frame = obs.last_frame
    size = GRAPH_PARAMS["render"]["size"]
    assert (width, height) == (frame.width, frame.height) == (size, size)
    rendered = np.frombuffer(bytes(frame.data), np.uint8).reshape(size, size, 3).mean(axis=(0, 1))
    assert np.abs(np.array(mean) - rendered).max() < 25, (mean, rendered)  # the avatar, not a blank
    assert all(n > 25 for n in after), after
    print(f"late joiner's first frame after {first_frame_s:.2f} s (page load included)")
    level, message, values = obs.status("bridge")
    assert level == OK and "through Janus" in message, (level, message)
    assert int(values["peer_keyframes"]) >= 1, values  # PLI/FIR from Janus reached the encoder
    assert values["clients"] == "0", values  # nobody was served directly
    assert "Traceback" not in g.log("bridge")


@needs_chromium
@pytest.mark.slow
def test_janus_killed_then_restarted(sfu_graph):
    """Janus dies: the bridge says ERROR naming the URL and the page says it reconnects; Janus back:
    the bridge publishes again and the page decodes again, without a traceback in the bridge's log."""
    g, obs, janus = sfu_graph

    async def main():
        async with Browser() as browser:
            page = await browser.new_page(g.url)
            await page.wait_for("gaga.state === 'connected' && gaga.frames > 5", timeout=90)
            janus.kill()
            assert await until(lambda: obs.status("bridge")[0] == ERROR, 60), obs.status("bridge")
            said = await page.wait_for(
                "gaga.explained && gaga.explained[0] && gaga.explained[0].startsWith('Reconnecting') && "
                "gaga.explained[0]", timeout=60)
            error = obs.status("bridge")[1]
            janus.start()
            assert await until(lambda: obs.status("bridge")[0] == OK, 60), obs.status("bridge")
            await page.wait_for("gaga.state === 'connected'", timeout=60)
            frames = await decoding(page, 20)
            return said, error, frames

    said, error, frames = asyncio.run(main())
    assert janus.url in error and "retrying" in error, error
    assert said == "Reconnecting to the robot"
    assert frames > 25
    assert int(obs.status("bridge")[2]["sfu_publishes"]) >= 2
    assert "Traceback" not in g.log("bridge"), g.log("bridge")[-3000:]


@pytest.mark.slow
def test_a_bridge_killed_and_restarted_takes_the_room_back(sfu_graph):
    """A crashed bridge's publisher lingers in Janus (its session times out after 60 s): the restarted
    bridge kicks it (it has the room's secret) and publishes at once."""
    g, obs, janus = sfu_graph
    g.kill("bridge")
    obs.diag.pop("gaga_ros: bridge", None)
    restarted = time.monotonic()
    g.start("bridge")

    def published_after_kick() -> bool:
        log = g.log("bridge")  # the old bridge never met a stale publisher: these lines are the new one's
        return -1 < log.rfind("stale publisher holds feed 1") < log.rfind("publishing into room")

    assert wait_for(published_after_kick, 90), g.log("bridge")[-3000:]
    print(f"publishing again {time.monotonic() - restarted:.1f} s after the restart (process start in it)")
    assert wait_for(lambda: obs.status("bridge")[2].get("sfu_state") == "publishing", 30), \
        obs.status("bridge")
