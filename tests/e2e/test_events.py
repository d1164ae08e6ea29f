"""``/v1/status/{token}`` and ``/v1/events/{token}``: a page sees its session's life.

A real server (and, for the cluster, two sharing a real redis-server); the stream is
read as a browser's EventSource reads it (tests/e2e/sse.py). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import websockets

from e2e.sse import EventReader
from support import ServerProcess, StartServer, recv_bytes, wait_until

if TYPE_CHECKING:
    from cluster_support import HAProxy, RedisServer

pytest_plugins = ["cluster_support"]

# An echo service that takes a moment to listen (so "starting" is seen)
ECHO = r"""
import socket, sys, time
time.sleep(0.5)
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
"""


def config(folder: Path, grace: float = 1.0) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "echo.py").write_text(ECHO)
    path = folder / "services.json"
    path.write_text(json.dumps({"echo": {
        "command": [sys.executable, "echo.py", "{port}"], "count": 2,
        "reconnect_grace": grace}}))
    return path


def reserve(server: ServerProcess) -> str:
    status, body = server.get_json("/v1/reserve/echo")
    assert status == 200, body
    return str(body["token"])


def events_url(server: ServerProcess, token: str) -> str:
    return f"http://127.0.0.1:{server.http_port}/v1/events/{token}"  # the token: credential


async def echo_once(server: ServerProcess, token: str) -> None:
    async with websockets.connect(server.ws_url(token=token), open_timeout=30) as ws:
        await ws.send(b"x")
        assert await asyncio.wait_for(recv_bytes(ws), 30) == b"x"


def test_a_session_s_life_is_its_events_in_order_then_the_stream_ends(
        start_server: StartServer, tmp_path: Path) -> None:
    """reserved -> starting -> active -> detached -> ended: exactly these events, each
    with the next id; the stream closes after ``ended``, which says why."""
    server = start_server("--remote_session_config", str(config(tmp_path)))
    token = reserve(server)
    reader = EventReader(events_url(server, token))
    assert reader.headers["Content-Type"] == "text/event-stream"
    assert (reader.headers["X-Accel-Buffering"], reader.headers["Cache-Control"]) == (
        "no", "no-cache")
    first = reader.next()
    assert first.data["state"] == "reserved" and first.data["ends"] == "timeout"
    asyncio.run(echo_once(server, token))  # closing it: detached for the 1 s grace
    events = [first]
    while events[-1].data["event"] != "ended":
        events.append(reader.next())
    assert [e.data["state"] for e in events] == [
        "reserved", "starting", "active", "detached", "ended"]
    assert [e.data["event"] for e in events] == ["state"] * 4 + ["ended"]
    ids = [int(e.id or 0) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert events[3].data["ends"] == "reconnect grace" and events[3].data["seconds_left"] <= 1
    assert events[-1].data["end_reason"] == "reconnect grace over"
    assert reader.ended.wait(5)  # the stream ends after its final event
    status, body = server.get_json(f"/v1/status/{token}", auth=False)  # for 5 minutes
    assert (status, body["state"], body["service"]) == (200, "ended", "echo")


def test_unknown_tokens_other_users_and_the_stream_limits(
        start_server: StartServer, tmp_path: Path) -> None:
    """404 reveals nothing; owner binding as for a release; a resume starts with the
    state now; the 11th stream of one client is 429; the metrics count streams."""
    server = start_server("--remote_session_config", str(config(tmp_path)),
                          "--trusted_proxy", "127.0.0.1")
    for path in ("/v1/status/nope", "/v1/events/nope"):
        assert server.get_json(path) == (404, {"error": "unknown or expired token"})
        assert server.get_json(path, auth=False)[0] == 401  # no credential at all
    status, body = server.get_json("/v1/reserve/echo", headers={"X-Remote-User": "ann"})
    token = body["token"]
    assert server.get_json(f"/v1/status/{token}", auth=False,
                           headers={"X-Remote-User": "bob"})[0] == 403
    assert server.get_json(f"/v1/status/{token}", auth=False,
                           headers={"X-Remote-User": "ann"})[0] == 200
    resumed = EventReader(events_url(server, token), {"Last-Event-ID": "0"})
    assert resumed.next().data["state"] == "reserved"  # the present first, whatever id
    readers = [resumed] + [EventReader(events_url(server, token)) for _ in range(9)]
    refused = EventReader(events_url(server, token))
    assert refused.status == 429
    status, body = server.get_json(f"/v1/events/{token}", auth=False)
    assert (status, body) == (429, {"error": "too many event streams from 127.0.0.1 (10)"})
    metrics = server.get("/v1/metrics")[2].decode()
    assert "websocketserver_event_streams_open 10.0" in metrics
    assert "websocketserver_events_total" in metrics
    for reader in readers:
        reader.close()
    wait_until(lambda: "websocketserver_event_streams_open 0.0" in server.get(
        "/v1/metrics")[2].decode(), 10)


def test_a_warning_comes_before_the_timeout_ends_a_reservation(
        start_server: StartServer, tmp_path: Path) -> None:
    """5 and 1 minute before a session ends on its own (here --timeout 61: the 1-minute
    warning, a second after the stream opened)."""
    server = start_server("--remote_session_config", str(config(tmp_path)), "--timeout", "61")
    token = reserve(server)
    reader = EventReader(events_url(server, token))
    assert reader.next().data["event"] == "state"
    warning = reader.next(10)
    assert (warning.data["event"], warning.data["ends"]) == ("warning", "timeout")
    assert 55 < warning.data["seconds_left"] <= 60
    reader.close()


def test_in_a_cluster_any_instance_streams_and_a_page_resumes_elsewhere(
        start_server: StartServer, redis_server: RedisServer, tmp_path: Path) -> None:
    """The session runs on a; b streams its whole life, exactly as a would (Redis's
    changes channel). c streams it too and dies mid-stream: that page reconnects to a
    with its Last-Event-ID and goes on."""
    services = config(tmp_path)
    common = ("--redis", redis_server.url, "--cluster_secret", "s3cret",
              "--relay_processes", "0", "--remote_session_config", str(services))
    a, b, c = (start_server(*common, "--node_name", name) for name in "abc")
    token = reserve(a)
    on_b, on_c = EventReader(events_url(b, token)), EventReader(events_url(c, token))
    first = on_b.next()
    assert (first.data["state"], first.data["node"]) == ("reserved", "a")
    assert on_c.next().data["state"] == "reserved"

    async def attach() -> websockets.ClientConnection:
        ws = await websockets.connect(a.ws_url(token=token), open_timeout=30)
        await ws.send(b"x")
        assert await asyncio.wait_for(recv_bytes(ws), 30) == b"x"
        return ws

    loop = asyncio.new_event_loop()
    try:
        ws = loop.run_until_complete(attach())
        assert [on_c.next().data["state"] for _ in range(2)] == ["starting", "active"]
        os.kill(c.serving_pid(), signal.SIGKILL)
        assert on_c.ended.wait(10)  # the page's EventSource reconnects: to a now
        on_a = EventReader(events_url(a, token), {"Last-Event-ID": "3"})
        resumed = on_a.next()
        assert (resumed.data["state"], resumed.data["node"]) == ("active", "a")
        loop.run_until_complete(ws.close())
        assert on_a.next().data["state"] == "detached"
        started = time.monotonic()
        assert on_a.next().data["event"] == "ended"
        assert time.monotonic() - started < 5
    finally:
        loop.close()
    events = [first]
    while events[-1].data["event"] != "ended":
        events.append(on_b.next())
    assert [e.data["state"] for e in events] == [
        "reserved", "starting", "active", "detached", "ended"]
    assert [int(e.id or 0) for e in events] == sorted({int(e.id or 0) for e in events})


def test_events_pass_through_haproxy_at_once(start_server: StartServer, tmp_path: Path,
                                             start_haproxy: Callable[..., HAProxy]) -> None:
    """deploy/haproxy.cfg passes each event on when it happens (nginx: test_nginx.py)."""
    server = start_server("--remote_session_config", str(config(tmp_path)))
    assert server.http_port is not None
    proxy = start_haproxy([(server.ws_port, server.http_port)])
    token = reserve(server)
    reader = EventReader(f"http://127.0.0.1:{proxy.http_port}/v1/events/{token}")
    try:
        assert reader.next(5).data["state"] == "reserved"
        assert server.get_json(f"/v1/release/{token}")[0] == 200
        assert reader.next(2).data["event"] == "ended"
        assert reader.ended.wait(5)
    finally:
        reader.close()
