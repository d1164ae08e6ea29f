"""``--log_format json`` end to end: everything the server and its relay process write,
stdout and stderr, is one JSON object a line, and no secret a client sent is in it,
not even in a traceback that quotes the request."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from e2e.test_relay import connected_to, echo_once, relays
from support import EchoBackend, StartServer
from websocketserver.logs import REDACTED

TOKEN = "s3cret-T0ken-4f1d"
WRONG = "wr0ng-T0ken-77aa"
GUID = "7d8f3a2e-1b4c-4e5f-9a6b-0c1d2e3f4a5b"


def test_json_log_lines_without_secrets(start_server: StartServer, echo: EchoBackend) -> None:
    server = start_server("--log_format", "json", "--verbose", "3", "--client_port",
                          str(echo.port), token=TOKEN)
    [relay] = relays(server)
    assert server.get("/v1/status")[0] == 200
    assert server.get(f"/v1/status?security_token={WRONG}", auth=False)[0] == 401
    assert server.get("/v1/status", auth=False,
                      headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200

    for port in (server.http_port, server.ws_port):  # too long: the parsers' errors quote it
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET /v1/status?security_token={TOKEN}&x={'a' * 9000} HTTP/1.1"
                         "\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert b" 400 " in sock.recv(100), port

    async def tunnel() -> None:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(server.ws_url(token=GUID))
        assert refused.value.response.status_code == 404  # no such reservation
        async with websockets.connect(server.ws_url()) as ws:
            await echo_once(ws)
            assert connected_to(relay, echo.port)  # its lines are the relay's

    asyncio.run(tunnel())
    server.close()
    assert server.proc.returncode == 0
    text = server.log()
    entries = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    for secret in (TOKEN, WRONG, GUID):
        assert secret not in text
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("tunnel open: ") for message in messages), messages
    assert any(message.startswith("tunnel closed: ") for message in messages), messages
    assert any(f"security_token={REDACTED}&x=aaa" in entry.get("exception", "")
               for entry in entries)  # aiohttp's traceback (--verbose 3) quoted the token
