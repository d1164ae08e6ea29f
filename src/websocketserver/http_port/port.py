"""The HTTP port (``--http_port``): files, the REST API, and ``/ensight`` (501).

aiohttp's low-level server, no router needed: :class:`HttpPort` routes by path. Its
connections answer the errors aiohttp answers itself (a malformed request, a
handler's exception) as JSON, counted like every other answer, never quoting the
request. Every connection is bounded by ``--handshake_timeout``: the first request
head by :class:`~.limits.HandshakeGuard`, every later head and the idle time between
requests by aiohttp's ``keepalive_timeout``. A request head is bounded as on the
websocket port (100 header lines, 4 x ``--max_header_size`` in all: aiohttp alone
takes 128 x 8,190 bytes, and 400 such heads held 700 MiB), and so is the number of
connections (``--max_http_connections``).

Every answer, errors included, carries :func:`answer_headers` (framing, sniffing,
referrer; ``--add_header`` overrides them), and a request for a host name this server
does not answer to gets 421 (DNS rebinding, :func:`~.protocol.host_refusal`).
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
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict
from prometheus_client import Counter

from ..core.protocol import host_refusal, protocol_refusal
from ..limits import GuardedSite, HandshakeGuard, give_back_memory
from ..metrics import Metrics
from ..settings import Settings
from ..websocket_port.handshake import MAX_HEADERS
from .api import RestApi, json_error
from .files import FileServer

log = logging.getLogger("websocketserver.http")

_API_PATH = re.compile(r"/v\d+(/|$)")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s;,'\"/]+", re.IGNORECASE)
_LOOPBACK_FRAMERS = tuple(f"{scheme}://{host}:*" for scheme in ("http", "https")
                          for host in ("localhost", "127.0.0.1", "[::1]"))
TRIM_DELAY = 1.0
"""Seconds the HTTP port has been without connections before their memory is given back."""


def answer_headers(settings: Settings) -> CIMultiDict[str]:
    """The headers of every answer of the HTTP port, ``--add_header`` last (it wins).

    * ``Content-Security-Policy: frame-ancestors``: who may frame these pages
      (clickjacking of the dashboard's buttons): this origin, pages on this machine's
      loopback (a Jupyter notebook framing a PyEnSight page), and ``--allowed_origin``
      (portals framing noVNC). Not ``X-Frame-Options``: it cannot name those, and a
      browser that knows both obeys the CSP alone.
    * ``X-Content-Type-Options: nosniff``: a file is what its type says.
    * ``Referrer-Policy: no-referrer``: URLs carry tokens (``?token=``,
      ``?security_token=``), which a page's links must not pass on.
    """
    origins = [origin.rstrip("/") for origin in settings.allowed_origins]
    sources = ["*"] if "*" in origins else [
        "'self'", *_LOOPBACK_FRAMERS, *(o for o in origins if _ORIGIN.fullmatch(o))]
    headers = CIMultiDict([("Content-Security-Policy", f"frame-ancestors {' '.join(sources)}"),
                           ("X-Content-Type-Options", "nosniff"),
                           ("Referrer-Policy", "no-referrer")])
    headers.update(settings.add_headers)
    return headers


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
        extra_headers = answer_headers(self._settings)
        hosts = self._settings.host_names
        counters: dict[int, Counter] = {}

        async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
            self._guard.seen(request)
            response = (_protocol_error(request) or _host_error(request, hosts)
                        or await self._route(request))
            if not response.prepared:
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
        server = _HttpServer(dispatch, self._metrics, 4 * size, extra_headers, access_log=None,
                             max_line_size=size, max_field_size=size, max_headers=MAX_HEADERS,
                             keepalive_timeout=self._guard.timeout)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        self._runner = runner
        site = GuardedSite(runner, self._settings.listen_address, port, ssl_context=context,
                           backlog=1024, guard=self._guard,
                           most=self._settings.max_http_connections,
                           count=lambda: server.open)
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


def _host_error(request: web.BaseRequest, hosts: frozenset[str] | None) -> web.Response | None:
    refusal = host_refusal(request.headers.get("Host"), hosts)
    return json_error(refusal.status, refusal.reason) if refusal is not None else None


class _HttpServer(web.Server):
    """aiohttp's low-level server, its connections answering errors as :class:`_Handler`
    and counted (``open``) for ``--max_http_connections``."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 metrics: Metrics, head_limit: int, headers: CIMultiDict[str],
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics
        self.head_limit = head_limit
        self.headers = headers
        self.open = 0
        self._handler_kwargs = kwargs
        self._trim: asyncio.TimerHandle | None = None

    def __call__(self) -> RequestHandler:
        return _Handler(self, self.metrics, self.head_limit, self.headers,
                        loop=asyncio.get_running_loop(), **self._handler_kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open += 1

    def connection_lost(self, handler: RequestHandler,
                        exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self.open -= 1
        if self.open == 0 and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._idle)

    def _idle(self) -> None:
        """No connection for a while: give their memory back (a burst of them left tens
        of MiB in the heap)."""
        self._trim = None
        if self.open == 0:
            give_back_memory()


class _Handler(RequestHandler):
    """aiohttp's connection, with errors it answers itself (a malformed request, a
    handler's exception) made JSON and counted like every other answer, and a request
    head over ``head_limit`` bytes refused (431).

    aiohttp's own error page quotes the malformed request, and so any security token
    in it; this one never says more than the status.
    """

    __slots__ = ("_metrics", "_head_limit", "_head", "_body", "_headers")

    def __init__(self, manager: web.Server, metrics: Metrics, head_limit: int,
                 headers: CIMultiDict[str], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._metrics = metrics
        self._headers = headers
        self._head_limit = head_limit
        self._head = 0  # bytes of the request head being received
        self._body: StreamReader = EMPTY_PAYLOAD  # the last request's, being received

    def data_received(self, data: bytes) -> None:
        """Count the bytes of each request head (not of bodies), and hand the parser no
        more of a head than the limit: aiohttp keeps a head until it is complete, and
        bounds only its lines (128 x 8,190 bytes)."""
        while data and self._head >= 0:
            if self._body.is_eof():  # receiving a head
                room = self._head_limit - self._head + 1
                chunk, data = data[:room], data[room:]
                self._head += len(chunk)
            else:
                chunk, data = data, b""
            messages = len(self._messages)
            super().data_received(chunk)
            if len(self._messages) > messages:  # a head is complete (its body may follow)
                self._head, self._body = 0, self._messages[-1][1]
            elif self._head > self._head_limit:
                self._refuse_head()

    def _refuse_head(self) -> None:
        """Answer 431 as aiohttp answers a malformed request; read nothing more."""
        self._head = -1
        error = HttpProcessingError(code=431,
                                    message=f"request head over {self._head_limit} bytes")
        self._messages.append((_ErrInfo(431, error, error.message), EMPTY_PAYLOAD))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if answered
        self._metrics.http_requests.labels("http", str(status)).inc()
        reason = ("malformed HTTP request" if status == HTTPStatus.BAD_REQUEST
                  else HTTPStatus(status).phrase.lower())
        response = json_error(status, reason)
        response.headers.update(self._headers)
        response.force_close()
        return response
