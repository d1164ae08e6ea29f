"""Floods from a hostile browser: the server tree's memory stays bounded, it keeps serving.

Each test measures the RSS of the whole process tree (the server and its relay) while
a raw-socket client misbehaves, then checks that ``/v1/status`` still answers.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from support import ROOT, EchoBackend, ServerProcess, StartServer, wait_until

MiB = 1024 * 1024
SERVICES = ROOT / "tests" / "e2e" / "scripts" / "services.json"



def upgrade(port: int, path: str = "/websockify") -> socket.socket:
    """A raw websocket (no reading done for us); raises if the answer is not 101."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before the answer")
        head += chunk
    status = head.split(b" ", 2)[1]
    if status != b"101":
        sock.close()
        raise ConnectionRefusedError(head.decode(errors="replace"))
    return sock


def frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """A masked client frame header with the all-zero mask (payload sent as is)."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return struct.pack("!BB", first, 0x80 | length) + b"\0\0\0\0"
    if length < 65536:
        return struct.pack("!BBH", first, 0x80 | 126, length) + b"\0\0\0\0"
    return struct.pack("!BBQ", first, 0x80 | 127, length) + b"\0\0\0\0"


def send_for(sock: socket.socket, data: bytes, total: int, seconds: float,
             stall: float | None = None) -> int:
    """Send ``data`` repeatedly until ``total`` bytes or ``seconds`` pass, the server
    closes or (with ``stall``) the socket takes nothing for ``stall`` seconds; the bytes
    sent."""
    sent = 0
    view = memoryview(data)
    deadline = time.monotonic() + seconds
    sock.settimeout(stall or 0.5)
    while sent < total and time.monotonic() < deadline:
        offset = sent % len(data)
        try:
            sent += sock.send(view[offset:offset + total - sent])
        except TimeoutError:
            if stall is not None:
                break
            continue
        except OSError:
            break
    return sent


class SilentBackend:
    """A TCP backend that accepts and never reads (its receive buffer fills)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def silent() -> Iterator[SilentBackend]:
    backend = SilentBackend()
    yield backend
    backend.close()


def ping_flood(sock: socket.socket) -> int:
    pings = (frame_header(0x9, 125) + b"p" * 125) * 2000
    return send_for(sock, pings, 100 * MiB, 5.0)


def assert_ping_flood_bounded(server: ServerProcess, sock: socket.socket) -> None:
    """100 MiB of pings on ``sock``, never a read: the tree grows by under 40 MiB and
    the server keeps answering."""
    before = server.tree_rss()
    sent = ping_flood(sock)
    growth = server.tree_rss() - before
    assert sent > 40 * MiB, "the flood never got going"
    assert growth < 40 * MiB, f"RSS grew by {growth / MiB:.0f} MiB for {sent / MiB:.0f} MiB"
    assert server.get_json("/v1/status")[0] == 200
    sock.close()


@pytest.mark.parametrize("relays", ["0", "1"])
def test_ping_flood_from_a_browser_that_never_reads(start_server: StartServer, echo: EchoBackend,
                                                    relays: str) -> None:
    """Pings as fast as the socket takes them, never a read: the pongs owed are
    coalesced (only the latest is kept) instead of piling up for the browser."""
    server = start_server("--client_port", str(echo.port), "--relay_processes", relays)
    sock = upgrade(server.ws_port)
    assert_ping_flood_bounded(server, sock)


def test_ping_flood_through_a_reservation_token(start_server: StartServer) -> None:
    """The same in the main process, on a service tunnel."""
    server = start_server("--remote_session_config", str(SERVICES))
    status, reply = server.get_json("/v1/reserve/echo")
    assert status == 200
    sock = upgrade(server.ws_port, f"/websockify?token={reply['token']}")
    sock.sendall(frame_header(0x2, 5) + b"ready")  # the service is up once it echoes
    echoed = b""
    while b"ready" not in echoed:
        echoed += sock.recv(100)
    assert_ping_flood_bounded(server, sock)


@pytest.mark.parametrize("relays", ["0", "1"])
def test_large_messages_toward_a_backend_that_never_reads(start_server: StartServer,
                                                          silent: SilentBackend,
                                                          relays: str) -> None:
    """Eight tunnels each send one 24 MiB frame to a backend that reads nothing. Held
    whole, that is ~8 x 72 MiB; the process's upstream budget (here 32 MiB) closes
    the tunnels that would exceed it with 1009."""
    server = start_server("--client_port", str(silent.port), "--relay_processes", relays,
                          "--max_upstream_buffer", str(32 * MiB))
    before = server.tree_rss()
    size = 24 * MiB
    payload = frame_header(0x2, size) + b"u" * size
    socks = [upgrade(server.ws_port) for _ in range(8)]
    threads = [threading.Thread(target=send_for, args=(sock, payload, len(payload), 10.0))
               for sock in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    growth = server.tree_rss() - before
    assert growth < 96 * MiB, f"RSS grew by {growth / MiB:.0f} MiB"
    assert server.get_json("/v1/status")[0] == 200
    closes = []
    for sock in socks:
        sock.settimeout(5)
        try:
            closes.append(sock.recv(4))
        except OSError:
            closes.append(b"")
        sock.close()
    assert b"\x88" + bytes([2 + len("upstream buffer of 33554432 bytes exhausted")]) + \
        struct.pack("!H", 1009) in closes


@pytest.mark.parametrize("relays", ["0", "1"])
def test_a_reset_browser_ends_its_stalled_tunnel(start_server: StartServer, silent: SilentBackend,
                                                 relays: str) -> None:
    """A browser whose upstream is stalled (its socket is not read) resets: the tunnel
    ends within seconds, and its limit slot is free again, without the backend."""
    server = start_server("--client_port", str(silent.port), "--relay_processes", relays,
                          "--max_tunnels_per_client", "1")
    sock = upgrade(server.ws_port)
    chunk = frame_header(0x2, MiB) + b"s" * MiB
    send_for(sock, chunk, 16 * MiB, 3.0, stall=0.5)  # until the server stops reading it
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST

    def reconnects() -> bool:
        try:
            upgrade(server.ws_port).close()
        except ConnectionRefusedError:
            return False
        return True

    assert wait_until(reconnects, timeout=8, interval=0.2)
