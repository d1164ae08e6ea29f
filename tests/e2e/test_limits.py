"""Limits with clear answers: tunnel counts, sizes, slow clients, origins, idleness."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Origin

from support import EchoBackend, StartServer, received_close, wait_until


def refused_status(url: str, **kwargs: Any) -> int:
    async def attempt() -> int:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, **kwargs):
                pass
        return refused.value.response.status_code

    return asyncio.run(attempt())


async def echo_once(ws: ClientConnection) -> None:
    await ws.send(b"x")
    assert await asyncio.wait_for(ws.recv(), 10) == b"x"


def test_global_and_per_client_tunnel_limits(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--max_tunnels", "3",
                          "--max_tunnels_per_client", "2")

    async def scenario() -> None:
        first = await websockets.connect(server.ws_url())
        second = await websockets.connect(server.ws_url())
        for ws in (first, second):
            await echo_once(ws)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url())
        assert refused.value.response.status_code == 429
        await first.close()
        third = await websockets.connect(server.ws_url())  # a slot came back
        await echo_once(third)
        await second.close()
        await third.close()

    asyncio.run(scenario())
    assert "limit of 2 tunnels" in server.log()


def test_global_limit_is_503(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--max_tunnels", "1")

    async def scenario() -> int:
        async with websockets.connect(server.ws_url()) as ws:
            await echo_once(ws)
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws_url())
            return refused.value.response.status_code

    assert asyncio.run(scenario()) == 503


def test_per_user_limit(start_server: StartServer, echo: EchoBackend, tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"merlin": "mk", "arthur": "ak"}))
    server = start_server("--client_port", str(echo.port), "--users_file", str(users),
                          "--max_tunnels_per_user", "1")

    async def scenario() -> int:
        async with websockets.connect(server.ws_url(user_key="mk")) as ws:
            await echo_once(ws)
            async with websockets.connect(server.ws_url(user_key="ak")) as other:
                await echo_once(other)  # another user is not affected
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws_url(user_key="mk"))
            return refused.value.response.status_code

    assert asyncio.run(scenario()) == 429


def test_message_too_big_closes_1009(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--max_message_size", "1000")

    async def scenario() -> int:
        async with websockets.connect(server.ws_url()) as ws:
            await ws.send(os.urandom(1000))
            await asyncio.wait_for(ws.recv(), 10)
            await ws.send(os.urandom(1001))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return received_close(closed.value).code

    assert asyncio.run(scenario()) == 1009
    assert server.get_json("/v1/status")[0] == 200


def test_oversized_header_is_refused(start_server: StartServer) -> None:
    server = start_server("--max_header_size", "2000")
    status, _, body = server.get("/index.html", headers={"X-Big": "a" * 3000})
    assert status in (400, 431) and b"Traceback" not in body
    assert server.get("/index.html", headers={"X-Small": "a" * 1000})[0] == 200


@pytest.mark.parametrize("port_name", ["http_port", "ws_port"])
def test_slowloris_connection_is_closed(start_server: StartServer, port_name: str) -> None:
    server = start_server("--handshake_timeout", "0.5", "--client_port", "1")
    port = getattr(server, port_name)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finish the headers
        sock.settimeout(10)
        began = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert 0.3 < time.monotonic() - began < 5
    assert "no request within 0.5 s" in server.log()
    assert server.get("/index.html")[0] == 200


@pytest.mark.parametrize("port_name", ["http_port", "ws_port"])
def test_many_silent_connections_write_a_few_log_lines(start_server: StartServer,
                                                       port_name: str) -> None:
    """100 connections that send nothing cost the log at most 10 lines (per 10 s)
    rather than 100: a client can open them at will."""
    server = start_server("--handshake_timeout", "0.5", "--client_port", "1")
    port = getattr(server, port_name)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1024) == b""  # each closed by the server
    finally:
        for sock in silent:
            sock.close()
    assert 1 <= server.log().count("no request within 0.5 s") <= 10
    assert server.get("/index.html")[0] == 200


def test_origin_allow_list(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port),
                          "--allowed_origin", "https://portal.example.com")
    assert refused_status(server.ws_url(), origin="https://evil.example.net") == 403

    async def allowed() -> None:
        for origin in (Origin("https://portal.example.com"), None):
            async with websockets.connect(server.ws_url(), origin=origin) as ws:
                await echo_once(ws)

    asyncio.run(allowed())


def test_idle_timeout_closes_quiet_tunnels_only(start_server: StartServer,
                                                echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--idle_timeout", "0.6")

    async def scenario() -> tuple[int, str]:
        async with websockets.connect(server.ws_url()) as busy, \
                websockets.connect(server.ws_url()) as quiet:
            for _ in range(12):  # 1.2 s (twice the timeout) of traffic on one, none on the other
                await echo_once(busy)
                await asyncio.sleep(0.1)
            assert busy.state is websockets.State.OPEN
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(quiet.recv(), 5)
            return received_close(closed.value).code, received_close(closed.value).reason

    assert asyncio.run(scenario()) == (1001, "idle for 0.6 s")


def test_ping_interval_drops_a_silent_peer(start_server: StartServer, echo: EchoBackend) -> None:
    """A peer that never answers pings is disconnected."""
    server = start_server("--client_port", str(echo.port), "--ping_interval", "0.25")
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", server.ws_port)) as sock:
        sock.sendall((f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        sock.settimeout(10)
        received = b""
        began = time.monotonic()
        while chunk := sock.recv(4096):  # read pings, never pong
            received += chunk
        assert received.startswith(b"HTTP/1.1 101")
        assert b"\x89" in received  # a ping frame was sent
        close = received.index(b"\x88", received.index(b"\x89"))  # then a close frame:
        assert received[close + 2:close + 4] == b"\x03\xe9"  # 1001, going away
        assert time.monotonic() - began < 5
    wait_until(lambda: server.get_json("/v1/status")[0] == 200)
