"""Shared sessions end to end: share tokens, viewers with their own connection to the
running instance, and their end (revoked, the session over, max_viewers).

A real server and an echo service that serves several connections at once; the
view-only filter of RFB services has its own tests (tests/test_rfb.py and the desktop
in Chromium).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import websockets

from e2e.vnc_support import DESKTOP_CONFIG, require, reserve, rfb_handshake
from support import (
    ServerProcess,
    StartServer,
    marked_processes,
    received_close,
    recv_bytes,
    wait_until,
)

if TYPE_CHECKING:
    from cluster_support import RedisServer

pytest_plugins = ["cluster_support"]

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
                dashboard = server.get("/v1/status_view")[2].decode()
                assert "1 viewer (control: anonymous)" in dashboard and share not in dashboard
            assert await echoes(owner, b"still")  # the viewer left: nothing else changed
            view = await asyncio.to_thread(server.get_json, f"/v1/share/{token}", auth=False)
            assert view[0] == 409  # view-only needs "protocol": "rfb"
            async with websockets.connect(server.ws_url(token=share)) as viewer:
                assert await echoes(viewer, b"again")
                revoked = await asyncio.to_thread(server.get_json, f"/v1/release/{share}",
                                                  auth=False)
                assert revoked == (200, {"released": share, "service": "echo"})
                assert token not in json.dumps(revoked)  # the viewer learns no more
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


# A VNC server that records what each client sends after its handshake: version 3.8,
# security None, ClientInit (its shared flag), ServerInit, then every byte, in
# folder/N (N: the connection's number).
RFB_SERVER = r"""
import socket, struct, sys, threading
from pathlib import Path
folder, count = Path(sys.argv[2]), iter(range(1000))

def serve(conn, number):
    with conn, (folder / str(number)).open("wb") as record:
        conn.sendall(b"RFB 003.008\n")
        conn.recv(12)
        conn.sendall(b"\x01\x01")  # one security type: None
        conn.recv(1)
        conn.sendall(struct.pack("!I", 0))  # SecurityResult OK
        record.write(conn.recv(1))  # ClientInit: the shared flag
        record.flush()
        name = b"recorder"
        conn.sendall(struct.pack("!HH16sI", 64, 48, bytes(16), len(name)) + name)
        while data := conn.recv(65536):
            record.write(data)
            record.flush()

server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn, next(count)), daemon=True).start()
"""
KEY = struct.pack("!BBxxI", 4, 1, 0x61)  # KeyEvent: press "a"
UPDATE = struct.pack("!BBHHHH", 3, 0, 0, 0, 64, 48)  # FramebufferUpdateRequest


async def rfb_client(url: str, shared: int) -> websockets.ClientConnection:
    """A VNC client over the websocket, through the handshake (None) and ClientInit."""
    ws = await websockets.connect(url, open_timeout=10)
    assert await asyncio.wait_for(recv_bytes(ws), 10) == b"RFB 003.008\n"
    await ws.send(b"RFB 003.008\n")
    assert await asyncio.wait_for(recv_bytes(ws), 10) == b"\x01\x01"
    await ws.send(b"\x01")
    assert await asyncio.wait_for(recv_bytes(ws), 10) == bytes(4)
    await ws.send(bytes([shared]))
    await asyncio.wait_for(recv_bytes(ws), 10)  # ServerInit
    return ws


def test_a_view_viewer_s_input_never_reaches_the_application(
        start_server: StartServer, tmp_path: Path) -> None:
    """"protocol": "rfb": a view viewer's KeyEvent, sent split across frames, is
    dropped (and counted); its update requests pass; every ClientInit asks to share;
    the owner's input passes."""
    records = tmp_path / "records"
    records.mkdir()
    (tmp_path / "rfb.py").write_text(RFB_SERVER)
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"desktop": {
        "command": [sys.executable, str(tmp_path / "rfb.py"), "{port}", str(records)],
        "count": 1, "protocol": "rfb"}}))
    server = start_server("--remote_session_config", str(config))
    token = server.get_json("/v1/reserve/desktop")[1]["token"]

    async def scenario() -> None:
        owner = await rfb_client(server.ws_url(token=token), shared=0)
        status, body = await asyncio.to_thread(server.get_json, f"/v1/share/{token}",
                                               auth=False)
        assert (status, body["mode"]) == (200, "view")
        viewer = await rfb_client(server.ws_url(token=body["token"]), shared=0)
        for piece in (KEY[:1], KEY[1:5], KEY[5:] + UPDATE[:3], UPDATE[3:]):
            await viewer.send(piece)  # a KeyEvent split over three frames
        await owner.send(KEY)
        await asyncio.sleep(0.5)
        await viewer.close()
        await owner.close()
    asyncio.run(scenario())
    owner_bytes, viewer_bytes = ((records / name).read_bytes() for name in ("0", "1"))
    assert owner_bytes == b"\x01" + KEY  # shared forced; the owner's input passes
    assert viewer_bytes == b"\x01" + UPDATE  # the KeyEvent never reached it
    metrics = server.get("/v1/metrics")[2].decode()
    assert 'websocketserver_viewer_input_dropped_total{message="KeyEvent"} 1.0' in metrics


