"""Limits: what keeps one client from exhausting the server.

* :class:`GuardedSite` listens like aiohttp's ``TCPSite`` but gives every connection
  ``--handshake_timeout`` seconds for its TLS handshake and its first request's
  headers; a connection that dribbles (slowloris) is closed. (The requests after the
  first are bounded by aiohttp's ``keepalive_timeout``, see ``http_port/port.py``.) It
  accepts connections itself, so that running out of descriptors is logged, and
  stops accepting at ``--max_http_connections`` (the rest wait in the backlog).

(The websocket ``Origin`` policy is pure and lives with the upgrade decision:
``protocol.origin_allowed``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import math
import os
import socket
import ssl
import sys
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .logs import Sampled

log = logging.getLogger("websocketserver.limits")
_silent = Sampled(log)  # connections that send nothing: a few lines per 10 s, then a count


class HandshakeGuard:
    """Closes connections that have not sent their first request's headers within
    ``timeout``; the HTTP server's ``keepalive_timeout`` bounds the requests after it.

    Listen with a :class:`GuardedSite` and call :meth:`seen` for every request.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._pending: dict[RequestHandler, asyncio.TimerHandle] = {}

    def seen(self, request: web.BaseRequest) -> None:
        """The request's headers arrived: its connection is past the handshake."""
        timer = self._pending.pop(request.protocol, None)
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
                _silent.warning("closing connection from %s: no request within %g s",
                                peer[0] if peer else "?", self.timeout)
                transport.abort()  # at once, even mid-TLS: no close_notify dance


class GuardedSite(web.BaseSite):
    """aiohttp's ``TCPSite``, with a :class:`HandshakeGuard` on every connection and an
    :class:`Acceptor` that reports running out of descriptors."""

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int, *,
                 ssl_context: ssl.SSLContext | None, backlog: int,
                 guard: HandshakeGuard, most: int, count: Callable[[], int]) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._most = most
        self._count = count

    @property
    def name(self) -> str:
        return f"{self._host or '*'}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, web.Server)
        sockets = await _listen(self._host, self._port, self._backlog)
        self._server = Acceptor(sockets, self._guard.protocol_factory(server),
                                self._ssl_context, self._guard.timeout, self._most,
                                self._count)


ACCEPT_RETRY = 0.1
"""Seconds accepting pauses after ``accept()`` failed (mostly: no descriptor left)."""
ACCEPT_LOG_INTERVAL = 10.0
"""At most one log line per this many seconds while ``accept()`` keeps failing."""

_RAISE_LIMIT = "raise it, e.g. LimitNOFILE, or see who holds the connections"
_ACCEPT_BATCH = 128
"""Connections accepted per wake-up at most: the rest wait for the next loop iteration."""
_TRANSIENT = (BlockingIOError, InterruptedError, ConnectionAbortedError)
_Starting = asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]]


