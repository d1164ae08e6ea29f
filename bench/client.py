"""Benchmark client worker: drives one server with picows (or raw TCP for the ceiling).

Runs as a separate process (``python bench/client.py``) so that it never shares an
interpreter with the servers.  It reads one JSON command per line on stdin and
answers one JSON line on stdout (operations: see ``serve``).  URLs are
``ws://``, ``wss://`` or ``tcp://HOST:PORT`` (direct to the backend, no proxy).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from common import (
    ACK,
    HOST,
    MODE_DOWN,
    MODE_ECHO,
    MODE_UP,
    BenchError,
    header,
    raise_nofile_limit,
    send_json,
)

PAYLOAD = memoryview(bytes(range(256)) * 4096)
"""1 MiB of upstream payload that messages are sliced from."""

DATA_TYPES = (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CONTINUATION)
MASK_KEY = b"\x5a\xc3\x96\x3c"
BATCH_BYTES = 256 << 10
"""Upstream messages are pre-encoded and written in batches of about this size."""
CLOSE_TIMEOUT = 10.0


def masked_frame(payload: bytes | memoryview, opcode: int = 0x2) -> bytes:
    """A final client frame (masked, as RFC 6455 requires) carrying ``payload``."""
    size = len(payload)
    if size < 126:
        length = bytes([0x80 | size])
    elif size < 1 << 16:
        length = bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        length = bytes([0x80 | 127]) + size.to_bytes(8, "big")
    key = (MASK_KEY * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")
    return bytes([0x80 | opcode]) + length + MASK_KEY + masked.to_bytes(size, "little")


def _ignore(_data: bytes | memoryview) -> None:
    raise BenchError("unexpected data from server")


class _LinkBase:
    """Common state of a client connection: data callback, waiter, flow control."""

    def __init__(self) -> None:
        self.on_data: Callable[[bytes | memoryview], None] = _ignore
        self.waiter: asyncio.Future[None] | None = None
        self._resume: asyncio.Future[None] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _lost(self) -> None:
        """Fail whatever the test is waiting for; wake a blocked writer."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(BenchError("connection closed early"))
        self.resume_writing()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._resume is None:
            self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resume is not None:
            self._resume.set_result(None)
            self._resume = None

    async def drain(self) -> None:
        """Wait until the transport accepts more data."""
        if self._resume is not None:
            await self._resume
        if self.closed.done():
            raise BenchError("connection closed while sending")


class WsLink(_LinkBase, WSListener):
    """picows client connection."""

    transport: WSTransport  # set by on_ws_connected

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type in DATA_TYPES:
            self.on_data(frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.CLOSE:
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._lost()

    def write(self, data: bytes | memoryview) -> None:
        self.transport.send(WSMsgType.BINARY, data)

    def frames(self, message: memoryview, count: int) -> bytes:
        """``count`` masked binary frames carrying ``message``, ready for ``write_raw``."""
        return masked_frame(message) * count

    def write_raw(self, data: bytes) -> None:
        """Write pre-encoded frames straight to the socket, bypassing per-message calls."""
        self.transport.underlying_transport.write(data)

    async def close(self) -> None:
        """Close handshake, then wait for the server to drop the connection."""
        if not self.transport.is_close_frame_sent:
            self.transport.send_close(WSCloseCode.OK)
        await _wait_closed(self.closed, self.abort)

    def abort(self) -> None:
        self.transport.disconnect(graceful=False)


class TcpLink(_LinkBase, asyncio.Protocol):
    """Raw TCP connection straight to the backend (the no-proxy ceiling)."""

    transport: asyncio.Transport  # set by connection_made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def write(self, data: bytes | memoryview) -> None:
        self.transport.write(data)

    def frames(self, message: memoryview, count: int) -> bytes:
        """Raw TCP has no framing: just ``count`` copies of ``message``."""
        return bytes(message) * count

    def write_raw(self, data: bytes) -> None:
        self.transport.write(data)

    async def close(self) -> None:
        self.transport.close()
        await _wait_closed(self.closed, self.abort)

    def abort(self) -> None:
        self.transport.abort()


Link = WsLink | TcpLink


async def _wait_closed(closed: asyncio.Future[None], abort: Callable[[], None]) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(closed), CLOSE_TIMEOUT)
    except TimeoutError:
        abort()
        raise BenchError("server did not close the connection") from None


_ssl_contexts: dict[str | None, ssl.SSLContext] = {}


