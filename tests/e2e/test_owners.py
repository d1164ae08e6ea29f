"""Owner-bound tokens and the one-winner claim, end to end with the real command line.

With identities configured (``--users_file`` keys or ``--trusted_proxy`` +
``X-Remote-User``), a token reserved by a known user is shown in full only to that
user and to the security token's holder; other known users can neither open a
websocket with it (403 before the upgrade) nor release it (403). Anonymous holders of
the token may use it (the launcher hands it to a page without a user key).
Simultaneous upgrades with one token: exactly one 101, the others 409.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from support import ROOT, ServerProcess, StartServer, marked_processes, wait_until

USERS = {"alice": "alice-key", "bob": "bob-key"}


ROUNDS = 10
"""Races in the simultaneous-upgrades test; one echo instance each, so as many slots."""


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An echo service (one process per instance) and the users file beside it."""
    services = tmp_path_factory.mktemp("owners") / "services.json"
    services.write_text(json.dumps({"echo": {
        "script": str(ROOT / "examples" / "echo_service.py"), "count": ROUNDS, "options": {}}}))
    (services.with_name("users.json")).write_text(json.dumps(USERS))
    return services


SHARED = {"anonymous": ((), None), "administered": ((), "K"),
          "proxied": (("--trusted_proxy", "127.0.0.1"), None)}
"""The servers the tests share, by name: extra arguments and security token."""
Shared = Callable[[str], ServerProcess]
"""The ``shared`` fixture."""


@pytest.fixture(scope="module")
def shared_servers() -> Iterator[dict[str, ServerProcess]]:
    """Started on first use; each test leaves its server as it found it (checked)."""
    started: dict[str, ServerProcess] = {}
    yield started
    for server in started.values():
        server.close()


def users_server(start_server: StartServer, config: Path, *args: str,
                 token: str | None = None) -> ServerProcess:
    return start_server("--remote_session_config", str(config), "--users_file",
                        str(config.with_name("users.json")), "--start_timeout", "10",
                        *args, token=token)


def all_tokens(server: ServerProcess) -> list[str]:
    """Every reserved token: the anonymous ones and each user's (as that user sees them)."""
    tokens: set[str] = set()
    for key in USERS.values():
        tokens.update(i["token"] for i in instances(server, f"user_key={key}") if i["token"])
    return sorted(tokens)


def release_all(server: ServerProcess) -> None:
    for token in all_tokens(server):
        owner = next(i["owner"] for key in USERS.values()
                     for i in instances(server, f"user_key={key}") if i["token"] == token)
        query = f"?user_key={USERS[owner]}" if owner else ""
        assert server.get_json(f"/v1/release/{token}{query}", auth=False)[0] == 200