class Acceptor(asyncio.AbstractServer):
    """Accepts on listening sockets and hands each connection to the event loop, at most
    ``most`` at once (``count``: those open, besides the ones in their TLS handshake).

    Why not ``loop.create_server``: under uvloop, libuv meets ``accept()`` failing
    with EMFILE/ENFILE by accepting and dropping the waiting connections, and tells
    nobody; the server then answers nothing and logs nothing. Here such a failure is
    logged (once per :data:`ACCEPT_LOG_INTERVAL`) and accepting pauses for
    :data:`ACCEPT_RETRY`, leaving new connections in the listen backlog until
    descriptors are free again (the handshake and keep-alive timeouts free them). At
    ``most`` connections it pauses likewise: each holds up to a request head of memory.
    """

    def __init__(self, sockets: list[socket.socket], factory: Callable[[], asyncio.Protocol],
                 context: ssl.SSLContext | None, handshake_timeout: float, most: int,
                 count: Callable[[], int]) -> None:
        self._loop = asyncio.get_running_loop()
        self.sockets = sockets
        self._factory = factory
        self._most = most
        self._count = count
        self._context = context
        self._handshake_timeout = handshake_timeout if context is not None else None
        self._starting: set[_Starting] = set()  # connections in their TLS handshake
        self._retry: asyncio.TimerHandle | None = None
        self._serving = True
        self._logged_at = -math.inf
        self._resume()

    def _resume(self) -> None:
        self._retry = None
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self._count() + len(self._starting) >= self._most:
                self._pause(sock, f"at its limit of {self._most} connections "
                                  "(--max_http_connections)")
                return
            try:
                conn, _ = sock.accept()
            except _TRANSIENT:
                return
            except OSError as exc:
                hint = (f" (open-file limit {_open_file_limit()}: {_RAISE_LIMIT})"
                        if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
                self._pause(sock, f"cannot accept connections: {exc}{hint}")
                return
            task = self._loop.create_task(self._loop.connect_accepted_socket(
                self._factory, conn, ssl=self._context,
                ssl_handshake_timeout=self._handshake_timeout))
            self._starting.add(task)
            task.add_done_callback(self._started)

    def _started(self, task: _Starting) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A failed or timed-out TLS handshake: the client's doing, the connection is gone.
            log.debug("connection not started: %s", task.exception())

    def _pause(self, sock: socket.socket, why: str) -> None:
        """Stop accepting for a moment; say why, but not at every attempt."""
        for listening in self.sockets:
            self._loop.remove_reader(listening.fileno())
        self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume)
        now = self._loop.time()
        if now - self._logged_at < ACCEPT_LOG_INTERVAL:
            return
        self._logged_at = now
        log.error("port %s: %s; new connections wait in the backlog",
                  sock.getsockname()[1], why)

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
        for sock in self.sockets:
            sock.close()
        for task in self._starting:
            task.cancel()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        """Accepting starts with the object: nothing to do."""

    async def serve_forever(self) -> None:
        raise NotImplementedError("an Acceptor is served by an aiohttp runner")

    async def wait_closed(self) -> None:
        if self._starting:
            await asyncio.wait(self._starting)


async def _listen(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (``None``: all interfaces), as
    ``loop.create_server`` makes them; an ``OSError`` if one cannot be bound."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


DESCRIPTOR_CHECK = 1.0
"""Seconds between counts of the process's open descriptors (:func:`watch_descriptors`)."""


async def watch_descriptors(ws_port: int) -> None:
    """Say when the process runs out of descriptors, which the websocket port cannot.

    There uvloop's libuv meets ``accept()`` failing with EMFILE by accepting and
    closing the waiting connections, and tells nobody. So the open descriptors are
    counted every DESCRIPTOR_CHECK s (Linux: ``/proc/self/fd``); at the limit (within
    two), one ERROR line per ACCEPT_LOG_INTERVAL. Returns at once where it cannot count.
    """
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    loop = asyncio.get_running_loop()
    logged_at = -math.inf
    while True:
        await asyncio.sleep(DESCRIPTOR_CHECK)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            used = len(os.listdir("/proc/self/fd"))
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return  # no /proc: nothing to count with
            used = limit  # not even one left to look with
        if used >= limit - 2 and loop.time() - logged_at >= ACCEPT_LOG_INTERVAL:
            logged_at = loop.time()
            log.error("websocket port %d: %d of %d open files in use: new connections "
                      "are dropped until some close (%s)", ws_port, used, limit, _RAISE_LIMIT)


def _open_file_limit() -> str:
    try:
        import resource
    except ImportError:  # not a POSIX system
        return "unknown"
    return str(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): nothing to trim with
        return None


_LIBC = _libc()


def give_back_memory() -> None:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``).

    After a burst of connections their buffers are freed but stay in the heap, held
    by a few live objects between them: 400 request heads left 28 MiB in the process
    (700 MiB before heads were bounded) until this ran. Costs about a millisecond.
    """
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.malloc_trim(0)
