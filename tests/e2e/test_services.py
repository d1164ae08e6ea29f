"""Services end to end: reserve, launch on connect, tunnel, stop, and every failure."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets

from support import (
    ServerProcess,
    StartServer,
    marked_processes,
    received_close,
    recv_bytes,
    wait_until,
)

CONFIG = Path(__file__).parent / "scripts" / "services.json"


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests of ``server``: each leaves it as it found it (checked)."""
    folder = tmp_path_factory.mktemp("services")
    groups = folder / "groups.json"
    groups.write_text(json.dumps({"wizards": ["merlin"]}))
    users = folder / "users.json"
    users.write_text(json.dumps({"merlin": "merlin-key", "arthur": "arthur-key"}))
    server = ServerProcess.start("--remote_session_config", str(CONFIG), "--start_timeout",
                                 "1.5", "--groups_file", str(groups), "--users_file",
                                 str(users), "--verbose", "1", log_dir=folder)
    yield server
    server.close()


def reservations(server: ServerProcess) -> list[str]:
    """Every reserved instance's token, as the administrator and the wizard see them."""
    tokens = []
    for query in ("", "user_key=merlin-key"):  # only a wizard sees the group's service
        status, body = server.get_json(f"/v1/status?{query}")
        assert status == 200, body
        tokens += [i["token"] for s in body for i in s["instances"]]
    return sorted(set(tokens))


def is_idle(server: ServerProcess) -> bool:
    return reservations(server) == [] and marked_processes(server) == []


@pytest.fixture
def server(shared_server: ServerProcess) -> Iterator[ServerProcess]:
    """The module's server, idle (no reservation, no service process) before the test;
    what the test left reserved is released after it, and the server idle again."""
    assert shared_server.proc.poll() is None, shared_server.log()
    assert is_idle(shared_server)
    yield shared_server
    for token in reservations(shared_server):
        assert shared_server.get_json(f"/v1/release/{token}")[0] in (200, 404)
    wait_until(lambda: is_idle(shared_server), timeout=15)


def reserve(server: ServerProcess, name: str, query: str = "") -> str:
    status, body = server.get_json(f"/v1/reserve/{name}?{query}")
    assert status == 200, body
    token: str = body["token"]
    return token


def instances(server: ServerProcess, name: str, query: str = "") -> list[dict[str, Any]]:
    status, body = server.get_json(f"/v1/status?{query}")
    assert status == 200
    found: list[dict[str, Any]] = next(s for s in body if s["name"] == name)["instances"]
    return found


async def close_info(url: str) -> tuple[int, str]:
    """Connect, and wait for the server to close: (code, reason)."""
    async with websockets.connect(url, open_timeout=30) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        return received_close(closed.value).code, received_close(closed.value).reason


def test_reserve_connect_echo_close_frees_slot(server: ServerProcess) -> None:
    token = reserve(server, "echo", "target_pathname=/data/a.txt")
    [instance] = instances(server, "echo")
    assert instance["token"] == token and instance["index"] == 0
    assert instance["state"] == "reserved"
    assert instance["options"] == {"target_pathname": "/data/a.txt"}

    async def session() -> None:
        async with websockets.connect(server.ws_url(token=token), max_size=None) as ws:
            data = os.urandom(100_000)
            await ws.send(data)
            received = bytearray()
            while len(received) < len(data):
                received += await recv_bytes(ws)
            assert received == data
            assert [i["state"] for i in instances(server, "echo")] == ["active"]
            assert len(marked_processes(server)) == 1

    asyncio.run(session())
    wait_until(lambda: instances(server, "echo") == [])
    wait_until(lambda: marked_processes(server) == [])
    assert instances(server, "echo") == []
    # the index is reused
    reserve(server, "echo")
    assert [i["index"] for i in instances(server, "echo")] == [0]


def test_status_lists_services_with_common_options(server: ServerProcess) -> None:
    status, body = server.get_json("/v1/status")
    names = [s["name"] for s in body]
    assert "secret" not in names  # group-restricted, caller anonymous
    echo = next(s for s in body if s["name"] == "echo")
    assert echo["common_options"] == {"file_ext": [".txt"]}
    assert echo["file_ext"] == [".txt"]
    assert set(echo) >= {"name", "instances", "common_options"}


def test_count_exhaustion_is_503(server: ServerProcess) -> None:
    reserve(server, "echo")
    reserve(server, "echo")
    status, body = server.get_json("/v1/reserve/echo")
    assert status == 503 and "error" in body


def test_unknown_service_and_token(server: ServerProcess) -> None:
    assert server.get_json("/v1/reserve/nope")[0] == 404
    assert server.get_json("/v1/release/not-a-token")[0] == 404


