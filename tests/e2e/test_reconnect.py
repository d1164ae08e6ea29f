"""Reconnect grace end to end: a reserved instance outlives its websocket for a while.

The service here keeps state: each connection is told the process id and the value
it holds, and a line sent sets that value. A reconnect that reaches the same process
sees the same pid and the value set before.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets

from support import (
    LAUNCHER,
    ServerProcess,
    StartServer,
    marked_processes,
    received_close,
    recv_bytes,
    wait_until,
)

SERVICE = '''
import asyncio, os, sys
from pathlib import Path
from websocketserver import CommandService


class Stateful(CommandService):
    def command(self, index, options, port):
        return [sys.executable, str(Path(__file__).resolve()), str(port)]


async def serve(port):
    held = {"value": "none"}

    async def client(reader, writer):
        writer.write(f"pid {os.getpid()} value {held['value']}\\n".encode())
        while line := await reader.readline():
            held["value"] = line.decode().strip()
            writer.write(f"set {held['value']}\\n".encode())
        writer.close()

    server = await asyncio.start_server(client, "127.0.0.1", port)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
'''


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``kept`` has no grace of its own, ``own`` 30 s, ``never`` 0 (not kept)."""
    folder = tmp_path_factory.mktemp("reconnect")
    (folder / "stateful.py").write_text(SERVICE)
    path = folder / "services.json"
    path.write_text(json.dumps({
        "kept": {"script": "stateful.py", "count": 1},
        "own": {"script": "stateful.py", "count": 1, "reconnect_grace": 30},
        "never": {"script": "stateful.py", "count": 1, "reconnect_grace": 0},
    }))
    return path


SERVICES = ("kept", "own", "never")


def idle(server: ServerProcess) -> bool:
    """No instance of any service, and no service process."""
    return all(instances(server, name) == [] for name in SERVICES) \
        and marked_processes(server) == []


@pytest.fixture(scope="module")
def graced_server(config: Path) -> Iterator[ServerProcess]:
    server = ServerProcess.start("--remote_session_config", str(config), "--reconnect_grace",
                                 "30", log_dir=config.parent)
    yield server
    server.close()


@pytest.fixture
def graced(graced_server: ServerProcess) -> Iterator[ServerProcess]:
    """A server with ``--reconnect_grace 30``, shared by the tests that leave its metrics
    alone: idle before the test (checked); what the test left reserved is released after
    it, and the server idle again."""
    assert graced_server.proc.poll() is None, graced_server.log()
    assert idle(graced_server)
    yield graced_server
    for name in SERVICES:
        for instance in instances(graced_server, name):
            assert graced_server.get_json(f"/v1/release/{instance['token']}")[0] == 200
    wait_until(lambda: idle(graced_server), timeout=15)


def reserve(server: ServerProcess, name: str = "kept") -> str:
    status, body = server.get_json(f"/v1/reserve/{name}")
    assert status == 200, body
    token: str = body["token"]
    return token


def instances(server: ServerProcess, name: str = "kept") -> list[dict[str, Any]]:
    status, body = server.get_json("/v1/status")
    assert status == 200
    found: list[dict[str, Any]] = next(s for s in body if s["name"] == name)["instances"]
    return found


def states(server: ServerProcess, name: str = "kept") -> list[str]:
    return [i["state"] for i in instances(server, name)]


async def read_line(ws: websockets.ClientConnection) -> str:
    """One line of the service (its bytes may come in any number of messages)."""
    data = b""
    while not data.endswith(b"\n"):
        data += await asyncio.wait_for(recv_bytes(ws), 10)
    return data.decode().strip()


async def visit(server: ServerProcess, token: str, value: str | None = None) -> str:
    """Connect, read the greeting, set ``value`` if given, leave; the greeting."""
    async with websockets.connect(server.ws_url(token=token), open_timeout=30) as ws:
        greeting = await read_line(ws)
        if value is not None:
            await ws.send(f"{value}\n".encode())
            assert await read_line(ws) == f"set {value}"
        return greeting


def test_reconnect_within_grace_reaches_the_same_process(start_server: StartServer,
                                                         config: Path) -> None:
    server = start_server("--remote_session_config", str(config), "--reconnect_grace", "30")
    token = reserve(server)
    first = asyncio.run(visit(server, token, "blue"))
    assert first.startswith("pid ") and first.endswith(" value none")
    pid = first.split()[1]
    # at once, as a page reload does: the old websocket may still be being detached
    assert asyncio.run(visit(server, token, "green")) == f"pid {pid} value blue"
    wait_until(lambda: states(server) == ["detached"])
    [instance] = instances(server)
    assert 0 < instance["detached_seconds_left"] <= 30
    assert [p.pid for p in marked_processes(server)] == [int(pid)]
    status, _, page = server.get("/v1/status_view")
    assert status == 200 and b"detached" in page and b"s left" in page

    async def attached_twice() -> tuple[str, int]:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            greeting = await read_line(ws)
            assert states(server) == ["active"]
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(server.ws_url(token=token)):
                    pass
            return greeting, refused.value.response.status_code

    assert asyncio.run(attached_twice()) == (f"pid {pid} value green", 409)
    _, _, metrics = server.get("/v1/metrics")
    assert b'websocketserver_service_reattaches_total{service="kept"} 2.0' in metrics
    assert b'websocketserver_service_starts_total{service="kept"} 1.0' in metrics
    wait_until(lambda: states(server) == ["detached"])
    assert server.get_json(f"/v1/release/{token}")[0] == 200
    wait_until(lambda: instances(server) == [] and marked_processes(server) == [])


