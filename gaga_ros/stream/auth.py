"""Who may talk to the stream server: loopback freely, everyone else with the shared token."""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web


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


def token_middleware(token: str | None):
    """aiohttp middleware: loopback passes; others need the token (401 when absent, 403 when wrong).

    A reverse proxy on the same machine makes every client look local: put the token check in the
    proxy then, or bind the server to a non-loopback address.
    """
    expected = token.encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler):
        if is_loopback(request.remote):
            return await handler(request)
        given = presented_token(request)
        if given is None:
            raise web.HTTPUnauthorized(text="token required: ?token=... or Authorization: Bearer ...",
                                       headers={"WWW-Authenticate": "Bearer"})
        if expected is None or not hmac.compare_digest(given.encode(), expected):
            raise web.HTTPForbidden(text="wrong token")
        return await handler(request)

    return check
