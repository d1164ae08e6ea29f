"""The HTTP port (``--http_port``): files, the REST API, and ``/ensight`` (501).

aiohttp's low-level server, no router needed: :class:`HttpPort` routes by path. Its
connections answer the errors aiohttp answers itself (a malformed request, a
handler's exception) as JSON, counted like every other answer, never quoting the
request. Every connection is bounded by ``--handshake_timeout``: the first request
head by :class:`~.limits.HandshakeGuard`, every later head and the idle time between
requests by aiohttp's ``keepalive_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import Counter

from .api import RestApi, json_error
from .files import FileServer
from .limits import GuardedSite, HandshakeGuard
from .metrics import Metrics
from .protocol import protocol_refusal
from .settings import Settings

log = logging.getLogger("websocketserver.http")

_API_PATH = re.compile(r"/v\d+(/|$)")


class HttpPort:
    """The HTTP listener: ``listen``, then ``close``."""

    def __init__(self, settings: Settings, api: RestApi, files: FileServer,
                 metrics: Metrics) -> None:
        self._settings = settings
        self._api = api
        self._files = files
        self._metrics = metrics
        self._guard = HandshakeGuard(settings.handshake_timeout)
        self._runner: web.ServerRunner | None = None

    async def listen(self, port: int,
                     context: ssl.SSLContext | None) -> list[tuple[str, int]]:
        """Listen on ``port`` (TLS with ``context``); the addresses listened on."""
        extra_headers = self._settings.add_headers
        counters: dict[int, Counter] = {}

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            self._guard.seen(request)
            response = _protocol_error(request) or await self._route(request)
            if extra_headers and not response.prepared:
                response.headers.update(extra_headers)
            status = response.status
            if status not in counters:
                counters[status] = self._metrics.http_requests.labels("http", str(status))
            counters[status].inc()
            return response

        size = self._settings.max_header_size
        # keepalive_timeout bounds every later request's head as the guard bounds the
        # first: aiohttp closes a connection whose next request is not complete this
        # long after the previous answer, whether it is idle or half-way through a head.
        runner = web.ServerRunner(
            _HttpServer(dispatch, self._metrics, access_log=None, max_line_size=size,
                        max_field_size=size, keepalive_timeout=self._guard.timeout),
            handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        site = GuardedSite(runner, self._settings.listen_address, port, ssl_context=context,
                           backlog=1024, guard=self._guard)
        await site.start()
        return runner.addresses

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        log.debug("%s %s %s", request.remote, request.method, path)
        if _API_PATH.match(path):
            return await self._api.handle(request)
        if path == "/ensight" or path.startswith("/ensight/"):
            return json_error(501, "the EnSight REST bridge (--grpc_port) is not provided "
                                   "by this server")
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "files are read-only: use GET or HEAD")
        return await self._files.handle(request)

    async def close(self) -> None:
        """Stop listening; requests under way get aiohttp's shutdown timeout (2 s)."""
        if self._runner is not None:
            await self._runner.cleanup()


def _protocol_error(request: web.BaseRequest) -> web.Response | None:
    """Refuse what aiohttp's parser lets through but this server does not speak."""
    version = f"{request.version.major}.{request.version.minor}"
    refusal = protocol_refusal(version, request.headers.get("Expect"))
    return json_error(refusal.status, refusal.reason) if refusal is not None else None


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
