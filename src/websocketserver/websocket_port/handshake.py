"""Reading an upgrade request off a new connection, and writing a refusal.

:class:`Handshake` is the protocol of every new connection on the websocket port: it
feeds the bytes to httptools (llhttp), bounds the request (``--max_header_size`` per
line, 100 lines, 4 x the line limit in all, ``--handshake_timeout``), and hands the
complete request, with the bytes that followed it, to its owner. What to do with it
is decided in :mod:`.protocol`.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from collections.abc import Callable

import httptools
from multidict import CIMultiDict

from ..core.errors import Refused
from ..core.protocol import UpgradeRequest
from ..logs import Sampled

log = logging.getLogger("websocketserver.handshake")
_refused = Sampled(log)  # what clients cause at will: a few lines per 10 s, then a count
_silent = Sampled(log)

MAX_HEADERS = 100
"""Most header lines in an upgrade request (browsers send about 15)."""

OnRequest = Callable[[UpgradeRequest, asyncio.Transport, bytes], None]


def peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if not peer:
        return "?"
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


def log_refusal(transport: asyncio.BaseTransport, refusal: Refused, how: str = "") -> None:
    """One sampled line: clients cause refusals at will."""
    _refused.warning("websocket refused (%d%s): %s: %s", refusal.status, how,
                     peer_of(transport), refusal.reason)


def write_refusal(transport: asyncio.Transport, refusal: Refused) -> None:
    """Answer ``refusal`` as JSON and close the connection."""
    status = refusal.status
    log_refusal(transport, refusal)
    body = json.dumps({"error": refusal.reason}).encode()
    extra = b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" if status == 426 else b""
    transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n%s\r\n%s"
                    % (status, http.HTTPStatus(status).phrase.encode(), len(body), extra, body))
    transport.close()


class Handshake(asyncio.Protocol):
    """Reads one upgrade request; ``on_request`` or ``on_refusal`` gets the outcome."""

    def __init__(self, max_header_size: int, timeout: float, on_request: OnRequest,
                 on_refusal: Callable[[asyncio.Transport, Refused], None]) -> None:
        self._limit = max_header_size
        self._timeout = timeout
        self._on_request = on_request
        self._on_refusal = on_refusal
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._complete = False
        self._received = 0
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        if not self._done and self._transport is not None:
            self._done = True
            _silent.warning("closing connection from %s: no request within %g s",
                            peer_of(self._transport), self._timeout)
            self._transport.abort()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > self._limit:
            raise Refused(400, f"request line over {self._limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > self._limit or len(value) > self._limit:
            raise Refused(400, f"header line over {self._limit} bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise Refused(400, f"more than {MAX_HEADERS} header lines")
        self._headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self._complete = True

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        transport = self._transport
        assert transport is not None and self._timer is not None
        try:
            tail = self._feed(data)
            if not self._complete:
                return
            self._done = True
            self._timer.cancel()
            peer = transport.get_extra_info("peername")
            request = UpgradeRequest.parse(
                self._parser.get_method().decode("ascii"), self._parser.get_http_version(),
                self._target, self._headers, str(peer[0]) if peer else None)
        except Refused as exc:
            self._done = True
            self._on_refusal(transport, exc)
            return
        self._on_request(request, transport, tail)

    def _feed(self, data: bytes) -> bytes:
        """Parse ``data``; the bytes after the request head, if it ended in them."""
        tail = b""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            tail = data[exc.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, Refused):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserError as exc:
            raise Refused(400, f"malformed HTTP request: {exc}") from None
        self._received += len(data) - len(tail)
        if self._received > 4 * self._limit:  # httptools holds a line until its end
            raise Refused(400, f"request head over {4 * self._limit} bytes")
        return tail
