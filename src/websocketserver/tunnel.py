"""The hot path: relay one websocket to one TCP connection, both ways.

Downstream, each chunk the backend sends becomes one binary frame, written to the
browser's transport right in :meth:`_Backend.data_received`: header and payload in
one writev, no copy, no task switch. (aiohttp's ``send_bytes`` would cost a task
hop per chunk and two write syscalls per frame, a tiny packet for the header.)
aiohttp still writes the control frames (pong, close) of the same connection; both
write whole frames, so they never interleave.

Backpressure holds in both directions with no unbounded buffer:

* downstream, when more than ``HIGH_WATER`` bytes wait in the browser's transport,
  the backend socket stops being read until the transport drains, so the service
  blocks in its own ``send``;
* upstream, messages are written to the backend once per event-loop pass and,
  while the backend transport is over ``HIGH_WATER``, no further message is read
  from the websocket (aiohttp then stops reading that socket).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger("websocketserver.tunnel")

HIGH_WATER = 1024 * 1024
"""Bytes waiting in one side's transport before the other side stops being read."""
CONNECT_TIMEOUT = 10.0
MAX_REASON = 123  # bytes allowed in a websocket close reason


@dataclass
class TunnelStats:
    """What a tunnel carried; logged when it closes."""

    peer: str
    target: str
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0  # browser -> backend
    bytes_down: int = 0  # backend -> browser


class BackendError(Exception):
    """The TCP backend could not be reached; the message is a close reason."""


