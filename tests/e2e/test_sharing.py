"""Shared sessions end to end: share tokens, viewers with their own connection to the
running instance, and their end (revoked, the session over, max_viewers).

A real server and an echo service that serves several connections at once; the
view-only filter of RFB services has its own tests (tests/test_rfb.py and the desktop
in Chromium).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import websockets

from support import ServerProcess, StartServer, received_close, recv_bytes

ECHO = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def start(start_server: StartServer, tmp_path: Path, max_viewers: int = 1) -> ServerProcess:
    (tmp_path / "echo.py").write_text(ECHO)
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"echo": {
        "command": [sys.executable, str(tmp_path / "echo.py"), "{port}"], "count": 1,
        "max_viewers": max_viewers}}))
    return start_server("--remote_session_config", str(config))


async def echoes(ws: websockets.ClientConnection, payload: bytes) -> bool:
    await ws.send(payload)
    return await asyncio.wait_for(recv_bytes(ws), 10) == payload


def test_a_viewer_joins_the_running_session_and_leaves_with_it(
        start_server: StartServer, tmp_path: Path) -> None:
    """Not before it runs (409); its own connection (control passes input); one viewer
    at most here (429); status lists it, never its token; leaving changes nothing;
    revoking closes it; the session's end closes the others (1001, why)."""
    server = start(start_server, tmp_path)
    token = server.get_json("/v1/reserve/echo")[1]["token"]
    status, shared = server.get_json(f"/v1/share/{token}?mode=control", auth=False)
    assert status == 200 and shared["mode"] == "control" and shared["token"] != token
    share = shared["token"]

    async def scenario() -> None:
        try:
            await websockets.connect(server.ws_url(token=share), open_timeout=10)
            raise AssertionError("a viewer joined a session not running yet")
        except websockets.InvalidStatus as refused:
            assert refused.response.status_code == 409
        async with websockets.connect(server.ws_url(token=token)) as owner:
            assert await echoes(owner, b"owner")
            async with websockets.connect(server.ws_url(token=share)) as viewer:
                assert await echoes(viewer, b"viewer")  # control: input passes
                try:
                    await websockets.connect(server.ws_url(token=share), open_timeout=10)
                    raise AssertionError("a second viewer joined (max_viewers 1)")
                except websockets.InvalidStatus as refused:
                    assert refused.response.status_code == 429
                [instance] = server.get_json("/v1/status")[1][0]["instances"]
                [seen] = instance["viewers"]
                assert seen["mode"] == "control" and share not in json.dumps(instance)
            assert await echoes(owner, b"still")  # the viewer left: nothing else changed
            view = await asyncio.to_thread(server.get_json, f"/v1/share/{token}", auth=False)
            assert view[0] == 409  # view-only needs "protocol": "rfb"
            async with websockets.connect(server.ws_url(token=share)) as viewer:
                assert await echoes(viewer, b"again")
                assert (await asyncio.to_thread(server.get_json,
                                                f"/v1/release/{share}", auth=False))[0] == 200
                try:
                    await asyncio.wait_for(viewer.recv(), 10)
                except websockets.ConnectionClosed as closed:
                    assert received_close(closed).reason == "share revoked"
            other = (await asyncio.to_thread(server.get_json,
                                             f"/v1/share/{token}?mode=control",
                                             auth=False))[1]["token"]
            async with websockets.connect(server.ws_url(token=other)) as viewer:
                assert await echoes(viewer, b"last")
                await asyncio.to_thread(server.get_json, f"/v1/release/{token}", auth=False)
                try:
                    await asyncio.wait_for(viewer.recv(), 10)
                except websockets.ConnectionClosed as closed:
                    close = received_close(closed)
                    assert (close.code, close.reason) == (1001, "reservation released")
    asyncio.run(scenario())
    assert share not in server.log() and token not in server.log()
