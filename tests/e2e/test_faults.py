"""Faults on either side of a tunnel: the server closes cleanly and keeps serving."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest
import websockets

from support import StartServer, free_port, received_close, recv_bytes, wait_until


class FaultyBackend:
    """A TCP backend in a thread; ``behaviour(conn)`` decides what each connection gets."""

    def __init__(self, behaviour: Callable[[FaultyBackend, socket.socket], None]) -> None:
        self.port = free_port()
        self.behaviour = behaviour
        self.closed_by_peer = threading.Event()
        self.sent = 0  # chunks a flood has sent so far
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.behaviour, args=(self, conn), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def reset(backend: FaultyBackend, conn: socket.socket) -> None:
    conn.recv(100)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST


def half_close(backend: FaultyBackend, conn: socket.socket) -> None:
    conn.sendall(b"last words")
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass
    backend.closed_by_peer.set()
    conn.close()


def wait_for_peer_close(backend: FaultyBackend, conn: socket.socket) -> None:
    conn.settimeout(30)
    try:
        while conn.recv(65536):
            pass
        backend.closed_by_peer.set()
    finally:
        conn.close()


def flood(backend: FaultyBackend, conn: socket.socket) -> None:
    chunk = os.urandom(1 << 20)
    try:
        for _ in range(1024):  # 1 GiB, if the browser ever read it
            conn.sendall(chunk)
            backend.sent += 1
    except OSError:
        backend.closed_by_peer.set()
    finally:
        conn.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[FaultyBackend]:
    faulty = FaultyBackend(request.param)
    yield faulty
    faulty.close()


async def closed(url: str, send: bytes = b"hello") -> tuple[int, str]:
    async with websockets.connect(url) as ws:
        await ws.send(send)
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        return received_close(info.value).code, received_close(info.value).reason


@pytest.mark.parametrize("backend", [reset], indirect=True)
def test_backend_reset(start_server: StartServer, backend: FaultyBackend) -> None:
    server = start_server("--client_port", str(backend.port))
    code, reason = asyncio.run(closed(server.ws_url()))
    assert code == 1011 and "backend connection lost" in reason
    assert server.get_json("/v1/status")[0] == 200


@pytest.mark.parametrize("backend", [half_close], indirect=True)
def test_backend_half_close_delivers_data_then_closes(start_server: StartServer,
                                                      backend: FaultyBackend) -> None:
    server = start_server("--client_port", str(backend.port))

    async def scenario() -> tuple[bytes, int]:
        async with websockets.connect(server.ws_url()) as ws:
            data = await asyncio.wait_for(recv_bytes(ws), 10)
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 10)
            return data, received_close(info.value).code

    assert asyncio.run(scenario()) == (b"last words", 1000)
    assert backend.closed_by_peer.wait(10)  # and the server closed its side too


@pytest.mark.parametrize("backend", [wait_for_peer_close], indirect=True)
def test_browser_vanishing_without_close_frame_closes_backend(start_server: StartServer,
                                                              backend: FaultyBackend) -> None:
    server = start_server("--client_port", str(backend.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock = socket.create_connection(("127.0.0.1", server.ws_port))
    sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, no close frame
    assert backend.closed_by_peer.wait(10)
    assert server.get_json("/v1/status")[0] == 200


@pytest.mark.parametrize("backend", [flood], indirect=True)
def test_flood_toward_stalled_browser_keeps_memory_bounded(start_server: StartServer,
                                                           backend: FaultyBackend) -> None:
    """1 GiB offered to a browser that stops reading: the server's RSS barely moves."""
    server = start_server("--client_port", str(backend.port))
    processes = server.descendants()  # the server process and its relay, which relays

    def rss() -> int:
        return sum(proc.memory_info().rss for proc in processes)

    before = rss()

    async def scenario() -> int:
        async with websockets.connect(server.ws_url(), max_size=None, max_queue=1,
                                      close_timeout=1) as ws:
            await ws.recv()  # the flood is on; stop reading
            sent = -1
            while backend.sent != sent:  # until the flood stalls (or all 1 GiB is out)
                sent = backend.sent
                await asyncio.sleep(0.5)
            return rss()

    growth = asyncio.run(scenario()) - before
    assert growth < 64 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
    wait_until(backend.closed_by_peer.is_set, timeout=15)  # the backend got closed too
