"""The real command line in basic mode: both launch lines, tunnelling, REST, stopping."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from websockets.typing import Subprotocol

from support import (
    LAUNCHER,
    ROOT,
    EchoBackend,
    ServerProcess,
    StartServer,
    free_port,
    received_close,
    recv_bytes,
)

SIZES = [1, 125, 126, 65535, 65536, 1024 * 1024, 16 * 1024 * 1024]


async def echo_roundtrip(url: str, payload: bytes | str) -> bytes:
    async with websockets.connect(url, subprotocols=[Subprotocol("binary")], max_size=None) as ws:
        await ws.send(payload)
        expected = len(payload.encode() if isinstance(payload, str) else payload)
        received = bytearray()
        while len(received) < expected:
            received += await recv_bytes(ws)
        return bytes(received)


@pytest.mark.parametrize("launch_line", ["port_last", "port_first"])
def test_contract_launch_lines_tunnel_and_stop(launch_line: str, echo: EchoBackend,
                                               tmp_path: Path) -> None:
    """Both real launch lines (the port last or first, docs/reference.md) start, tunnel,
    and stop on /v1/stop."""
    ws_port, http_port = free_port(), free_port()
    common = ["--http_directory", str(ROOT / "demo" / "www"), "--http_port", str(http_port)]
    if launch_line == "port_last":
        argv = [*common, "--client_port", str(echo.port), "--local_session", "envision", "5",
                "--security_token", "K", str(ws_port)]
    else:
        argv = [str(ws_port), *common, "--security_token", "K", "--client_port",
                str(echo.port), "--add_header", "instance_name=N", "--local_session",
                "envision", "5"]
    # the launch lines as clients write them; tests listen on loopback only
    argv = ["--listen_address", "127.0.0.1", *argv]
    server = ServerProcess([sys.executable, str(LAUNCHER), *argv], ws_port=ws_port,
                           http_port=http_port, token="K", log_dir=tmp_path)
    try:
        data = os.urandom(4096)
        assert asyncio.run(echo_roundtrip(server.ws_url(), data)) == data
        status, body = server.get_json("/v1/status")
        assert status == 200
        assert [s["name"] for s in body] == ["local_envision"]
        if launch_line == "port_first":
            _, headers, _ = server.get("/v1/status")
            assert headers["instance_name"] == "N"
        assert server.get_json("/v1/stop")[0] == 200
        assert server.wait_exit(5) == 0
        assert server.descendants() == []
    finally:
        server.close()


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from support import EchoBackend

    backend = EchoBackend()
    server = ServerProcess.start("--client_port", str(backend.port),
                           log_dir=tmp_path_factory.mktemp("logs"))
    yield server
    server.close()
    backend.close()


@pytest.mark.parametrize("size", SIZES)
def test_binary_messages_are_byte_exact(echo_server: ServerProcess, size: int) -> None:
    data = os.urandom(size)
    assert asyncio.run(echo_roundtrip(echo_server.ws_url(), data)) == data


def test_text_frames_are_forwarded_as_bytes(echo_server: ServerProcess) -> None:
    assert asyncio.run(echo_roundtrip(echo_server.ws_url("/any/path"), "héllo")) == \
        "héllo".encode()


def test_binary_subprotocol_and_none(echo_server: ServerProcess) -> None:
    async def check() -> tuple[str | None, str | None]:
        async with websockets.connect(echo_server.ws_url(),
                                      subprotocols=[Subprotocol("binary")]) as ws:
            offered = ws.subprotocol
        async with websockets.connect(echo_server.ws_url()) as ws:
            await ws.send(b"x")
            assert await ws.recv() == b"x"
            plain = ws.subprotocol
        return offered, plain

    assert asyncio.run(check()) == ("binary", None)


def test_status_needs_token(echo_server: ServerProcess) -> None:
    assert echo_server.get_json("/v1/status", auth=False) == (
        401, {"error": "missing or wrong security_token"})
    assert echo_server.get_json("/v1/status?security_token=wrong", auth=False)[0] == 401
    status, body = echo_server.get_json(
        "/v1/status", auth=False, headers={"Authorization": "Bearer K"})
    assert (status, body) == (200, [])


def test_unknown_api_and_bridge(echo_server: ServerProcess) -> None:
    assert echo_server.get_json("/v1/nope")[0] == 404
    assert echo_server.get_json("/v2/status")[0] == 404
    status, body = echo_server.get_json("/ensight/v1/session")
    assert status == 501 and "error" in body


def test_token_never_logged(echo_server: ServerProcess) -> None:
    echo_server.get("/v1/status")
    echo_server.get("/v1/nope?security_token=K")
    assert "security_token=K" not in echo_server.log()


def test_backend_refusing_closes_with_reason(start_server: StartServer) -> None:
    server = start_server("--client_port", str(free_port()))

    async def check() -> tuple[int, str]:
        async with websockets.connect(server.ws_url()) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return received_close(closed.value).code, received_close(closed.value).reason

    code, reason = asyncio.run(check())
    assert code == 1011 and "cannot connect to backend" in reason
    # and the server keeps serving
    assert server.get_json("/v1/status")[0] == 200


def test_backend_closing_closes_websocket(start_server: StartServer) -> None:
    port = free_port()

    async def check() -> tuple[int, bytes]:
        async def greet_and_close(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
            writer.write(b"bye")
            await writer.drain()
            writer.close()

        backend = await asyncio.start_server(greet_and_close, "127.0.0.1", port)
        async with backend:
            server = await asyncio.to_thread(start_server, "--client_port", str(port))
            async with websockets.connect(server.ws_url()) as ws:
                data = await recv_bytes(ws)
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                return received_close(closed.value).code, data

    assert asyncio.run(check()) == (1000, b"bye")


def test_no_client_port_and_no_token_is_refused(start_server: StartServer) -> None:
    server = start_server()

    async def check() -> int:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(server.ws_url()):
                pass
        return refused.value.response.status_code

    assert asyncio.run(check()) == 404


def test_sigterm_is_graceful(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port))
    server.proc.terminate()
    assert server.wait_exit(5) == 0


def test_no_websocket_listener(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--client_port", str(echo.port), ws_port=-1)
    assert server.get_json("/v1/status")[0] == 200
