"""The websocket port in-process: the upgrade request, its refusals, the hand-over to
picows (bytes that came with the request must not be lost), tunnels ending."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
from collections.abc import AsyncIterator

import pytest

from websocketserver.identity import Identity
from websocketserver.metrics import Metrics
from websocketserver.sessions.reservations import MemoryStore
from websocketserver.sessions.services import ServiceManager
from websocketserver.settings import Settings
from websocketserver.websocket_port.gateway import WebSocketGateway


def request(extra: bytes = b"", connection: bytes = b"Upgrade", version: bytes = b"13") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (b"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: " + connection + b"\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: " + version + b"\r\n" + extra + b"\r\n")


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A final client frame, masked with the all-zero key (so the payload reads as is)."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + b"\0\0\0\0" + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


async def read_echo(reader: asyncio.StreamReader, size: int) -> bytes:
    data = b""
    while len(data) < size:
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == 0x2
        data += payload
    return data


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[WebSocketGateway, int]]:
    """A websocket port in basic mode in front of an echo backend."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    backend = await asyncio.start_server(echo, "127.0.0.1", 0)
    settings = Settings(ws_port=1, client_hostname="127.0.0.1",
                        client_port=backend.sockets[0].getsockname()[1],
                        listen_address="127.0.0.1")
    identity, metrics = Identity(settings), Metrics()
    services = ServiceManager(settings, MemoryStore(), identity, metrics)
    websockets = WebSocketGateway(settings, services, identity, metrics)
    (_, port), = await websockets.listen(0, None)
    yield websockets, port
    await websockets.close(5)
    backend.close()


async def upgrade(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def test_frames_sent_with_the_request_are_relayed(
        gateway: tuple[WebSocketGateway, int]) -> None:
    """A client may send its first messages right behind the request, in one write."""
    _, port = gateway
    first, second = os.urandom(100), os.urandom(100 * 1024)
    reader, writer = await upgrade(port, request() + frame(first) + frame(second))
    assert await read_echo(reader, len(first) + len(second)) == first + second
    writer.close()


async def test_request_dribbled_byte_by_byte(gateway: tuple[WebSocketGateway, int]) -> None:
    _, port = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for byte in request():
        writer.write(bytes([byte]))
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.write(frame(b"hello"))
    assert await read_echo(reader, 5) == b"hello"
    writer.close()


async def test_connection_header_with_several_tokens(gateway: tuple[WebSocketGateway, int]) -> None:
    """Firefox sends ``Connection: keep-alive, Upgrade``."""
    _, port = gateway
    reader, writer = await upgrade(port, request(connection=b"keep-alive, Upgrade"))
    writer.write(frame(b"firefox"))
    assert await read_echo(reader, 7) == b"firefox"
    writer.close()


async def test_binary_subprotocol_is_answered_when_offered(
        gateway: tuple[WebSocketGateway, int]) -> None:
    _, port = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(b"Sec-WebSocket-Protocol: base64, binary\r\n"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"\r\nSec-WebSocket-Protocol: binary\r\n" in head
    writer.close()


async def test_refusal_is_json_and_closes(gateway: tuple[WebSocketGateway, int]) -> None:
    _, port = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(version=b"12"))
    answer = await asyncio.wait_for(reader.read(), 5)  # until the server closes
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 426 Upgrade Required"
    assert headers["Upgrade"] == "websocket" and headers["Sec-WebSocket-Version"] == "13"
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    assert "version 13" in json.loads(body)["error"]
    writer.close()


async def test_a_header_that_never_ends_is_refused(gateway: tuple[WebSocketGateway, int]) -> None:
    """httptools holds a header line until its end: the bytes before the end of the
    request head are bounded too (4 x --max_header_size), not just each finished line."""
    _, port = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
    try:
        for _ in range(20):  # 80 KiB in 4 KiB pieces, each far under the line limit
            writer.write(b"a" * 4096)
            await writer.drain()
    except ConnectionError:
        pass  # refused and closed before the end
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"request head over" in answer
    writer.close()


async def test_a_long_head_in_one_write_is_refused(gateway: tuple[WebSocketGateway, int]) -> None:
    """The head limit (4 x --max_header_size) holds when the whole head, lines each
    under the line limit, arrives in one write too (it got 101 at 40 KB)."""
    _, port = gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"a" * 4000) for n in range(10))
    writer.write(request(lines))
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"request head over" in answer
    writer.close()


async def test_close_ends_the_tunnel_and_frees_its_count(
        gateway: tuple[WebSocketGateway, int]) -> None:
    websockets, port = gateway
    reader, writer = await upgrade(port, request())
    writer.write(frame(b"x"))
    assert await read_echo(reader, 1) == b"x"
    assert websockets.limits.total == 1 and len(websockets.tunnels) == 1
    writer.write(frame(struct.pack("!H", 1000), opcode=0x8))
    assert await asyncio.wait_for(read_frame(reader), 5) == (0x8, struct.pack("!H", 1000))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed the TCP
    writer.close()
    for _ in range(100):
        if not websockets.tunnels:
            break
        await asyncio.sleep(0.01)
    assert websockets.limits.total == 0 and not websockets.tunnels


async def test_a_second_close_frame_is_ignored(gateway: tuple[WebSocketGateway, int]) -> None:
    """Autobahn 7.1.2: a close frame, then another in the same write: the first is
    answered with 1000, the second ignored (RFC 6455 5.5.1), not refused with 1002."""
    _, port = gateway
    reader, writer = await upgrade(port, request())
    writer.write(frame(b"data"))
    assert await read_echo(reader, 4) == b"data"
    writer.write(frame(struct.pack("!H", 1000), opcode=0x8) * 2)
    assert await asyncio.wait_for(read_frame(reader), 5) == (0x8, struct.pack("!H", 1000))
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_shutdown_closes_tunnels_with_1001(gateway: tuple[WebSocketGateway, int]) -> None:
    websockets, port = gateway
    reader, writer = await upgrade(port, request())
    writer.write(frame(b"x"))
    assert await read_echo(reader, 1) == b"x"
    closing = asyncio.create_task(websockets.close(5))
    opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert opcode == 0x8 and payload == struct.pack("!H", 1001) + b"server shutting down"
    writer.write(frame(payload[:2], opcode=0x8))  # answer the close
    await asyncio.wait_for(closing, 5)
    writer.close()