@pytest.fixture
def shared(shared_servers: dict[str, ServerProcess], config: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """``shared(name)``: the module's server of that name (SHARED), idle before the test
    (nothing reserved, no service process); released and idle again after it."""
    used: list[ServerProcess] = []

    def get(name: str) -> ServerProcess:
        if name not in shared_servers:
            args, token = SHARED[name]
            shared_servers[name] = users_server(
                lambda *a, **k: ServerProcess.start(
                    *a, log_dir=tmp_path_factory.mktemp("owners-" + name), **k),
                config, *args, token=token)
        server = shared_servers[name]
        assert server.proc.poll() is None, server.log()
        assert instances(server) == [] and marked_processes(server) == []
        used.append(server)
        return server

    yield get
    for server in used:
        release_all(server)
        wait_free(server)


def reserve(server: ServerProcess, query: str = "") -> str:
    status, body = server.get_json(f"/v1/reserve/echo?{query}")
    assert status == 200, body
    token: str = body["token"]
    return token


def instances(server: ServerProcess, query: str = "",
              headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    status, body = server.get_json(f"/v1/status?{query}", headers=headers)
    assert status == 200, body
    found: list[dict[str, Any]] = next(s for s in body if s["name"] == "echo")["instances"]
    return found


def echo_once(url: str, headers: dict[str, str] | None = None) -> bytes:
    """Open a websocket, send one message, return its echo (the session then ends)."""
    async def run() -> bytes:
        async with websockets.connect(url, additional_headers=headers, open_timeout=15) as ws:
            await ws.send(b"hello")
            reply = await asyncio.wait_for(ws.recv(), 15)
            assert isinstance(reply, bytes)
            return reply
    return asyncio.run(run())


def refused(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """An upgrade the server must refuse: its status and JSON body."""
    async def run() -> tuple[int, dict[str, Any]]:
        with pytest.raises(websockets.InvalidStatus) as refusal:
            async with websockets.connect(url, additional_headers=headers, open_timeout=15):
                pass
        response = refusal.value.response
        return response.status_code, json.loads(response.body)
    return asyncio.run(run())


def wait_free(server: ServerProcess) -> None:
    wait_until(lambda: instances(server) == [] and marked_processes(server) == [], timeout=15)


# -- who sees a token ------------------------------------------------------------------


def test_status_shows_a_users_token_only_to_that_user(shared: Shared) -> None:
    server = shared("anonymous")
    mine = reserve(server, "user_key=alice-key")
    anonymous = reserve(server)

    def tokens(query: str = "") -> dict[str | None, str | None]:
        return {i["owner"]: i["token"] for i in instances(server, query)}

    assert tokens("user_key=alice-key") == {"alice": mine, None: anonymous}
    assert tokens("user_key=bob-key") == {"alice": None, None: anonymous}
    assert tokens() == {"alice": None, None: anonymous}
    [hidden] = [i for i in instances(server, "user_key=bob-key") if i["owner"] == "alice"]
    assert set(hidden) >= {"index", "token", "timestamp", "options", "state", "owner"}
    for who in ("user_key=bob-key", ""):
        status, _, page = server.get(f"/v1/status_view?{who}")
        assert status == 200 and mine not in page.decode() and mine[:8] not in page.decode()
        assert anonymous in page.decode()
    _, _, page = server.get("/v1/status_view?user_key=alice-key")
    assert mine in page.decode()


def test_security_token_holder_sees_every_token(shared: Shared) -> None:
    server = shared("administered")
    mine = reserve(server, "user_key=alice-key")
    assert [i["token"] for i in instances(server)] == [mine]  # the administrator
    assert [i["token"] for i in instances(server, "user_key=bob-key")] == [mine]
    status, _, page = server.get("/v1/status_view")
    assert status == 200 and mine in page.decode()


def test_trusted_proxy_user_sees_only_own_token(shared: Shared) -> None:
    server = shared("proxied")
    mine = reserve(server, "user_key=alice-key")
    by_header = server.get_json("/v1/reserve/echo", headers={"X-Remote-User": "alice"})[1]
    assert [i["token"] for i in instances(server, headers={"X-Remote-User": "alice"})] \
        == [mine, by_header["token"]]
    assert [i["token"] for i in instances(server, headers={"X-Remote-User": "bob"})] \
        == [None, None]


# -- who may use or release it -----------------------------------------------------------


def test_another_users_websocket_is_refused_before_the_upgrade(shared: Shared) -> None:
    server = shared("anonymous")
    token = reserve(server, "user_key=alice-key")
    status, body = refused(server.ws_url(token=token, user_key="bob-key"))
    assert status == 403 and "error" in body and token not in body["error"]
    assert [i["state"] for i in instances(server, "user_key=alice-key")] == ["reserved"]
    assert echo_once(server.ws_url(token=token, user_key="alice-key")) == b"hello"
    wait_free(server)


def test_another_users_websocket_is_refused_behind_a_proxy(shared: Shared) -> None:
    server = shared("proxied")
    alice, bob = {"X-Remote-User": "alice"}, {"X-Remote-User": "bob"}
    token = server.get_json("/v1/reserve/echo", headers=alice)[1]["token"]
    assert refused(server.ws_url(token=token), headers=bob)[0] == 403
    assert echo_once(server.ws_url(token=token), headers=alice) == b"hello"
    wait_free(server)


def test_anonymous_holder_of_a_users_token_may_use_it(shared: Shared) -> None:
    """The decision: the token is the capability; a page without a user key works."""
    server = shared("anonymous")
    token = reserve(server, "user_key=alice-key")
    assert echo_once(server.ws_url(token=token)) == b"hello"
    wait_free(server)


def test_launcher_flow_security_token_reservation_page_without_key(shared: Shared) -> None:
    """PyEnSight: reserve with the security token, hand the token to a plain page."""
    server = shared("administered")
    token = reserve(server)
    [instance] = instances(server)
    assert instance["owner"] is None and instance["token"] == token
    assert echo_once(server.ws_url(token=token)) == b"hello"
    wait_free(server)
    token = reserve(server)
    status, body = server.get_json(f"/v1/release/{token}", auth=False)  # the viewer
    assert status == 200 and body["released"] == token


@pytest.mark.parametrize("security_token", [None, "K"])
def test_release_by_another_user_is_refused(shared: Shared,
                                            security_token: str | None) -> None:
    server = shared("administered" if security_token else "anonymous")
    token = reserve(server, "user_key=alice-key")
    status, body = server.get_json(f"/v1/release/{token}?user_key=bob-key", auth=False)
    assert status == 403 and "error" in body
    assert len(instances(server)) == 1
    status, body = server.get_json(f"/v1/release/{token}?user_key=alice-key", auth=False)
    assert status == 200 and body["released"] == token
    assert instances(server) == []


def test_release_by_anonymous_holder_and_administrator(shared: Shared) -> None:
    server = shared("administered")
    token = reserve(server, "user_key=alice-key")
    assert server.get_json(f"/v1/release/{token}", auth=False)[0] == 200  # the viewer
    token = reserve(server, "user_key=alice-key")
    assert server.get_json(f"/v1/release/{token}?user_key=bob-key")[0] == 200  # admin
    assert instances(server) == []


def test_upgrade_refused_by_a_limit_leaves_the_token_reserved(start_server: StartServer,
                                                              config: Path) -> None:
    """A claim whose websocket a limit then refuses is given back (not lost, not stuck)."""
    server = users_server(start_server, config, "--max_tunnels_per_user", "1")
    first, second = reserve(server, "user_key=alice-key"), reserve(server, "user_key=alice-key")

    async def run() -> None:
        async with websockets.connect(server.ws_url(token=first, user_key="alice-key")) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(ws.recv(), 15) == b"x"
            with pytest.raises(websockets.InvalidStatus) as limited:
                async with websockets.connect(server.ws_url(token=second,
                                                            user_key="alice-key")):
                    pass
            assert limited.value.response.status_code == 429
            states = {i["token"]: i["state"] for i in instances(server, "user_key=alice-key")}
            assert states == {first: "active", second: "reserved"}

    asyncio.run(run())
    wait_until(lambda: [i["token"] for i in instances(server, "user_key=alice-key")]
               == [second])  # the first session's slot is free again
    assert echo_once(server.ws_url(token=second, user_key="alice-key")) == b"hello"
    wait_free(server)


# -- one token, simultaneous upgrades -------------------------------------------------------


def _upgrade_request(port: int, token: str) -> tuple[bytes, bytes]:
    """A raw upgrade request, split before its final blank line."""
    head = (f"GET /websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
    return head.encode(), b"\r\n"


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and body of the server's answer to an upgrade."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status == 101:
        return status, b""
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk
        body += chunk
    return status, body


def test_simultaneous_upgrades_with_one_token_one_wins(shared: Shared) -> None:
    """Three upgrades whose requests complete in the same instant: one 101, two 409.

    Each request is sent but for its last blank line; once the server has read the
    heads, the three final lines go out back to back, so the server decides on all
    three in one turn of its event loop: the race of issue 12, made likely.
    """
    server = shared("anonymous")
    for _ in range(ROUNDS):
        token = reserve(server)
        head, end = _upgrade_request(server.ws_port, token)
        sockets = [socket.create_connection(("127.0.0.1", server.ws_port), timeout=15)
                   for _ in range(3)]
        try:
            for sock in sockets:
                sock.sendall(head)
            time.sleep(0.02)  # let the server read the heads
            for sock in sockets:
                sock.sendall(end)
            answers = [_answer(sock) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
        statuses = sorted(status for status, _ in answers)
        assert statuses == [101, 409, 409], answers
        assert all(json.loads(body) == {"error": "token is already in use"}
                   for status, body in answers if status == 409)
    wait_free(server)  # every winner's session ended with its websocket