def test_groups(server: ServerProcess) -> None:
    assert server.get_json("/v1/reserve/secret")[0] == 403
    assert server.get_json("/v1/reserve/secret?user_key=arthur-key")[0] == 403
    assert server.get_json("/v1/reserve/secret?user_key=wrong")[0] == 403
    token = server.get_json("/v1/reserve/secret?user_key=merlin-key")[1]["token"]
    [instance] = instances(server, "secret", "user_key=merlin-key")
    assert instance["owner"] == "merlin" and instance["token"] == token
    assert instance["options"] == {}  # user_key and security_token are not options


def test_release_by_reservation_token_without_security_token(server: ServerProcess) -> None:
    token = reserve(server, "echo")
    assert server.get_json("/v1/release/other", auth=False)[0] == 401
    status, body = server.get_json(f"/v1/release/{token}", auth=False)
    assert status == 200 and body["released"] == token
    assert instances(server, "echo") == []


def test_release_stops_an_active_session(server: ServerProcess) -> None:
    token = reserve(server, "echo")

    async def session() -> tuple[int, str]:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await ws.send(b"ping")
            assert await ws.recv() == b"ping"
            assert server.get_json(f"/v1/release/{token}")[0] == 200
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return received_close(closed.value).code, received_close(closed.value).reason

    assert asyncio.run(session()) == (1001, "reservation released")
    wait_until(lambda: instances(server, "echo") == [] and marked_processes(server) == [])


def test_second_websocket_on_active_token_is_refused(server: ServerProcess) -> None:
    token = reserve(server, "echo")

    async def session() -> int:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await ws.send(b"x")
            await ws.recv()
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with websockets.connect(server.ws_url(token=token)):
                    pass
            return refused.value.response.status_code

    assert asyncio.run(session()) == 409


def test_unused_reservation_is_reclaimed(start_server: StartServer) -> None:
    server = start_server("--remote_session_config", str(CONFIG), "--timeout", "0.5")
    reserve(server, "echo")
    assert len(instances(server, "echo")) == 1
    wait_until(lambda: instances(server, "echo") == [], timeout=10)


@pytest.mark.parametrize("name, reason", [
    ("raising", "raising failed to start: this service is broken on purpose"),
    ("hanging", "hanging did not start within 1.5 s"),
    ("no_listener", "cannot connect to backend"),
])
def test_failing_service_closes_with_reason_and_frees_slot(server: ServerProcess, name: str,
                                                           reason: str) -> None:
    token = reserve(server, name)
    code, got = asyncio.run(close_info(server.ws_url(token=token)))
    assert code == 1011 and reason in got
    wait_until(lambda: instances(server, name) == [])
    reserve(server, name)  # the one slot is free again
    assert server.get_json("/v1/status")[0] == 200


def test_service_process_crash_ends_session(server: ServerProcess) -> None:
    token = reserve(server, "echo")

    async def session() -> int:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await ws.send(b"x")
            await ws.recv()
            [proc] = marked_processes(server)
            proc.kill()
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return received_close(closed.value).code

    assert asyncio.run(session()) in (1000, 1011)
    wait_until(lambda: instances(server, "echo") == [])


def test_daemonizing_service_leaves_nothing(server: ServerProcess) -> None:
    token = reserve(server, "daemon")

    async def session() -> None:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await ws.send(b"daemon")
            assert await asyncio.wait_for(ws.recv(), 10) == b"daemon"
            [daemon] = marked_processes(server)
            # re-parented to the server's supervisor (a child subreaper), not to init
            assert daemon.ppid() == server.pid

    asyncio.run(session())
    wait_until(lambda: marked_processes(server) == [] and instances(server, "daemon") == [])


def test_sigterm_with_three_active_sessions_leaves_nothing(start_server: StartServer) -> None:
    server = start_server("--remote_session_config", str(CONFIG))
    tokens = [reserve(server, "echo"), reserve(server, "echo"), reserve(server, "daemon")]

    async def sessions() -> list[int]:
        sockets = [await websockets.connect(server.ws_url(token=t)) for t in tokens]
        for ws in sockets:
            await ws.send(b"x")
            await asyncio.wait_for(ws.recv(), 10)
        assert len(marked_processes(server)) == 3
        procs = server.descendants()
        server.proc.terminate()
        codes = []
        for ws in sockets:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            codes.append(received_close(closed.value).code)
        psutil.wait_procs(procs, timeout=10)
        return codes

    assert asyncio.run(sessions()) == [1001, 1001, 1001]
    assert server.wait_exit(10) == 0
    assert marked_processes(server) == []