def test_a_reattach_never_reaches_a_process_that_took_a_dead_instances_port(
        graced: ServerProcess) -> None:
    """The detached instance died and another local process listens on its port: the
    re-attach is refused (410) without connecting there, and the session is over."""
    server = graced
    token = reserve(server)
    asyncio.run(visit(server, token))
    wait_until(lambda: states(server) == ["detached"])
    [proc] = marked_processes(server)
    [port] = [c.laddr.port for c in proc.net_connections() if c.status == psutil.CONN_LISTEN]
    proc.kill()
    impostor = wait_until(lambda: _bound(port))
    with impostor:
        with pytest.raises(websockets.InvalidStatus) as refused:
            asyncio.run(visit(server, token, "my password"))
        assert refused.value.response.status_code == 410
        assert b"kept instance ended while detached" in refused.value.response.body
        impostor.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody connected to it
            impostor.accept()
    assert instances(server) == [] and marked_processes(server) == []
    assert server.get_json("/v1/reserve/kept")[0] == 200  # the one slot is free again


def _bound(port: int) -> socket.socket | None:
    """A socket listening on ``port``, once its former owner has let go of it."""
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError:
        return None


def test_grace_expiry_stops_the_instance_and_frees_the_slot(start_server: StartServer,
                                                            config: Path) -> None:
    server = start_server("--remote_session_config", str(config), "--reconnect_grace", "1")
    token = reserve(server)
    asyncio.run(visit(server, token))
    wait_until(lambda: states(server) == ["detached"])
    assert len(marked_processes(server)) == 1
    wait_until(lambda: instances(server) == [] and marked_processes(server) == [], timeout=10)
    assert server.get_json("/v1/reserve/kept")[0] == 200  # the one slot is free again
    with pytest.raises(websockets.InvalidStatus) as gone:
        asyncio.run(visit(server, token))
    assert gone.value.response.status_code == 404


def test_release_while_detached_stops_at_once(graced: ServerProcess) -> None:
    server = graced
    token = reserve(server)
    asyncio.run(visit(server, token))
    wait_until(lambda: states(server) == ["detached"])
    status, body = server.get_json(f"/v1/release/{token}")
    assert status == 200 and body["released"] == token
    wait_until(lambda: instances(server) == [] and marked_processes(server) == [], timeout=5)


def test_shutdown_while_detached_leaves_no_process(start_server: StartServer, config: Path) -> None:
    server = start_server("--remote_session_config", str(config), "--reconnect_grace", "30")
    tokens = [reserve(server), reserve(server, "own")]
    for token in [*tokens, tokens[0]]:  # one re-attached and detached again
        asyncio.run(visit(server, token))
    wait_until(lambda: states(server) == states(server, "own") == ["detached"])
    procs = marked_processes(server)
    assert len(procs) == 2
    server.proc.terminate()
    assert server.wait_exit(10) == 0  # well before the grace ends
    psutil.wait_procs(procs, timeout=5)
    assert marked_processes(server) == []


def test_release_or_shutdown_while_attached_is_not_a_detach(start_server: StartServer,
                                                            config: Path) -> None:
    server = start_server("--remote_session_config", str(config), "--reconnect_grace", "30")
    tokens = [reserve(server), reserve(server, "own")]

    async def closing(ws: websockets.ClientConnection) -> tuple[int, str]:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        return received_close(closed.value).code, received_close(closed.value).reason

    async def session() -> list[tuple[int, str]]:
        sockets = [await websockets.connect(server.ws_url(token=t)) for t in tokens]
        for ws in sockets:
            await read_line(ws)
        assert server.get_json(f"/v1/release/{tokens[0]}")[0] == 200
        closes = [await closing(sockets[0])]
        await asyncio.to_thread(wait_until, lambda: instances(server) == [])
        procs = marked_processes(server)
        assert len(procs) == 1
        server.proc.terminate()
        closes.append(await closing(sockets[1]))
        psutil.wait_procs(procs, timeout=5)
        return closes

    assert asyncio.run(session()) == [(1001, "reservation released"),
                                      (1001, "server shutting down")]
    assert server.wait_exit(10) == 0
    assert marked_processes(server) == []


def test_the_service_ending_is_not_a_detach(graced: ServerProcess) -> None:
    """The service's TCP connection drops while attached: it ended, as without grace."""
    server = graced
    token = reserve(server)

    async def session() -> int:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await read_line(ws)
            [proc] = marked_processes(server)
            proc.kill()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return received_close(closed.value).code

    assert asyncio.run(session()) in (1000, 1011)
    wait_until(lambda: instances(server) == [])


def test_a_services_own_grace_overrides_the_flag(start_server: StartServer, config: Path,
                                                 graced: ServerProcess) -> None:
    server = start_server("--remote_session_config", str(config))  # flag: 0
    tokens = {name: reserve(server, name) for name in ("kept", "own", "never")}
    for token in tokens.values():
        asyncio.run(visit(server, token))
    wait_until(lambda: instances(server) == [] and instances(server, "never") == [])
    assert states(server, "own") == ["detached"]
    server.close()
    server = graced
    token = reserve(server, "never")
    asyncio.run(visit(server, token))
    wait_until(lambda: instances(server, "never") == [] and marked_processes(server) == [])


@pytest.mark.parametrize("args, message", [
    (["--reconnect_grace", "-1"], "--reconnect_grace: must be a finite number >= 0: -1"),
    (["--reconnect_grace", "soon"], "--reconnect_grace: not a number: 'soon'"),
    (["--remote_session_config", "BAD"], "field 'reconnect_grace': must be >= 0"),
])
def test_bad_grace_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"x": {"script": "x.py", "count": 1, "reconnect_grace": -5}}))
    argv = [str(bad) if a == "BAD" else a for a in args]
    done = subprocess.run([sys.executable, str(LAUNCHER), *argv, "0"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and message in done.stderr, done.stderr