def test_in_a_cluster_a_viewer_reaches_the_session_s_instance_and_any_revokes(
        start_server: StartServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """The session runs on a; the share is made on b and its viewer connects to b,
    which forwards it to a; a revoke on b closes the viewer on a."""
    (tmp_path / "echo.py").write_text(ECHO)
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"echo": {
        "command": [sys.executable, str(tmp_path / "echo.py"), "{port}"], "count": 1}}))
    common = ("--redis", redis_server.url, "--cluster_secret", "s3cret",
              "--relay_processes", "0", "--remote_session_config", str(config))
    a = start_server(*common, "--node_name", "a")
    b = start_server(*common, "--node_name", "b")
    token = a.get_json("/v1/reserve/echo")[1]["token"]

    async def scenario() -> None:
        async with websockets.connect(a.ws_url(token=token)) as owner:
            assert await echoes(owner, b"owner")
            status, shared = await asyncio.to_thread(
                b.get_json, f"/v1/share/{token}?mode=control", auth=False)
            assert status == 200, shared
            async with websockets.connect(b.ws_url(token=shared["token"])) as viewer:
                assert await echoes(viewer, b"through b")
                [instance] = (await asyncio.to_thread(a.get_json, "/v1/status"))[1][0][
                    "instances"]
                assert len(instance["viewers"]) == 1  # on a, the session's instance
                assert (await asyncio.to_thread(b.get_json, f"/v1/release/{shared['token']}",
                                                auth=False))[0] == 200
                try:
                    await asyncio.wait_for(viewer.recv(), 10)
                except websockets.ConnectionClosed as closed:
                    assert received_close(closed).reason == "share revoked"
            assert await echoes(owner, b"still the owner's")
    asyncio.run(scenario())


def test_the_proxy_logs_in_and_no_password_leaves_the_server(
        start_server: StartServer) -> None:
    """The example desktop's x11vnc asks for a per-instance password (VNC
    authentication only); the browser is offered None and gets the desktop; the
    password is in a file only its user reads, never in a command line, page or log."""
    require("Xvfb", "x11vnc")
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG))
    token = reserve(server)

    async def session() -> Path:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            init = await rfb_handshake(ws)  # asserts that None is offered
            assert (init.width, init.height) == (1280, 1024)
            return await asyncio.to_thread(check_the_vnc_server)

    def check_the_vnc_server() -> Path:
        [x11vnc] = [p for p in marked_processes(server) if p.name() == "x11vnc"]
        argv = x11vnc.cmdline()
        port, password_file = (int(argv[argv.index("-rfbport") + 1]),
                               Path(argv[argv.index("-rfbauth") + 1]))
        assert password_file.stat().st_mode & 0o077 == 0  # its user's only
        with socket.create_connection(("127.0.0.1", port), timeout=10) as direct:
            assert direct.recv(12) == b"RFB 003.008\n"
            direct.sendall(b"RFB 003.008\n")
            assert direct.recv(2) == b"\x01\x02"  # VNC authentication, nothing else
        secret = password_file.read_bytes().decode("latin-1")
        for text in (server.log(), server.get("/v1/status_view")[2].decode("latin-1"),
                     " ".join(" ".join(p.cmdline()) for p in marked_processes(server))):
            assert secret not in text
        return password_file

    password_file = asyncio.run(session())
    wait_until(lambda: not password_file.exists(), 20)  # removed with its instance


VENCRYPT_ONLY = r"""
import socket, sys, time
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    conn.sendall(b"RFB 003.008\n")
    conn.recv(12)
    conn.sendall(b"\x01\x13")  # VeNCrypt (19) only
"""


def test_a_vnc_server_without_none_or_vnc_authentication_cannot_be_shared(
        start_server: StartServer, tmp_path: Path) -> None:
    """Its security cannot be followed: its websocket is closed naming it, and the
    share call says so (409), rather than giving viewers nothing to join."""
    (tmp_path / "vencrypt.py").write_text(VENCRYPT_ONLY)
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"tls": {
        "command": [sys.executable, str(tmp_path / "vencrypt.py"), "{port}"], "count": 1,
        "protocol": "rfb", "reconnect_grace": 30}}))
    server = start_server("--remote_session_config", str(config))
    token = server.get_json("/v1/reserve/tls")[1]["token"]

    async def owner() -> None:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            assert await asyncio.wait_for(recv_bytes(ws), 10) == b"RFB 003.008\n"
            await ws.send(b"RFB 003.008\n")
            assert await asyncio.wait_for(recv_bytes(ws), 10) == b"\x01\x13"
            await ws.send(b"\x13")  # the browser picks VeNCrypt
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                assert received_close(closed).code == 1008
    asyncio.run(owner())
    status, body = server.get_json(f"/v1/share/{token}", auth=False)
    assert status == 409 and "offers security types [19]" in body["error"], body
