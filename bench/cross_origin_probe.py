"""Cross-origin probe: what a hostile web page (or a DNS-rebound one) could make the operator's browser
send to the bridge, sent by hand with the headers that browser would add. Each probe must be refused:
an error status, no CORS header, and (on a server this script started) nothing delivered.

    .venv/bin/python bench/cross_origin_probe.py                          # starts a StreamServer
    .venv/bin/python bench/cross_origin_probe.py --url http://127.0.0.1:8080/   # a running bridge

Writes bench/results/cross_origin.json (or --out). The control, a same-origin POST with the CSRF
token, must be accepted; it is not counted among the probes.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import ssl
import sys
import urllib.parse
from pathlib import Path

from record import write

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from gaga_ros.stream import StreamServer  # noqa: E402

EXPRESSION = json.dumps({"face_model": 0, "jaw_pose": [0.5, 0, 0]}).encode()
EVIL = "http://evil.example"


class Target:
    """The bridge under test: raw HTTP requests with any Host and headers, token carried along."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port or 80
        self.netloc = parts.netloc
        self.query = f"?{parts.query}" if parts.query else ""

    def request(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
        """(status, response headers lower-cased, body text)."""
        if self.scheme == "https":  # a bridge's own certificate is often self-signed
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=30, context=context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.putrequest(method, path + self.query, skip_host=True, skip_accept_encoding=True)
            for name, value in {"Host": self.netloc, **headers}.items():
                conn.putheader(name, value)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            return resp.status, headers, resp.read().decode(errors="replace")
        finally:
            conn.close()

    def csrf(self) -> str:
        status, _, text = self.request("GET", "/config", {})
        if status != 200:
            raise SystemExit(f"GET /config answered {status}: {text[:200]}")
        return json.loads(text).get("csrf", "none")  # a bridge from before CSRF tokens has none


async def real_offer() -> str:
    """An aiortc peer's SDP offer shaped like the viewer's, so an /offer probe that got through would
    really create a peer connection."""
    from aiortc import RTCPeerConnection

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    pc.createDataChannel("expression")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def probes(t: Target, token: str, offer: bytes) -> list[tuple[str, str, str, dict[str, str], bytes | None]]:
    """(kind, method, path, headers, body) for every probe."""
    own = f"{t.scheme}://{t.netloc}"
    other_port = f"{t.scheme}://{t.host}:{t.port + 1}"
    json_ct = {"Content-Type": "application/json"}
    preflight = {"Origin": EVIL, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-csrf-token"}
    rebound = {"Host": f"rebind.example:{t.port}"}
    return [
        ("cross-origin simple POST text/plain /expression", "POST", "/expression",
         {"Origin": EVIL, "Content-Type": "text/plain"}, EXPRESSION),
        ("cross-origin form POST urlencoded /expression", "POST", "/expression",
         {"Origin": EVIL, "Content-Type": "application/x-www-form-urlencoded"}, EXPRESSION),
        ("cross-origin multipart POST /expression", "POST", "/expression",
         {"Origin": EVIL, "Content-Type": "multipart/form-data; boundary=x"}, EXPRESSION),
        ("cross-origin simple POST text/plain /offer", "POST", "/offer",
         {"Origin": EVIL, "Content-Type": "text/plain"}, offer),
        ("cross-origin JSON POST /expression with a valid CSRF token", "POST", "/expression",
         {"Origin": EVIL, **json_ct, "X-CSRF-Token": token}, EXPRESSION),
        ("cross-origin JSON POST /offer with a valid CSRF token", "POST", "/offer",
         {"Origin": EVIL, **json_ct, "X-CSRF-Token": token}, offer),
        ("CORS preflight OPTIONS /offer", "OPTIONS", "/offer", preflight, None),
        ("CORS preflight OPTIONS /expression", "OPTIONS", "/expression", preflight, None),
        ("cross-origin read of /config (CSRF token theft)", "GET", "/config", {"Origin": EVIL}, None),
        ("other port of this host as Origin", "POST", "/expression",
         {"Origin": other_port, **json_ct, "X-CSRF-Token": token}, EXPRESSION),
        ("Origin null (sandboxed iframe, file://)", "POST", "/expression",
         {"Origin": "null", **json_ct, "X-CSRF-Token": token}, EXPRESSION),
        ("DNS rebinding: viewer page under a foreign Host", "GET", "/", rebound, None),
        ("DNS rebinding: read /config under a foreign Host", "GET", "/config", rebound, None),
        ("DNS rebinding: JSON POST /expression under a foreign Host", "POST", "/expression",
         {**rebound, "Origin": f"http://rebind.example:{t.port}", **json_ct, "X-CSRF-Token": token},
         EXPRESSION),
        ("DNS rebinding: JSON POST /offer under a foreign Host", "POST", "/offer",
         {**rebound, "Origin": f"http://rebind.example:{t.port}", **json_ct, "X-CSRF-Token": token}, offer),
        ("text/plain POST without Origin (content type alone)", "POST", "/expression",
         {"Content-Type": "text/plain", "X-CSRF-Token": token}, EXPRESSION),
        ("same-origin JSON POST /expression without CSRF token", "POST", "/expression",
         {"Origin": own, **json_ct}, EXPRESSION),
        ("same-origin JSON POST /offer without CSRF token", "POST", "/offer",
         {"Origin": own, **json_ct}, offer),
        ("same-origin JSON POST with a forged CSRF token", "POST", "/expression",
         {"Origin": own, **json_ct, "X-CSRF-Token": token.split(".")[0] + "." + "0" * 64}, EXPRESSION),
    ]


def run(url: str | None) -> dict:
    """Every probe against url (or a StreamServer started here); rows and the refused count."""
    delivered: list = []
    server = None if url else StreamServer(port=0, on_expression=delivered.append).start()
    try:
        t = Target(url or server.url)
        offer = json.dumps({"type": "offer", "sdp": asyncio.run(real_offer())}).encode()
        rows = []
        for kind, method, path, headers, body in probes(t, t.csrf(), offer):
            before = (len(delivered), server.pending + server.clients) if server else None
            status, got, text = t.request(method, path, headers, body)
            cors = sorted(k for k in got if k.startswith("access-control-"))
            effect = server is not None and (len(delivered), server.pending + server.clients) != before
            rows.append({"kind": kind, "status": status, "refused": status >= 400 and not cors and not effect,
                         "cors_headers": cors, "reason": " ".join(text.split())[:160]})
        own = f"{t.scheme}://{t.netloc}"
        status, _, text = t.request("POST", "/expression", {"Origin": own, "Content-Type": "application/json",
                                                            "X-CSRF-Token": t.csrf()}, EXPRESSION)
        control = {"kind": "control: same-origin JSON POST with the CSRF token", "status": status,
                   "accepted": status == 200 and (server is None or len(delivered) == 1)}
    finally:
        if server is not None:
            server.stop()
    refused = sum(r["refused"] for r in rows)
    return {"url": url or "a StreamServer started by the probe", "probes": rows, "control": control,
            "refused": refused, "total": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running bridge (default: start a StreamServer on loopback)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cross_origin.json")
    args = parser.parse_args()
    result = run(args.url)
    width = max(len(r["kind"]) for r in result["probes"])
    print(f"{'probe':{width}s}  status  refused")
    for r in result["probes"]:
        print(f"{r['kind']:{width}s}  {r['status']:6d}  {'yes' if r['refused'] else 'NO'}")
    c = result["control"]
    print(f"{c['kind']:{width}s}  {c['status']:6d}  accepted: {'yes' if c['accepted'] else 'NO'}")
    write(args.out, result)
    print(f"\ncross-origin probes refused: {result['refused']} of {result['total']}")
    if not c["accepted"]:
        raise SystemExit("the control was not accepted: the probe cannot tell a refusal from a broken server")


if __name__ == "__main__":
    main()