async def connect(url: str, cafile: str | None = None) -> Link:
    """Open a link to a ws://, wss:// or tcp:// URL."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        loop = asyncio.get_running_loop()
        _transport, tcp_link = await loop.create_connection(
            TcpLink, parts.hostname or HOST, parts.port or 0
        )
        return tcp_link
    context = None
    if parts.scheme == "wss":
        if cafile not in _ssl_contexts:
            _ssl_contexts[cafile] = ssl.create_default_context(cafile=cafile)
        context = _ssl_contexts[cafile]
    _ws_transport, ws_link = await ws_connect(
        WsLink,
        url,
        ssl_context=context,
        websocket_handshake_timeout=30,
        max_frame_size=64 << 20,
        extra_headers={"Sec-WebSocket-Protocol": "binary"},
    )
    return cast(WsLink, ws_link)


async def _with_link(url: str, cafile: str | None, body: Callable[[Link], Awaitable[Any]]) -> Any:
    """Run ``body`` on a fresh link, close it cleanly, abort it on error."""
    link = await connect(url, cafile)
    try:
        result = await body(link)
        await link.close()
        return result
    except BaseException:
        link.abort()
        raise


async def down(
    url: str, total: int, chunk: int, timeout: float, cafile: str | None = None
) -> dict[str, Any]:
    """Backend streams ``total`` bytes in ``chunk``-sized writes; time until all arrived."""
    loop = asyncio.get_running_loop()
    received = 0

    async def body(link: Link) -> float:
        nonlocal received
        done = link.waiter = loop.create_future()

        def on_data(data: bytes | memoryview) -> None:
            nonlocal received
            received += len(data)
            if received >= total and not done.done():
                done.set_result(None)

        link.on_data = on_data
        start = time.perf_counter()
        link.write(header(MODE_DOWN, total, chunk))
        await asyncio.wait_for(done, timeout)
        return time.perf_counter() - start

    seconds = await _with_link(url, cafile, body)
    if received != total:  # also catches extra bytes that arrived before the close
        raise BenchError(f"downstream byte count {received} != {total}")
    return {"seconds": seconds, "bytes": received}


async def up(
    url: str, total: int, chunk: int, timeout: float, cafile: str | None = None
) -> dict[str, Any]:
    """Send ``total`` bytes in ``chunk``-sized messages; time until the backend's ACK.

    The messages are encoded before the clock starts and written in batches, so the
    client spends next to nothing per message (picows would cost a call per message).
    """
    if total % chunk:
        raise BenchError("upstream total must be a multiple of the message size")
    loop = asyncio.get_running_loop()
    ack = bytearray()

    async def body(link: Link) -> float:
        done = link.waiter = loop.create_future()

        def on_data(data: bytes | memoryview) -> None:
            ack.extend(data)
            if len(ack) >= ACK.size and not done.done():
                done.set_result(None)

        link.on_data = on_data
        per_batch = max(1, BATCH_BYTES // chunk)
        batches, rest = divmod(total // chunk, per_batch)
        batch = link.frames(PAYLOAD[:chunk], per_batch)
        tail = link.frames(PAYLOAD[:chunk], rest)
        link.write(header(MODE_UP, total, chunk))
        start = time.perf_counter()
        for _ in range(batches):
            link.write_raw(batch)
            await link.drain()
        if tail:
            link.write_raw(tail)
        await asyncio.wait_for(done, timeout)
        return time.perf_counter() - start

    seconds = await asyncio.wait_for(_with_link(url, cafile, body), timeout)
    if len(ack) != ACK.size or ACK.unpack(ack)[0] != total:
        raise BenchError(f"upstream: backend acknowledged {bytes(ack)!r}, expected {total} bytes")
    return {"seconds": seconds, "bytes": total}


async def _echo_round(link: Link, message: bytes) -> None:
    """Send one message on an echo link and wait for exactly it to come back.

    No timeout of its own (a timer per round would cost more than the round trip
    itself): callers bound the whole run instead."""
    done = link.waiter = asyncio.get_running_loop().create_future()
    buf = bytearray()

    def on_data(data: bytes | memoryview) -> None:
        buf.extend(data)
        if len(buf) >= len(message) and not done.done():
            done.set_result(None)

    link.on_data = on_data
    link.write(message)
    await done
    if buf != message:
        raise BenchError(f"echo mismatch: sent {len(message)} bytes, got {len(buf)}")
    link.on_data = _ignore


async def latency(
    url: str, count: int, size: int, warmup: int, cafile: str | None = None
) -> dict[str, Any]:
    """Sequential echo round trips of ``size``-byte messages; return RTTs in seconds."""
    filler = bytes(range(size - 8)) if size > 8 else b""

    async def body(link: Link) -> list[float]:
        link.write(header(MODE_ECHO))
        rtts = []
        async with asyncio.timeout(60 + (warmup + count) * 0.01):
            for i in range(warmup + count):
                message = struct.pack("!Q", i) + filler
                start = time.perf_counter()
                await _echo_round(link, message)
                if i >= warmup:
                    rtts.append(time.perf_counter() - start)
        return rtts

    return {"rtts": await _with_link(url, cafile, body)}


PROBE_ECHO = b"tunnel-check"
PROBE_KEY = base64.b64encode(b"websocket-bench!").decode()
PROBE_ACCEPT = base64.b64encode(
    hashlib.sha1((PROBE_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
)


class TunnelProbe(asyncio.Protocol):
    """One tunnel of the tunnels/s row, with as little client work as possible.

    picows' ``ws_connect`` spends more CPU per connection (URL parsing, its own
    connect logic) than our server spends per tunnel, and on two cores the client's
    CPU is taken from the server. Here everything sent is pre-encoded bytes and the
    replies are parsed just enough to check them: the 101 status and
    Sec-WebSocket-Accept, the echo byte for byte across however many frames, and
    the server's close frame. Any deviation fails the run."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.buffer = b""
        self.echo = b""
        self.upgraded = False
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            if not self.upgraded and not self._handshake():
                return
            self._frames()
        except BenchError as exc:
            self._fail(exc)

    def _handshake(self) -> bool:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self.buffer = self.buffer[:end].lower(), self.buffer[end + 4 :]
        if not head.startswith(b"http/1.1 101 ") or (
            b"\r\nsec-websocket-accept: " + PROBE_ACCEPT.lower() not in head
        ):
            raise BenchError(f"bad handshake reply: {head[:200]!r}")
        self.upgraded = True
        assert self.transport is not None
        self.transport.write(masked_frame(header(MODE_ECHO)) + masked_frame(PROBE_ECHO))
        return True

    def _frames(self) -> None:
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode, size = buffer[0] & 0x0F, buffer[1]
            if size & 0x80:
                raise BenchError("masked frame from the server")
            start = 2
            if size == 126:
                start, size = 4, int.from_bytes(buffer[2:4], "big")
            elif size == 127:
                start, size = 10, int.from_bytes(buffer[2:10], "big")
            if len(buffer) < start + size:
                break
            payload, buffer = buffer[start : start + size], buffer[start + size :]
            if opcode in (0x0, 0x1, 0x2):
                self.echo += payload
                if len(self.echo) >= len(PROBE_ECHO) and not self.closing:
                    if self.echo != PROBE_ECHO:
                        raise BenchError(f"echo mismatch: {self.echo[:100]!r}")
                    self.closing = True
                    assert self.transport is not None
                    self.transport.write(masked_frame(b"\x03\xe8", opcode=0x8))
            elif opcode == 0x8:
                if not self.closing:
                    raise BenchError(f"server closed the tunnel early: {payload[:125]!r}")
                assert self.transport is not None
                self.transport.close()  # like picows: drop TCP once the close is answered
        self.buffer = buffer

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.closing:
                self.done.set_result(None)
            else:
                self.done.set_exception(BenchError(f"connection lost: {exc}"))

    def _fail(self, exc: BenchError) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


