"""The hot path: relay one websocket to one TCP connection, both ways.

The backend connection is a plain non-blocking socket watched with
``loop.add_reader``/``add_writer`` rather than an asyncio transport: one ``recv`` of
up to ``READ_SIZE`` per readiness event, written out in the same callback. (uvloop's
transport reads 256 kB at most and copies every chunk out of its own buffer;
measured against it, this path moves ~15 % more downstream with 64 KiB backend
writes and ~30 % more with 1 MiB ones, see ``bench/README.md``.)

* **Downstream** (backend → browser), each chunk the backend sends becomes one binary
  frame, written to the browser's transport right in the read callback: header and
  payload in one writev, no copy, no task switch. (aiohttp's ``send_bytes`` would
  cost a task hop per chunk and two write syscalls per frame.) aiohttp still writes
  the control frames (pong, close, ping) of the same connection; both write whole
  frames, so they never interleave.
* **Upstream** (browser → backend), messages are collected and written once per
  event-loop pass with one ``sendmsg``.

Backpressure holds in both directions with no unbounded buffer:

* downstream, when more than ``HIGH_WATER`` bytes wait in the browser's transport,
  the backend socket stops being read until the transport drains, so the service
  blocks in its own ``send``;
* upstream, as soon as the backend socket does not take a whole batch, no further
  message is read from the websocket (aiohttp then stops reading that socket) until
  the rest has been written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

log = logging.getLogger("websocketserver.tunnel")

HIGH_WATER = 1024 * 1024
"""Bytes waiting in the browser's transport before the backend stops being read."""
READ_SIZE = 1024 * 1024
"""Largest chunk read from the backend at once, so the largest frame sent."""
IOV_BATCH = 512
"""Buffers per ``sendmsg`` call, well under the kernel's IOV_MAX (1024)."""
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


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                   address: tuple[str, int]) -> None:
    """Connect a non-blocking socket to a resolved address. (uvloop's ``sock_connect``
    would resolve the address again, through its thread pool.)"""
    try:
        sock.connect(address)
        return
    except (BlockingIOError, InterruptedError):
        pass
    connected = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, lambda: connected.done() or connected.set_result(None))
    try:
        await connected
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket: each address of ``host`` in turn."""
    try:  # an address needs no lookup, so no trip through the resolver's threads
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _connect(loop, sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")


class Tunnel:
    """One websocket relayed to one TCP backend; create, :meth:`connect`, :meth:`run`."""

    def __init__(self, request: web.BaseRequest, ws: web.WebSocketResponse,
                 stats: TunnelStats) -> None:
        self._request = request
        self.ws = ws
        self.stats = stats
        self._sock: socket.socket | None = None
        self._fd = -1
        self._browser = request.transport
        self._reading_paused = False
        self._ended: asyncio.Future[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._done_reason: str | None = None
        self._done_error = False
        self._write_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._batch: list[bytes] = []
        self._unsent: list[bytes | memoryview] = []
        self._loop = asyncio.get_running_loop()
        self._close_code = WSCloseCode.OK
        self._close_reason = ""

    async def connect(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
        """Open the backend connection, or raise :class:`BackendError` with a reason."""
        try:
            async with asyncio.timeout(timeout):
                sock = await _open_socket(self._loop, host, port)
        except TimeoutError:
            raise BackendError(f"backend {host}:{port} did not answer") from None
        except OSError as exc:
            raise BackendError(f"cannot connect to backend {host}:{port}: "
                               f"{exc.strerror or exc}") from None
        self._sock = sock
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._on_readable)

    async def run(self) -> None:
        """Relay until either side closes, then close the other; never raises.

        The upstream pump is the one task; downstream runs in the read callback and
        only needs a task while it waits for the browser to drain. Whichever side
        ends first ends the tunnel: ``_backend_done`` resolves ``_ended``.
        """
        loop = self._loop
        self._ended = ended = loop.create_future()
        upstream = loop.create_task(self._upstream())
        upstream.add_done_callback(lambda _: ended.done() or ended.set_result(None))
        if self._done_reason is not None:  # close() came before run()
            ended.set_result(None)
        try:
            await ended
        finally:
            tasks = [upstream] if self._drain_task is None else [upstream, self._drain_task]
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, ConnectionError | RuntimeError):
                    self._close_reason = self._close_reason or "browser connection lost"
            if not self._close_reason and self._done_reason is not None:
                self._close_reason = self._done_reason
                if self._done_error and self._close_code == WSCloseCode.OK:
                    self._close_code = WSCloseCode.INTERNAL_ERROR
            self._close_backend()
            if not self.ws.closed:
                await self.ws.close(code=self._close_code,
                                    message=close_reason(self._close_reason))

    def close(self, code: int, reason: str) -> None:
        """End the tunnel from outside (shutdown, release); :meth:`run` does the rest."""
        self._close_code = code
        self._close_reason = self._close_reason or reason
        self._backend_done(reason)  # also ends a run() that has not started yet

    @property
    def reason(self) -> str:
        return self._close_reason

    def _close_backend(self) -> None:
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
            sock.close()

    def _backend_done(self, reason: str, error: bool = False) -> None:
        if self._done_reason is None:
            self._done_reason = reason
            self._done_error = error
            ended = self._ended
            if ended is not None and not ended.done():
                ended.set_result(None)
        if self._sock is not None and not self._reading_paused:
            self._reading_paused = True  # for good: nothing is relayed any more
            self._loop.remove_reader(self._fd)

    def _backend_lost(self, exc: OSError) -> None:
        self._backend_done(f"backend connection lost: {exc}", error=True)
        self._writable_now()

    # -- downstream: backend -> browser -------------------------------------------

    def _on_readable(self) -> None:
        browser = self._browser
        if browser is None or browser.is_closing():
            self._backend_done("browser connection lost")
            return
        self._recv_frame()
        if browser.get_write_buffer_size() > HIGH_WATER and not self._reading_paused:
            self._reading_paused = True  # until the browser's transport drains
            self._loop.remove_reader(self._fd)
            self._drain_task = self._loop.create_task(self._resume_when_drained())

    def _recv_frame(self) -> None:
        try:
            data = self._sock.recv(READ_SIZE)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._backend_lost(exc)
            return
        size = len(data)
        if not size:
            self._backend_done("backend closed the connection")
            return
        self.stats.bytes_down += size
        self._browser.writelines((frame_header(size), data))

    async def _resume_when_drained(self) -> None:
        try:
            await self._request.writer.drain()
        except ConnectionError:
            self._backend_done("browser connection lost")
            return
        self._drain_task = None
        if self._sock is not None and self._done_reason is None:
            self._reading_paused = False
            self._loop.add_reader(self._fd, self._on_readable)

    # -- upstream: browser -> backend ---------------------------------------------

    def _writable_now(self) -> None:
        self._write_paused = False
        writable = self._writable
        self._writable = None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def _upstream(self) -> None:
        # Messages are collected and written once per event-loop pass (one sendmsg
        # for a burst of small ones instead of a send() each).
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
            if self._sock is None or self._done_error:
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
        batch = self._batch
        if not batch:
            return
        if self._sock is None:
            batch.clear()
            return
        waiting = bool(self._unsent)  # the backend is full: queue behind, keep the order
        self._unsent.extend(batch)
        batch.clear()
        if not waiting:
            self._send_unsent()

    def _send_unsent(self) -> None:
        """Write what the backend socket takes; wait for writability for the rest."""
        unsent = self._unsent
        sendmsg = self._sock.sendmsg  # type: ignore[union-attr]
        while unsent:
            chunk = unsent[:IOV_BATCH]
            try:
                sent = sendmsg(chunk)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                unsent.clear()
                self._backend_lost(exc)
                return
            done = 0
            for buf in chunk:
                if sent < len(buf):
                    break
                sent -= len(buf)
                done += 1
            del unsent[:done]
            if sent:
                unsent[0] = memoryview(unsent[0])[sent:]
            if done < len(chunk):
                break  # the socket is full
        if unsent and not self._write_paused:
            self._write_paused = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        self._send_unsent()
        if not self._unsent and self._sock is not None:
            self._loop.remove_writer(self._fd)
            self._writable_now()
