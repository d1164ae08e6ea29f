"""The server's lifecycle: start both listeners, serve, and shut down in order.

Shutdown is one path whatever asks for it (``/v1/stop``, SIGTERM, SIGINT, SIGHUP):
refuse new work, close every tunnel (each one stops its service), stop the
listeners, exit 0. :func:`run` wraps it all in the supervisor of
:mod:`.processes`, which then ends any process that is still left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import re
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter

from . import processes
from .api import RestApi, json_error
from .files import FileServer
from .identity import Identity
from .limits import GuardedSite, HandshakeGuard
from .logs import configure_logging
from .metrics import Metrics
from .relay import RelayPool
from .reservations import MemoryStore
from .services import ServiceManager
from .settings import Settings, SettingsError
from .websocket import WebSocketGateway, protocol_refusal

log = logging.getLogger("websocketserver.server")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters (malloc.h)

SHUTDOWN_TIMEOUT = 15.0
"""Upper bound for closing tunnels and stopping services at exit."""
_API_PATH = re.compile(r"/v\d+(/|$)")

Listen = Callable[[int, ssl.SSLContext | None], Awaitable[list[tuple[str, int]]]]


class Server:
    """Both listeners and everything behind them; ``start``, ``wait``, ``close``."""

    def __init__(self, settings: Settings, relays: RelayPool | None = None) -> None:
        self.settings = settings
        self.identity = Identity(settings)
        self.metrics = Metrics()
        self.services = ServiceManager(settings, MemoryStore(), self.identity, self.metrics)
        self.gateway = WebSocketGateway(settings, self.services)
        if relays is not None:
            self.gateway.attach_relays(relays)
        self.api = RestApi(self.services, settings.security_token, self.request_stop)
        self.files = (FileServer(settings.http_directory, settings.ansys_install_root)
                      if settings.http_directory is not None else None)
        self._guard = HandshakeGuard(settings.handshake_timeout)
        self._stop = asyncio.Event()
        self._runner: web.ServerRunner | None = None

    def request_stop(self) -> None:
        """Begin the graceful shutdown (after the current request is answered)."""
        self._stop.set()

    async def start(self) -> None:
        """Open the listeners; a port in use is a :class:`SettingsError`."""
        context = self.settings.ssl_context()
        if self.settings.ws_port != -1:
            await self._open("ws", self.settings.ws_port, context, self.gateway.listen)
        if self.files is not None:
            await self._open("http", self.settings.http_port, context, self._listen_http)
        self.services.start_reclaiming()
        self.gateway.start_sweeping()

    async def _open(self, name: str, port: int, context: ssl.SSLContext | None,
                    listen: Listen) -> None:
        try:
            addresses = await listen(port, context)
        except OSError as exc:
            raise SettingsError(f"cannot listen on {name} port {port}: "
                                f"{exc.strerror or exc}") from None
        for address in addresses:
            log.info("listening for %s%s on %s:%s", name, "s" if context else "", *address[:2])

    async def _listen_http(self, port: int,
                           context: ssl.SSLContext | None) -> list[tuple[str, int]]:
        """Serve the HTTP port: aiohttp's low-level server, no router needed."""
        extra_headers = self.settings.add_headers
        counters: dict[int, Counter] = {}

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            self._guard.seen(request)
            response = _protocol_error(request) or await self._http(request)
            if extra_headers and not response.prepared:
                response.headers.update(extra_headers)
            status = response.status
            if status not in counters:
                counters[status] = self.metrics.http_requests.labels("http", str(status))
            counters[status].inc()
            return response

        size = self.settings.max_header_size
        # keepalive_timeout bounds every later request's head as the guard bounds the
        # first: aiohttp closes a connection whose next request is not complete this
        # long after the previous answer, whether it is idle or half-way through a head.
        runner = web.ServerRunner(
            _HttpServer(dispatch, self.metrics, access_log=None, max_line_size=size,
                        max_field_size=size, keepalive_timeout=self._guard.timeout),
            handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        site = GuardedSite(runner, self.settings.listen_address, port, ssl_context=context,
                           backlog=1024, guard=self._guard)
        await site.start()
        return runner.addresses

    async def _http(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        log.debug("%s %s %s", request.remote, request.method, path)
        if _API_PATH.match(path):
            return await self.api.handle(request)
        if path == "/ensight" or path.startswith("/ensight/"):
            return json_error(501, "the EnSight REST bridge (--grpc_port) is not provided "
                                   "by this server")
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "files are read-only: use GET or HEAD")
        assert self.files is not None
        return await self.files.handle(request)

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Close tunnels, stop services, stop listening; bounded by SHUTDOWN_TIMEOUT."""
        log.info("shutting down")
        await self.services.close()
        await self.gateway.close(SHUTDOWN_TIMEOUT)
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("stopped")


def _protocol_error(request: web.BaseRequest) -> web.Response | None:
    """Refuse what aiohttp's parser lets through but this server does not speak."""
    version = f"{request.version.major}.{request.version.minor}"
    refusal = protocol_refusal(version, request.headers.get("Expect"))
    return json_error(refusal.status, str(refusal)) if refusal is not None else None


class _HttpServer(web.Server):
    """aiohttp's low-level server, its connections answering errors as :class:`_Handler`."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return _Handler(self, self.metrics, loop=asyncio.get_running_loop(),
                        **self._handler_kwargs)


class _Handler(RequestHandler):
    """aiohttp's connection, with errors it answers itself (a malformed request, a
    handler's exception) made JSON and counted like every other answer.

    aiohttp's own error page quotes the malformed request, and so any security token
    in it; this one never says more than the status.
    """

    __slots__ = ("_metrics",)

    def __init__(self, manager: web.Server, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._metrics = metrics

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if answered
        self._metrics.http_requests.labels("http", str(status)).inc()
        reason = ("malformed HTTP request" if status == HTTPStatus.BAD_REQUEST
                  else HTTPStatus(status).phrase.lower())
        response = json_error(status, reason)
        response.force_close()
        return response


async def serve(settings: Settings, relays: RelayPool | None = None) -> None:
    """Run a server until it is asked to stop; SIGTERM/SIGINT/SIGHUP ask too."""
    server = Server(settings, relays)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, server.request_stop)
    try:
        await server.start()
        gc.freeze()  # start-up objects live for ever: keep them out of collections
        await server.wait()
    finally:
        await server.close()


def _raise_file_limit(wanted: int = 65536) -> None:
    """Each tunnel holds two sockets: allow ``wanted`` open files if we may (root may
    raise the hard limit), else as many as the hard limit lets us."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(wanted, hard), hard):
        with contextlib.suppress(ValueError, OSError):
            if limit > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return


def _tune_allocator() -> None:
    """Keep glibc from mapping and unmapping a fresh buffer for every socket read.

    uvloop reads into a new buffer of up to 256 KiB each time; above glibc's default
    thresholds each one is an mmap, page faults and a munmap, which cost the
    downstream relay about as much as the copying itself (see bench/README.md).
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 * 1024 * 1024)


def _serve_process(settings: Settings) -> int:
    _raise_file_limit()
    _tune_allocator()
    try:
        configure_logging(settings)
    except OSError as exc:
        print(f"websocketserver.py: error: --log_file {settings.log_file}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is not available on Windows
        loop_factory = None
    relays = (RelayPool.fork(settings, settings.relay_processes)
              if _relaying(settings) else None)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings, relays))
    except SettingsError as exc:
        print(f"websocketserver.py: error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("internal error; the server stopped")
        return 1
    return 0


def _relaying(settings: Settings) -> bool:
    """Relay processes serve basic mode on a plain websocket port (a TLS session cannot
    move between processes), on Linux (``SOCK_SEQPACKET`` Unix sockets, fork)."""
    return (settings.relay_processes > 0 and settings.ws_port != -1
            and settings.client_port is not None and settings.cert is None
            and sys.platform == "linux")


def run(settings: Settings) -> int:
    """Run the server process under the no-orphans supervisor; return the exit status."""
    return processes.run_supervised(lambda: _serve_process(settings))