def close_reason(text: str) -> bytes:
    """Encode ``text`` as a websocket close reason, cut to the protocol's limit."""
    data = text.encode("utf-8")
    if len(data) <= MAX_REASON:
        return data
    return data[: MAX_REASON - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."


_HEADER_SHORT = struct.Struct("!BB").pack
_HEADER_MEDIUM = struct.Struct("!BBH").pack
_HEADER_LONG = struct.Struct("!BBQ").pack


def frame_header(length: int) -> bytes:
    """The header of a final, unmasked binary frame of ``length`` bytes (RFC 6455 5.2)."""
    if length < 126:
        return _HEADER_SHORT(0x82, length)
    if length < 65536:
        return _HEADER_MEDIUM(0x82, 126, length)
    return _HEADER_LONG(0x82, 127, length)


class _Backend(asyncio.Protocol):
    """The TCP side; every event is handed straight to its :class:`Tunnel`."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY: uvloop and asyncio set it on every TCP socket already.
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]
        self._tunnel._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        browser = tunnel._browser
        if browser is None or browser.is_closing():
            tunnel._transport.pause_reading()
            tunnel._backend_done("browser connection lost")
            return
        size = len(data)
        tunnel.stats.bytes_down += size
        browser.writelines((frame_header(size), data))
        if browser.get_write_buffer_size() > HIGH_WATER and not tunnel._reading_paused:
            tunnel._reading_paused = True  # until the browser's transport drains
            tunnel._transport.pause_reading()
            tunnel._wake()

    def eof_received(self) -> bool:
        self._tunnel._backend_done("backend closed the connection")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"backend connection lost: {exc}" if exc else "backend closed the connection"
        self._tunnel._backend_done(reason, exc is not None)
        self._tunnel._writable_now()

    def pause_writing(self) -> None:
        self._tunnel._write_paused = True

    def resume_writing(self) -> None:
        self._tunnel._writable_now()


class Tunnel:
    """One websocket relayed to one TCP backend; create, :meth:`connect`, :meth:`run`."""

    def __init__(self, request: web.BaseRequest, ws: web.WebSocketResponse,
                 stats: TunnelStats) -> None:
        self._request = request
        self.ws = ws
        self.stats = stats
        self._transport: asyncio.Transport = None  # type: ignore[assignment]
        self._browser = request.transport
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._done_reason: str | None = None
        self._done_error = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._batch: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._close_code = WSCloseCode.OK
        self._close_reason = ""
        self._downstream_task: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
        """Open the backend connection, or raise :class:`BackendError` with a reason."""
        try:
            async with asyncio.timeout(timeout):
                await self._loop.create_connection(lambda: _Backend(self), host, port)
        except TimeoutError:
            raise BackendError(f"backend {host}:{port} did not answer") from None
        except OSError as exc:
            raise BackendError(f"cannot connect to backend {host}:{port}: "
                               f"{exc.strerror or exc}") from None

    async def run(self) -> None:
        """Relay until either side closes, then close the other; never raises.

        Whichever direction ends first ends the other: a browser that is gone must
        not leave the pump waiting for a drain that will never come.
        """
        loop = self._loop
        self._downstream_task = loop.create_task(self._downstream())
        upstream = loop.create_task(self._upstream())
        first_done = loop.create_future()

        def finished(_: asyncio.Task[None]) -> None:
            if not first_done.done():
                first_done.set_result(None)

        self._downstream_task.add_done_callback(finished)
        upstream.add_done_callback(finished)
        try:
            await first_done
        finally:
            for task in (self._downstream_task, upstream):
                task.cancel()
            for outcome in await asyncio.gather(self._downstream_task, upstream,
                                                return_exceptions=True):
                if isinstance(outcome, ConnectionError | RuntimeError):
                    self._close_reason = self._close_reason or "browser connection lost"
            self._transport.close()
            if not self.ws.closed:
                await self.ws.close(code=self._close_code,
                                    message=close_reason(self._close_reason))

    def close(self, code: int, reason: str) -> None:
        """End the tunnel from outside (shutdown, release); :meth:`run` does the rest."""
        self._close_code = code
        self._close_reason = self._close_reason or reason
        self._backend_done(reason)  # also ends a run() that has not started yet
        if self._downstream_task is not None:
            self._downstream_task.cancel()  # even while it waits for a drain

    @property
    def reason(self) -> str:
        return self._close_reason

    # -- downstream: backend -> browser -------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _backend_done(self, reason: str, error: bool = False) -> None:
        if self._done_reason is None:
            self._done_reason = reason
            self._done_error = error
            self._wake()

    async def _downstream(self) -> None:
        # The data is written by _Backend.data_received; this waits out backpressure
        # episodes (reading resumes once the browser's transport has drained) and the
        # end of the backend.
        drain = self._request.writer.drain
        loop = self._loop
        while True:
            if self._reading_paused:
                await drain()
                self._reading_paused = False
                if not self._transport.is_closing():
                    self._transport.resume_reading()
            if self._done_reason is not None:
                if not self._close_reason:
                    self._close_reason = self._done_reason
                    if self._done_error and self._close_code == WSCloseCode.OK:
                        self._close_code = WSCloseCode.INTERNAL_ERROR
                return
            if not self._reading_paused:
                self._waiter = loop.create_future()
                await self._waiter

    # -- upstream: browser -> backend ---------------------------------------------

    def _writable_now(self) -> None:
        self._write_paused = False
        writable = self._writable
        self._writable = None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def _upstream(self) -> None:
        # Messages are collected and written once per event-loop pass (one writev for
        # a burst of small ones instead of a send() each).
        ws = self.ws
        stats = self.stats
        loop = self._loop
        batch = self._batch
        while True:
            if self._write_paused:
                self._writable = loop.create_future()
                await self._writable
            msg = await ws.receive()
            kind = msg.type
            if kind is WSMsgType.BINARY:
                data = msg.data
            elif kind is WSMsgType.TEXT:
                data = msg.data.encode("utf-8")
            else:
                break
            stats.bytes_up += len(data)
            if self._transport.is_closing():
                break
            batch.append(data)
            if len(batch) == 1:
                loop.call_soon(self._flush_upstream)
        self._flush_upstream()
        if kind is WSMsgType.ERROR:
            self._close_reason = f"websocket error: {ws.exception()}"
        else:
            self._close_reason = self._close_reason or "browser closed the websocket"
        self._backend_done(self._close_reason)

    def _flush_upstream(self) -> None:
        if self._batch:
            if not self._transport.is_closing():
                self._transport.writelines(self._batch)
            self._batch.clear()
