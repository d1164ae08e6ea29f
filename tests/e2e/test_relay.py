"""Relay processes (``--relay_processes``): basic-mode tunnels run in a forked process
while the main one keeps every decision; limits, metrics, shutdown and a dying relay
must come out as they do with everything in one process."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import struct
from pathlib import Path

import psutil
import pytest
import trustme
import websockets
from websockets.asyncio.client import ClientConnection

from e2e.test_metrics import scrape
from support import EchoBackend, ServerProcess, StartServer, received_close, wait_until


def relays(server: ServerProcess) -> list[psutil.Process]:
    """The server process's children that run its own command: its relay processes."""
    main = psutil.Process(server.serving_pid())
    found = []
    for child in main.children():
        if child.cmdline() == main.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
            found.append(child)
    return found


def connected_to(proc: psutil.Process, port: int) -> bool:
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in proc.net_connections("tcp"))


async def echo_once(ws: ClientConnection, data: bytes = b"x") -> None:
    await ws.send(data)
    assert await asyncio.wait_for(ws.recv(), 10) == data


def test_a_basic_tunnel_runs_in_the_relay(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port))
    [relay] = relays(server)
    main = psutil.Process(server.serving_pid())

    async def scenario() -> None:
        async with websockets.connect(server.ws_url()) as ws:
            await echo_once(ws)
            assert connected_to(relay, echo.port)
            assert not connected_to(main, echo.port)

    asyncio.run(scenario())


def test_limits_and_metrics_span_the_relay(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--max_tunnels_per_client", "2")

    async def scenario() -> None:
        first = await websockets.connect(server.ws_url())
        second = await websockets.connect(server.ws_url())
        for ws in (first, second):
            await echo_once(ws, b"y" * 1000)
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url())
        assert refused.value.response.status_code == 429
        assert scrape(server)[("websocketserver_tunnels_open", ())] == 2
        await first.close()
        wait_until(lambda: scrape(server)[("websocketserver_tunnels_open", ())] == 1)
        third = await websockets.connect(server.ws_url())  # the relay gave the slot back
        await echo_once(third)
        await second.close()
        await third.close()

    asyncio.run(scenario())
    wait_until(lambda: scrape(server)[("websocketserver_tunnels_open", ())] == 0)
    metrics = scrape(server)
    assert metrics[("websocketserver_tunnels_total", ())] == 3
    assert metrics[("websocketserver_bytes_total", (("direction", "up"),))] == 2001


def test_a_relay_that_dies_costs_its_tunnels_not_the_server(start_server: StartServer,
                                                            echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--max_tunnels_per_client", "1")
    [relay] = relays(server)

    async def scenario() -> None:
        async with websockets.connect(server.ws_url()) as ws:
            await echo_once(ws)
            relay.send_signal(signal.SIGKILL)
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        wait_until(lambda: "relay process" in server.log())
        async with websockets.connect(server.ws_url()) as ws:  # the limit was released
            await echo_once(ws)  # and the main process relays it itself

    asyncio.run(scenario())
    assert f"relay process {relay.pid} exited; 1 tunnels lost" in server.log()
    server.close()
    assert server.proc.returncode == 0


def test_shutdown_closes_relayed_tunnels_with_1001(start_server: StartServer,
                                                   echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port))
    [relay] = relays(server)

    async def scenario() -> tuple[int | None, str | None]:
        async with websockets.connect(server.ws_url()) as ws:
            await echo_once(ws)
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return received_close(closed.value).code, received_close(closed.value).reason

    assert asyncio.run(scenario()) == (1001, "server shutting down")
    assert server.wait_exit(20) == 0
    assert not psutil.pid_exists(relay.pid) or relay.status() == psutil.STATUS_ZOMBIE


def test_a_killed_server_takes_its_relay_along(start_server: StartServer,
                                               echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port))
    [relay] = relays(server)
    os.kill(server.serving_pid(), signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(relay.pid)
               or relay.status() == psutil.STATUS_ZOMBIE)


def test_request_and_first_frame_in_one_write(start_server: StartServer, echo: EchoBackend) -> None:
    """What a client sends right behind its request goes to the relay with the socket."""
    server = start_server("--client_port", str(echo.port))
    key = base64.b64encode(os.urandom(16))
    mask = os.urandom(4)
    payload = b"sent with the request"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    frame = struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask + masked
    request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", server.ws_port), timeout=10) as sock:
        sock.sendall(request + frame)
        received = b""
        while not received.endswith(payload):
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    assert received.startswith(b"HTTP/1.1 101 ")
    assert received.endswith(struct.pack("!BB", 0x82, len(payload)) + payload)


def test_no_relay_without_basic_mode_with_tls_or_when_asked(start_server: StartServer,
                                                            echo: EchoBackend,
                                                            tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    servers = [
        start_server("--client_port", str(echo.port), "--relay_processes", "0"),
        start_server("--client_port", str(echo.port), tls=(cert_path, key_path)),
        start_server(),  # no --client_port: only service tunnels, which stay in the main
    ]
    for server in servers:
        assert relays(server) == []

    async def scenario() -> None:
        async with websockets.connect(servers[0].ws_url()) as ws:
            await echo_once(ws)

    asyncio.run(scenario())


def test_two_relays_share_the_tunnels(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), "--relay_processes", "2")
    both = relays(server)
    assert len(both) == 2

    async def scenario() -> None:
        sockets = [await websockets.connect(server.ws_url()) for _ in range(4)]
        for ws in sockets:
            await echo_once(ws)
        for relay in both:
            assert connected_to(relay, echo.port)
        for ws in sockets:
            await ws.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("relay_processes", ["0", "1"])
def test_a_closed_tunnels_slot_is_free_once_its_close_frame_is_seen(
        start_server: StartServer, echo: EchoBackend, relay_processes: str) -> None:
    """A page that closes its websocket and opens another at once must not meet a 429:
    the slot is given back before the close frame answering the browser's goes out."""
    server = start_server("--client_port", str(echo.port), "--max_tunnels_per_client", "1",
                          "--relay_processes", relay_processes)
    close = struct.pack("!BB", 0x88, 0x82) + bytes(4) + struct.pack("!H", 1000)  # mask 0
    for attempt in range(150):
        key = base64.b64encode(os.urandom(16))
        request = (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                   b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
        with socket.create_connection(("127.0.0.1", server.ws_port), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(4096)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 101 "), (attempt, received)
            sock.sendall(close)
            answer = received.partition(b"\r\n\r\n")[2]
            while len(answer) < 2:
                chunk = sock.recv(4096)
                assert chunk, answer
                answer += chunk
            assert answer[0] == 0x88, answer  # the server's close frame: reconnect now