async def probe_tunnel(host: str, port: int, request: bytes) -> None:
    """Open, use and close one tunnel with :class:`TunnelProbe`."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, _ = await loop.create_connection(lambda: TunnelProbe(request, done), host, port)
    try:
        await done
    except BaseException:
        transport.abort()
        raise


async def tunnels(
    url: str, parallel: int, duration: float, cafile: str | None = None
) -> dict[str, Any]:
    """``parallel`` workers open, use (one echo) and close tunnels for ``duration`` s."""
    done = 0

    async def one(link: Link) -> None:
        link.write(header(MODE_ECHO))
        await _echo_round(link, b"tunnel-check")

    parts = urlsplit(url)
    if parts.scheme == "ws":
        host, port = parts.hostname or HOST, parts.port or 80
        request = (
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {PROBE_KEY}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n"
        ).encode()

        async def once() -> None:
            await probe_tunnel(host, port, request)
    else:

        async def once() -> None:
            await _with_link(url, cafile, one)

    async def worker(deadline: float) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await once()
            done += 1

    start = time.perf_counter()
    async with asyncio.timeout(duration + 60):
        await asyncio.gather(*(worker(start + duration) for _ in range(parallel)))
    return {"tunnels": done, "seconds": time.perf_counter() - start}


class Holder:
    """Keeps idle tunnels open between a ``hold`` and a ``release`` command."""

    def __init__(self) -> None:
        self.links: list[Link] = []

    async def hold(
        self, url: str, count: int, parallel: int, cafile: str | None = None
    ) -> dict[str, Any]:
        """Open ``count`` tunnels, each checked with one echo, and keep them open."""
        sem = asyncio.Semaphore(parallel)

        async def open_one() -> None:
            async with sem:
                link = await connect(url, cafile)
                self.links.append(link)
                link.write(header(MODE_ECHO))
                await _echo_round(link, b"idle-check")

        start = time.perf_counter()
        async with asyncio.timeout(60 + count * 0.05):
            await asyncio.gather(*(open_one() for _ in range(count)))
        return {"held": len(self.links), "seconds": time.perf_counter() - start}

    async def release(self) -> dict[str, Any]:
        """Drop every held tunnel at once and wait until they are gone."""
        links, self.links = self.links, []
        for link in links:
            link.abort()
        await asyncio.gather(*(link.closed for link in links))
        return {"released": len(links)}


async def serve() -> None:
    """Command loop: one JSON request per stdin line, one JSON reply per line."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    holder = Holder()
    commands: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "down": down,
        "up": up,
        "latency": latency,
        "tunnels": tunnels,
        "hold": holder.hold,
        "release": holder.release,
    }
    send_json({"ready": True})
    while line := await reader.readline():
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = await commands[op](**request)
        except Exception as exc:  # reported to the orchestrator, which fails the run
            if op == "hold":
                await holder.release()
            reply = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        send_json(reply)


def main() -> None:
    """Entry point."""
    raise_nofile_limit()
    uvloop.run(serve())


if __name__ == "__main__":
    main()
