"""The stream server's HTTP side against web pages and hostile clients, over real sockets: Host and
Origin checks (DNS rebinding, cross-origin pages), JSON-only POSTs, CSRF tokens, no CORS, the token
on loopback, offer floods, offers that break aiortc, slow and oversize requests; and a hostile page
in real headless Chromium that tries to move the face."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection
from browser import Browser
from conftest import wait_for
from test_webrtc import Pusher, csrf_headers, needs_chromium

from gaga_ros.expression import Expression
from gaga_ros.stream import StreamConfigError, StreamServer

EXPRESSION = {"face_model": 0, "jaw_pose": [0.5, 0, 0]}
#: A second loopback address: an attacker's offers counted apart from the viewer's (127.0.0.1).
OTHER_LOOPBACK = "127.0.0.2"


async def _real_offer() -> str:
    """The SDP offer of a real aiortc peer, shaped like the viewer's (video + data channel)."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("expression")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()  # it never answers ICE checks: the server's peer stays pending
    return sdp


@pytest.fixture(scope="module")
def offer_sdp() -> str:
    return asyncio.run(_real_offer())


def raw(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], str]:
    """Send bytes as they are (any Host, any header) and read one response: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body.decode(errors="replace")


def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], str]:
    head = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return raw(port, f"GET {path} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())


def post(port: int, path: str, body: bytes, **headers: str) -> tuple[int, dict[str, str], str]:
    head = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return raw(port, f"POST {path} HTTP/1.1\r\n{head}Content-Length: {len(body)}\r\nConnection: close"
                     "\r\n\r\n".encode() + body)


def csrf(port: int) -> str:
    status, _, text = get(port, "/config", Host=f"127.0.0.1:{port}")
    assert status == 200
    return json.loads(text)["csrf"]


# -- Host, Origin, content type, CSRF, CORS ------------------------------------------------------

def test_wrong_host_is_refused_ip_literals_localhost_and_allowed_hosts_pass():
    """DNS rebinding makes a hostile name resolve here: its Host header gives it away."""
    got: list[Expression] = []
    with StreamServer(port=0, allowed_hosts=["robot.local"], on_expression=got.append) as server:
        p = server.port
        for host, want in [(f"attacker.example:{p}", 403), ("attacker.example", 403),
                           (f"127.0.0.1.nip.io:{p}", 403), (f"robot.local.evil.example:{p}", 403),
                           (f"127.0.0.1:{p}", 200), (f"[::1]:{p}", 200), ("10.1.2.3", 200),
                           (f"localhost:{p}", 200), (f"ROBOT.local:{p}", 200), ("robot.local.", 200),
                           ("", 400), (f"127.0.0.1:{p}x", 400)]:
            status, _, text = get(p, "/config", Host=host)
            assert status == want, (host, status, text)
            if want == 403:
                assert "not allowed; add it to allowed_hosts" in text, text
        # the rebinding attack itself: a JSON POST with a valid CSRF token, but under the hostile name
        body = json.dumps(EXPRESSION).encode()
        status, _, text = post(p, "/expression", body, Host=f"attacker.example:{p}",
                               Content_Type="application/json", X_CSRF_Token=csrf(p))
        assert status == 403 and "allowed_hosts" in text
    assert got == []


def test_foreign_origin_is_refused_same_origin_and_allowed_origins_pass():
    with StreamServer(port=0, allowed_origins=["https://robot.example"]) as server:
        p = server.port
        for origin, want in [(f"http://127.0.0.1:{p}", 200), ("https://robot.example", 200),
                             ("https://ROBOT.example:443", 200), ("http://evil.example", 403),
                             (f"http://127.0.0.1:{p + 1}", 403), (f"https://127.0.0.1:{p}", 403),
                             (f"http://localhost:{p}", 403), ("null", 403),
                             ("https://robot.example.evil", 403)]:
            status, headers, text = get(p, "/config", Host=f"127.0.0.1:{p}", Origin=origin)
            assert status == want, (origin, status, text)
            assert not any(k.startswith("access-control-") for k in headers), headers
            if want == 403:
                assert "not allowed" in text and "allowed_origins" in text, text
    with pytest.raises(StreamConfigError, match="allowed_origins"):
        StreamServer(allowed_origins=["robot.example/path"])
    with pytest.raises(StreamConfigError, match="allowed_hosts"):
        StreamServer(allowed_hosts=["http://robot.local"])


def test_cross_origin_simple_post_is_refused_and_not_delivered():
    """The reproduced attack: text/plain needs no CORS preflight, so a page elsewhere could send it."""
    got: list[Expression] = []
    with StreamServer(port=0, on_expression=got.append) as server:
        p = server.port
        body = json.dumps(EXPRESSION).encode()
        status, _, text = post(p, "/expression", body, Host=f"127.0.0.1:{p}", Origin="http://evil.example",
                               Content_Type="text/plain")
        assert status == 403 and "Origin" in text, (status, text)
        # without an Origin (a browser that omits it): the content type alone stops it
        token = csrf(p)
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                      "application/octet-stream"):
            for path in ("/expression", "/offer"):
                status, _, text = post(p, path, body, Host=f"127.0.0.1:{p}", Content_Type=ctype,
                                       X_CSRF_Token=token)
                assert status == 415 and "accepted is application/json" in text, (ctype, path, status, text)
        assert got == []
        status, _, text = post(p, "/expression", body, Host=f"127.0.0.1:{p}", X_CSRF_Token=token,
                               Content_Type="application/json; charset=utf-8")
        assert status == 200, text  # the control: the same expression, sent the accepted way
    assert len(got) == 1


def test_posts_need_a_csrf_token_this_server_issued():
    got: list[Expression] = []
    with StreamServer(port=0, on_expression=got.append) as server, StreamServer(port=0) as other:
        p = server.port
        body = json.dumps(EXPRESSION).encode()
        json_ct = {"Host": f"127.0.0.1:{p}", "Content_Type": "application/json"}
        status, _, text = post(p, "/expression", body, **json_ct)
        assert status == 403 and "X-CSRF-Token header missing" in text and "GET /config" in text, text
        status, _, text = post(p, "/offer", b'{"type": "offer", "sdp": "v=0"}', **json_ct)
        assert status == 403 and "X-CSRF-Token" in text
        token = csrf(p)
        nonce, mac = token.split(".")
        for forged in ("x", f"{nonce}.{'0' * len(mac)}", f"{'0' * len(nonce)}.{mac}", f"{nonce}.{mac}ä",
                       csrf(other.port)):
            status, _, text = post(p, "/expression", body, **json_ct, X_CSRF_Token=forged)  # sent as UTF-8
            assert status == 403 and "not one this server issued" in text, (forged, status, text)
        assert got == []
        assert csrf(p) != token, "each page session gets its own token"
        status, _, text = post(p, "/expression", body, **json_ct, X_CSRF_Token=token)
        assert status == 200, text
    assert len(got) == 1


def test_preflight_is_refused_and_no_cors_header_is_ever_sent():
    with StreamServer(port=0) as server:
        p = server.port
        preflight = {"Host": f"127.0.0.1:{p}", "Access_Control_Request_Method": "POST",
                     "Access_Control_Request_Headers": "content-type,x-csrf-token"}
        for origin, want in [("http://evil.example", 403), (f"http://127.0.0.1:{p}", 405), (None, 405)]:
            for path in ("/offer", "/expression", "/config"):
                headers = dict(preflight, **({"Origin": origin} if origin else {}))
                status, got, text = raw(p, f"OPTIONS {path} HTTP/1.1\r\n".encode() + "".join(
                    f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items()).encode() +
                    b"Connection: close\r\n\r\n")
                assert status == want, (origin, path, status, text)
                assert not any(k.startswith("access-control-") for k in got), got
                assert ("preflight refused" if want == 405 else "not allowed") in text, text


def test_token_on_loopback_requires_the_token_from_local_clients_too():
    token = "correct-horse-battery"
    with pytest.raises(StreamConfigError, match="token_on_loopback needs a token"):
        StreamServer(token_on_loopback=True)
    with StreamServer(port=0, token=token, token_on_loopback=True) as server:
        p = server.port
        assert get(p, "/", Host="127.0.0.1")[0] == 401
        assert get(p, "/config", Host="127.0.0.1")[0] == 401
        assert get(p, "/config?token=wrong-token-123", Host="127.0.0.1")[0] == 403
        assert get(p, f"/?token={token}", Host="127.0.0.1")[0] == 200
        assert get(p, "/config", Host="127.0.0.1", Authorization=f"Bearer {token}")[0] == 200
    with StreamServer(port=0, token=token) as server:  # the default: loopback is free
        assert get(server.port, "/config", Host="127.0.0.1")[0] == 200


# -- offers ---------------------------------------------------------------------------------------

def offer_request(port: int, sdp: str, token: str) -> tuple[int, dict[str, str], str]:
    return post(port, "/offer", json.dumps({"type": "offer", "sdp": sdp}).encode(), Host="127.0.0.1",
                Content_Type="application/json", X_CSRF_Token=token)


def test_offer_that_breaks_aiortc_gets_400_and_frees_its_slot(offer_sdp):
    """The video mid missing from BUNDLE made aiortc raise AttributeError: HTTP 500, slot kept 30 s."""
    lines = offer_sdp.splitlines()
    bundle = next(line for line in lines if line.startswith("a=group:BUNDLE"))
    mids = bundle.split()[1:]
    assert mids == ["0", "1"], bundle  # video is mid 0, the data channel mid 1
    bad = "\r\n".join("a=group:BUNDLE x 1" if line == bundle else line for line in lines) + "\r\n"
    with StreamServer(port=0, max_pending=1) as server:
        token = csrf(server.port)
        status, _, text = offer_request(server.port, bad, token)
        assert status == 400 and "cannot use this offer" in text, (status, text)
        assert server.pending == 0 and server.stats()["per_client"] == {}
        status, _, text = offer_request(server.port, offer_sdp, token)  # the only pending slot is free
        assert status == 200, text
        assert server.pending == 1 and server.clients == 0


def test_pending_offers_are_capped_rate_limited_per_address_and_expire(offer_sdp):
    with StreamServer(port=0, max_pending=2, offer_limit=3) as server:
        token = csrf(server.port)
        assert [offer_request(server.port, offer_sdp, token)[0] for _ in range(2)] == [200, 200]
        assert server.pending == 2 and server.clients == 0  # pending offers are not viewers
        status, headers, text = offer_request(server.port, offer_sdp, token)
        assert status == 503 and "still connecting" in text and int(headers["retry-after"]) >= 1
        status, headers, text = offer_request(server.port, offer_sdp, token)
        assert status == 429 and "more than 3 offers" in text, (status, text)
        assert 1 <= int(headers["retry-after"]) <= 10
        # another address is counted apart: it gets the 503 of full slots, not the 429
        with socket.create_connection(("127.0.0.1", server.port), source_address=(OTHER_LOOPBACK, 0)) as s:
            body = json.dumps({"type": "offer", "sdp": offer_sdp}).encode()
            s.sendall(f"POST /offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"X-CSRF-Token: {token}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                      .encode() + body)
            assert s.recv(4096).split()[1] == b"503"
    with StreamServer(port=0, pending_timeout_s=1.0) as server:
        start = time.monotonic()
        assert offer_request(server.port, offer_sdp, csrf(server.port))[0] == 200
        assert server.pending == 1
        assert wait_for(lambda: server.pending == 0, timeout=5), "the offer never expired"
        assert server.stats()["per_client"] == {}
        assert time.monotonic() - start >= 0.9, "dropped before pending_timeout_s"


def test_full_pending_slots_give_way_to_a_new_offer_after_the_grace(offer_sdp):
    """All slots taken: the oldest answered offer is dropped for a new one once it had 30 % of
    pending_timeout_s (here 1.5 s) to connect, long before it would expire (5 s)."""
    with StreamServer(port=0, max_pending=1, pending_timeout_s=5.0, offer_limit=100) as server:
        token = csrf(server.port)
        start = time.monotonic()
        assert offer_request(server.port, offer_sdp, token)[0] == 200
        first = set(server.stats()["per_client"])
        statuses = []
        # a client retrying as the 503 says; the first offer would expire at 5 s
        assert wait_for(lambda: statuses.append(offer_request(server.port, offer_sdp, token)[0])
                        or statuses[-1] == 200, timeout=4, interval=0.1), statuses
        waited = time.monotonic() - start
        assert server.pending == 1 and not first & set(server.stats()["per_client"]), "first not dropped"
    assert statuses[0] == 503, statuses
    assert 1.4 <= waited < 4, waited


@needs_chromium
def test_viewer_gets_in_while_another_address_floods_offers(offer_sdp):
    """Before: 16 never-connecting offers locked viewers out for ~26 s, renewable. Now an attacker
    flooding from one address is rate-limited, and its offers give way to the viewer's once they
    had their grace (3 s of the default 10 s pending timeout)."""
    with StreamServer(port=0) as server, Pusher(server):
        async def main():
            statuses: Counter[int] = Counter()
            stop = asyncio.Event()

            async def flood():
                connector = aiohttp.TCPConnector(local_addr=(OTHER_LOOPBACK, 0))
                async with aiohttp.ClientSession(connector=connector) as http:
                    headers = await csrf_headers(http, server.url)
                    while not stop.is_set():
                        async with http.post(server.url + "offer", json={"type": "offer", "sdp": offer_sdp},
                                             headers=headers) as r:
                            statuses[r.status] += 1
                        await asyncio.sleep(0.05)

            flooder = asyncio.ensure_future(flood())
            while server.pending < server.max_pending:
                assert not flooder.done(), flooder.exception()
                await asyncio.sleep(0.05)
            start = time.monotonic()
            async with Browser() as browser:
                page = await browser.new_page(server.url)
                await page.wait_for("gaga.connects >= 1 && gaga.frames >= 5", timeout=20)
                waited = time.monotonic() - start
                assert server.clients == 1
            stop.set()
            await flooder
            return statuses, waited

        statuses, waited = asyncio.run(main())
    assert statuses[200] >= 4 and statuses[429] > 0, statuses  # it filled the slots, then was limited
    # the flooder's first offers would expire only at pending_timeout_s: they gave way before that
    assert waited < server.pending_timeout_s, f"the viewer waited {waited:.1f} s"


# -- slow and malformed requests ----------------------------------------------------------------

def test_slow_headers_and_silent_connections_are_closed_slow_bodies_get_408():
    with StreamServer(port=0, request_timeout_s=1.0) as server:
        for first in (b"GET /config HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.settimeout(0.2)
                s.sendall(first)
                start, received, closed = time.monotonic(), b"", False
                while not closed and time.monotonic() - start < 5:
                    try:
                        if first:
                            s.sendall(b"X-Drip: 1\r\n")  # a header line every 0.2 s, never the blank line
                        chunk = s.recv(4096)
                        received += chunk
                        closed = chunk == b""
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        closed = True
                elapsed = time.monotonic() - start
            assert closed and received == b"", (first, received[:80])
            assert 0.8 <= elapsed < 2.5, f"closed after {elapsed:.2f} s; the limit is 1 s"
        token = csrf(server.port)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            start = time.monotonic()
            s.sendall(f"POST /expression HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      f"X-CSRF-Token: {token}\r\nContent-Length: 1000\r\n\r\n{{\"face_model\"".encode())
            reply = s.recv(4096)
            elapsed = time.monotonic() - start
        assert reply.split()[1] == b"408" and b"did not arrive within 1 s" in reply, reply
        assert 0.8 <= elapsed < 2.5, elapsed


def test_oversize_url_and_garbage_log_one_line_without_traceback(caplog):
    caplog.set_level(logging.DEBUG, logger="gaga_ros.stream")
    with StreamServer(port=0) as server:
        status, _, _ = raw(server.port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert status == 400
        assert raw(server.port, b"NOT HTTP\r\n\r\n")[0] == 400
        long_header = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert raw(server.port, long_header)[0] == 400
        assert get(server.port, "/", Host="127.0.0.1")[0] == 200  # still serving
    malformed = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(malformed) == 3, [r.getMessage()[:100] for r in caplog.records]
    assert [r.levelno for r in malformed] == [logging.WARNING, logging.DEBUG, logging.WARNING]
    assert all("\n" not in r.getMessage() and len(r.getMessage()) < 200 for r in malformed)
    assert not [r for r in caplog.records if r.exc_info or r.exc_text], "a traceback was logged"


# -- a hostile page in real Chromium --------------------------------------------------------------

HOSTILE_PAGE = """<!doctype html><html><body><iframe name="sink"></iframe><script>
const target = TARGET;
const body = JSON.stringify({face_model: 0, jaw_pose: [0.5, 0, 0]});
window.results = {};
async function attempt(name, run) {
  try { results[name] = await run(); } catch (e) { results[name] = 'threw ' + e.name; }
}
(async () => {
  await attempt('simple text/plain POST', () => fetch(target + 'expression',
    {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body}).then((r) => r.type));
  await attempt('JSON POST (needs a preflight)', () => fetch(target + 'expression',
    {method: 'POST', headers: {'Content-Type': 'application/json', 'X-CSRF-Token': 'guess'}, body})
    .then((r) => r.status));
  await attempt('read the CSRF token from /config', () => fetch(target + 'config')
    .then((r) => r.json()).then((c) => c.csrf));
  await attempt('sendBeacon', () => navigator.sendBeacon(target + 'expression',
    new Blob([body], {type: 'text/plain'})));
  await attempt('form POST text/plain', () => new Promise((resolve) => {
    const form = document.createElement('form');
    form.method = 'POST'; form.enctype = 'text/plain'; form.action = target + 'expression';
    form.target = 'sink';
    const field = document.createElement('input');
    field.name = body.slice(0, -1) + ', "frame_id": "'; field.value = '"}';  // the body parses as JSON
    form.appendChild(field);
    document.body.appendChild(form);
    document.querySelector('iframe').onload = () => resolve('submitted');
    form.submit();
  }));
  window.done = true;
})();
</script></body></html>"""


#: After DNS rebinding the hostile page is "same origin": it reads /config and POSTs JSON.
REBOUND_ATTEMPT = """(async () => {
  const config = await fetch('/config');
  const post = await fetch('/expression', {method: 'POST', body: BODY,
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': 'guess'}});
  return [config.status, post.status, await config.text()];
})()""".replace("BODY", json.dumps(json.dumps(EXPRESSION)))
#: What the viewer's own page may do (the control): the same POST with its CSRF token.
OWN_PAGE_POST = """(async () => {
  const token = (await (await fetch('/config')).json()).csrf;
  const r = await fetch('/expression', {method: 'POST', body: BODY,
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': token}});
  return r.status;
})()""".replace("BODY", json.dumps(json.dumps(EXPRESSION)))


async def serve_hostile_page(target: str) -> tuple[web.AppRunner, int]:
    """A second web server, on another port, with a page that attacks `target`."""
    page = HOSTILE_PAGE.replace("TARGET", json.dumps(target))

    async def serve(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def wait_refused(server: StreamServer, at_least: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := sum(server.stats()["refused"].values())) < at_least:
        assert time.monotonic() < deadline, f"only {n} requests reached the server and were refused"
        await asyncio.sleep(0.05)
    return n


@needs_chromium
def test_hostile_pages_cannot_move_the_face():
    """A page from another origin (evil.test) and a DNS-rebound one (rebind.test, resolving here)
    try every way a browser lets them; none reaches on_expression. The viewer's own page can."""
    got: list[Expression] = []
    rules = "MAP evil.test 127.0.0.1, MAP rebind.test 127.0.0.1"
    with StreamServer(port=0, on_expression=got.append) as server:
        async def main():
            runner, hostile_port = await serve_hostile_page(server.url)
            try:
                async with Browser(extra_flags=[f"--host-resolver-rules={rules}"]) as browser:
                    page = await browser.new_page(f"http://evil.test:{hostile_port}/")
                    results = await page.wait_for("window.done && results", timeout=20)
                    # each attempt but the preflighted POST reaches the server; the preflight does
                    await wait_refused(server, 5)
                    # DNS rebinding: the browser thinks rebind.test is the page's own origin
                    rebound = await browser.new_page(f"http://rebind.test:{server.port}/")
                    await rebound.wait_for("document.readyState === 'complete'")
                    assert await rebound.evaluate("typeof gaga") == "undefined"  # the viewer was refused
                    rebound_statuses = await rebound.evaluate(REBOUND_ATTEMPT)
                    await wait_refused(server, 8)
                    assert got == [], "a hostile page moved the face"
                    # the control: the viewer's own page, same test, same browser, can move it
                    viewer = await browser.new_page(server.url)
                    await viewer.wait_for("typeof gaga === 'object'")
                    own = await viewer.evaluate(OWN_PAGE_POST)
                    injected = await viewer.evaluate("""(() => {
                        const s = document.createElement('script');
                        s.textContent = 'window.injected = 1';
                        document.body.appendChild(s);
                        return window.injected === undefined;
                    })()""")
                    return results, rebound_statuses, own, injected
            finally:
                await runner.cleanup()

        results, rebound_statuses, own, injected = asyncio.run(main())
        refused = server.stats()["refused"]
    assert results["simple text/plain POST"] == "opaque", results  # sent, answer unreadable
    assert results["JSON POST (needs a preflight)"] == "threw TypeError", results  # preflight refused
    assert results["read the CSRF token from /config"] == "threw TypeError", results
    assert results["form POST text/plain"] == "submitted", results
    assert rebound_statuses[:2] == [403, 403], rebound_statuses
    assert "allowed_hosts" in rebound_statuses[2] and "csrf" not in rebound_statuses[2]
    assert own == 200 and len(got) == 1, (own, got)
    assert injected, "an injected inline script ran: the Content-Security-Policy is missing"
    assert refused[403] >= 8, refused
