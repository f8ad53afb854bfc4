"""Who may talk to the stream server, and from which page.

Three layers, each against a different attacker:
- the token: machines other than this one (loopback passes unless token_on_loopback);
- Host and Origin: web pages in the operator's own browser. A hostile page may send requests here
  (its browser is on loopback), and with DNS rebinding its own name may resolve here, which makes
  it "same origin". The Host check refuses any name but IP literals, localhost and allowed_hosts;
  the Origin check refuses requests that a page of another origin made;
- the CSRF token: state-changing calls must echo a value only a page this server served can read.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets

from aiohttp import web

#: Header in which POSTs send back the CSRF token GET /config handed out (its "csrf" field).
CSRF_HEADER = "X-CSRF-Token"
DEFAULT_PORTS = {"http": 80, "https": 443}


def is_loopback(host: str | None) -> bool:
    """True for loopback addresses and the name localhost (IPv4-mapped IPv6 included)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def presented_token(request: web.Request) -> str | None:
    """The token a request carries: `Authorization: Bearer <t>` or the `token` query parameter."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token")


def token_middleware(token: str | None, on_loopback: bool = False):
    """aiohttp middleware: loopback passes (unless on_loopback); others need the token (401 when
    absent, 403 when wrong).

    A reverse proxy on the same machine makes every client look local: set on_loopback then (or put
    the token check in the proxy).
    """
    expected = token.encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler):
        if is_loopback(request.remote) and not on_loopback:
            return await handler(request)
        given = presented_token(request)
        if given is None:
            raise web.HTTPUnauthorized(text="token required: ?token=... or Authorization: Bearer ...",
                                       headers={"WWW-Authenticate": "Bearer"})
        if expected is None or not hmac.compare_digest(given.encode(), expected):
            raise web.HTTPForbidden(text="wrong token")
        return await handler(request)

    return check


def split_host(value: str) -> tuple[str, int | None]:
    """Host and port of a Host header value ("name:8080", "[::1]:8080", "10.0.0.2"); raises ValueError."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(value)
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(value)
    return host.lower().rstrip("."), int(port) if port else None


def is_ip_literal(host: str) -> bool:
    """An IP address written out: DNS rebinding needs a name the attacker controls, so it is safe."""
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return True


def normal_origin(origin: str) -> str:
    """scheme://host:port with the port always written; raises ValueError for anything else."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in DEFAULT_PORTS or "/" in rest or "@" in rest:
        raise ValueError(origin)
    host, port = split_host(rest)
    return origin_of(scheme, host, port)


def origin_of(scheme: str, host: str, port: int | None) -> str:
    """The normal form of an origin: IPv6 in brackets, the port always written."""
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port or DEFAULT_PORTS[scheme]}"


def host_origin_middleware(allowed_hosts: list[str], allowed_origins: list[str]):
    """aiohttp middleware: refuse unknown Host names (403), foreign Origins (403) and every CORS
    preflight (405; no CORS header is ever sent, so no other origin may read or call the API).

    allowed_hosts: names besides IP literals and localhost. allowed_origins: normal_origin() forms.
    """
    hosts = {"localhost", *(h.lower().rstrip(".") for h in allowed_hosts)}
    origins = set(allowed_origins)

    @web.middleware
    async def check(request: web.Request, handler):
        raw = request.headers.get("Host", "")
        try:
            host, port = split_host(raw)
        except ValueError:
            raise web.HTTPBadRequest(text=f"Host header {raw!r} is missing or malformed: accepted is "
                                          "name[:port] or an IP address[:port]") from None
        if host not in hosts and not is_ip_literal(host):
            raise web.HTTPForbidden(text=f"Host {raw!r} not allowed; add it to allowed_hosts (IP "
                                         "addresses and localhost are always allowed)")
        origin = request.headers.get("Origin")
        if origin is not None:
            own = origin_of(request.scheme, host, port)
            try:
                given = normal_origin(origin)
            except ValueError:
                given = origin
            if given != own and given not in origins:
                raise web.HTTPForbidden(text=f"Origin {origin!r} not allowed: accepted are pages this "
                                             f"server served ({own}) and allowed_origins")
        if request.method == "OPTIONS":
            raise web.HTTPMethodNotAllowed(
                "OPTIONS", ["GET", "POST"], text="CORS preflight refused: this server answers only "
                "pages it served itself (no cross-origin calls)")
        return await handler(request)

    return check


class CsrfTokens:
    """Stateless CSRF tokens: a random nonce and its HMAC under a key made at start.

    GET /config hands one out as "csrf" (another origin's page cannot read it: no CORS), and POSTs
    must send it back in CSRF_HEADER. Valid until the server restarts; the viewer then fetches a
    new one as it reconnects.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _mac(self, nonce: str) -> str:
        return hmac.new(self._key, nonce.encode(), "sha256").hexdigest()

    def issue(self) -> str:
        """A fresh token for one page session."""
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._mac(nonce)}"

    def check(self, request: web.Request) -> None:
        """Raise 403 unless the request carries a token this server issued."""
        given = request.headers.get(CSRF_HEADER)
        if given is None:
            raise web.HTTPForbidden(text=f"{CSRF_HEADER} header missing: send the \"csrf\" value "
                                         "GET /config returned")
        nonce, _, mac = given.partition(".")
        if not (given.isascii() and hmac.compare_digest(mac.encode(), self._mac(nonce).encode())):
            raise web.HTTPForbidden(text=f"{CSRF_HEADER} is not one this server issued (it restarted?): "
                                         "fetch a new one from GET /config")
