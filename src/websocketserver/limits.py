"""Limits: what keeps one client from exhausting the server.

* :class:`GuardedSite` listens like aiohttp's ``TCPSite`` but gives every connection
  ``--handshake_timeout`` seconds for its TLS handshake and its first request's
  headers; a connection that dribbles (slowloris) is closed.
* :class:`TunnelLimits` counts tunnels globally, per client address and per user,
  and says why a new one is refused.
* :func:`origin_allowed` is the websocket ``Origin`` policy (cross-site websocket
  hijacking): browsers always send ``Origin``, so a page on another site can be
  refused; clients that are not browsers send none and are not affected.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("websocketserver.limits")


class HandshakeGuard:
    """Closes connections that have not sent a request's headers within ``timeout``.

    Listen with a :class:`GuardedSite` and call :meth:`seen` for every request.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pending: dict[RequestHandler, asyncio.TimerHandle] = {}

    def seen(self, request: web.BaseRequest) -> None:
        """The request's headers arrived: its connection is past the handshake."""
        timer = self._pending.pop(request.protocol, None)  # type: ignore[arg-type]
        if timer is not None:
            # Cancelled now rather than left to fire: at thousands of connections a
            # second, timers left pending would hold that many handlers for
            # ``timeout`` seconds (memory, and work for the garbage collector).
            timer.cancel()

    def protocol_factory(self, server: web.Server) -> Callable[[], RequestHandler]:
        loop = asyncio.get_running_loop()

        def connection() -> RequestHandler:
            handler = server()
            self._pending[handler] = loop.call_later(self.timeout, self._expire, handler)
            return handler

        return connection

    def _expire(self, handler: RequestHandler) -> None:
        if self._pending.pop(handler, None) is not None:
            transport = handler.transport
            if transport is not None and not transport.is_closing():
                peer = transport.get_extra_info("peername")
                log.warning("closing connection from %s: no request within %g s",
                            peer[0] if peer else "?", self.timeout)
                transport.abort()  # at once, even mid-TLS: no close_notify dance


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite``, with a :class:`HandshakeGuard` on every connection."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 ssl_context: ssl.SSLContext | None, backlog: int,
                 guard: HandshakeGuard) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"{self._host or '*'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, web.Server)
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server), self._host, self._port,
            ssl=self._ssl_context, backlog=self._backlog, reuse_address=True,
            ssl_handshake_timeout=self._guard.timeout if self._ssl_context else None)


class LimitExceeded(Exception):
    """A new tunnel would exceed a limit; ``status`` is the HTTP status to refuse with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TunnelLimits:
    """Counts of live tunnels (including ones still starting their service)."""

    def __init__(self, total: int, per_client: int, per_user: int) -> None:
        self.max_total, self.max_per_client, self.max_per_user = total, per_client, per_user
        self.total = 0
        self._clients: Counter[str] = Counter()
        self._users: Counter[str] = Counter()

    def acquire(self, client: str, user: str | None) -> None:
        """Count a new tunnel, or raise :class:`LimitExceeded` saying which limit."""
        if self.total >= self.max_total:
            raise LimitExceeded(503, f"server is at its limit of {self.max_total} tunnels")
        if self._clients[client] >= self.max_per_client:
            raise LimitExceeded(429, f"client {client} is at its limit of "
                                     f"{self.max_per_client} tunnels")
        if user is not None and self._users[user] >= self.max_per_user:
            raise LimitExceeded(429, f"user {user} is at its limit of "
                                     f"{self.max_per_user} tunnels")
        self.total += 1
        self._clients[client] += 1
        if user is not None:
            self._users[user] += 1

    def release(self, client: str, user: str | None) -> None:
        self.total -= 1
        _decrement(self._clients, client)
        if user is not None:
            _decrement(self._users, user)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def origin_allowed(origin: str | None, allowed: Iterable[str]) -> bool:
    """Whether a websocket with this ``Origin`` header may connect.

    No allow-list (the default, as in the original server) or ``*`` allows any
    origin; a request without ``Origin`` comes from a non-browser client and is
    allowed.
    """
    allowed = tuple(allowed)
    if not allowed or "*" in allowed or origin is None:
        return True
    return origin.rstrip("/").lower() in {a.rstrip("/").lower() for a in allowed}
