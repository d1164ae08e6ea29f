"""The cluster (docs/cluster.md), end to end: real instances sharing a real redis-server,
behind a real HAProxy, on loopback. One test per promise of docs/cluster.md (capacity,
forwarding, failures, Redis outages and restarts, clocks, node names and secrets)."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import websockets
import websockets.sync.client
from cluster_support import HAProxy, RedisServer, redis_server, start_haproxy

from support import EXAMPLES, ServerProcess, received_close, recv_bytes, wait_until

__all__ = ["redis_server", "start_haproxy"]  # fixtures used below

SECRET = "cluster-test-secret"
TTL = 1.0  # --heartbeat_ttl: a killed instance is cleared within 2 x TTL + 1 s


def services_file(directory: Path, counts: dict[str, int], scope: dict[str, str]) -> Path:
    config = {name: {"script": str(EXAMPLES / "echo_service.py"), "count": count,
                     **({"scope": scope[name]} if name in scope else {})}
              for name, count in counts.items()}
    path = directory / f"services-{os.urandom(4).hex()}.json"
    path.write_text(json.dumps(config))
    return path


class Cluster:
    """Instances of the real command line sharing one redis-server."""

    def __init__(self, start_server: Callable[..., ServerProcess], redis: RedisServer,
                 tmp_path: Path) -> None:
        self._start = start_server
        self.redis = redis
        self.tmp_path = tmp_path
        self.nodes: dict[str, ServerProcess] = {}

    def start(self, name: str, counts: dict[str, int], scope: dict[str, str] | None = None,
              *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        config = services_file(self.tmp_path, counts, scope or {})
        node = self._start("--redis", self.redis.url, "--cluster_secret", SECRET,
                           "--node_name", name, "--heartbeat_ttl", str(TTL),
                           "--remote_session_config", str(config), "--relay_processes", "0",
                           *extra, env=env)
        self.nodes[name] = node
        return node


@pytest.fixture
def cluster(start_server: Callable[..., ServerProcess], redis_server: RedisServer,
            tmp_path: Path) -> Iterator[Cluster]:
    yield Cluster(start_server, redis_server, tmp_path)


def get(url: str, timeout: float = 10) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def api(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}{'&' if '?' in path else '?'}security_token=K"


def instances(node: ServerProcess, service: str) -> list[dict[str, Any]]:
    status, document = node.get_json("/v1/status")
    assert status == 200, document
    found: list[dict[str, Any]] = next(s for s in document if s["name"] == service)["instances"]
    return found


async def echo_through(url: str, size: int = 1 << 20) -> bytes:
    payload = os.urandom(size)
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(payload)
        received = b""
        while len(received) < size:
            received += await asyncio.wait_for(recv_bytes(ws), 10)
    assert received == payload
    return received


async def reserve_all(session: aiohttp.ClientSession, url: str, count: int
                      ) -> list[tuple[int, Any]]:
    """``count`` reserves at once: each answer's status and JSON body."""
    async def one() -> tuple[int, Any]:
        async with session.get(url) as response:
            return response.status, await response.json(content_type=None)
    return await asyncio.gather(*(one() for _ in range(count)))


def test_capacity_is_exact_through_haproxy(cluster: Cluster,
                                           start_haproxy: Callable[..., HAProxy]) -> None:
    """Counts 7/7/6: 500 concurrent reserves through HAProxy give exactly 20 tokens and
    480 x 503, indices {0..6}, {0..6}, {0..5}, 20 times over; a cluster-scoped count of
    20 gives 20."""
    nodes = [cluster.start(f"n{i}", {"echo": count, "shared": 20}, {"shared": "cluster"})
             for i, count in enumerate((7, 7, 6))]
    proxy = start_haproxy([(node.ws_port, node.http_port) for node in nodes])
    wait_until(lambda: all(get(f"http://127.0.0.1:{n.http_port}/v1/health")[0] == 200
                           for n in nodes))

    async def rounds() -> None:
        connector = aiohttp.TCPConnector(limit=0)  # all 500 at once
        async with aiohttp.ClientSession(connector=connector) as session:
            for service in ["echo"] * 20 + ["shared"]:
                url = api(proxy.http_port, f"/v1/reserve/{service}")
                answers = await reserve_all(session, url, 500)
                tokens = [body["token"] for status, body in answers if status == 200]
                assert len(tokens) == 20
                assert sorted(status for status, _ in answers if status != 200) == \
                       [503] * 480
                entries = instances(nodes[0], service)
                assert len(entries) == 20
                if service == "echo":
                    by_node: dict[str, list[int]] = {}
                    for entry in entries:
                        by_node.setdefault(entry["node"], []).append(entry["index"])
                    assert sorted(sorted(v) for v in by_node.values()) == [
                        list(range(6)), list(range(7)), list(range(7))]
                released = await asyncio.gather(*(
                    session.get(api(proxy.http_port, f"/v1/release/{token}"))
                    for token in tokens))
                assert [response.status for response in released] == [200] * 20
                for response in released:
                    response.release()

    asyncio.run(rounds())
    status, document = nodes[1].get_json("/v1/status")
    assert {s["name"]: s["count"] for s in document} == {"echo": 20, "shared": 20}


def test_websocket_on_another_instance_take_over_forward_and_release(cluster: Cluster) -> None:
    """Reserved through A, opened through B: B takes it over; with B full, B forwards
    to the owner; both byte-exact. Released through C: closed with 1001 within 1 s."""
    a, b, c = (cluster.start(name, {"echo": 1}) for name in ("a", "b", "c"))
    first = a.get_json("/v1/reserve/echo")[1]["token"]

    async def scenario() -> None:
        async with websockets.connect(b.ws_url(token=first), max_size=None) as taken:
            await taken.send(b"x")
            assert await asyncio.wait_for(taken.recv(), 10) == b"x"
            assert instances(c, "echo")[0]["node"] == "b"  # taken over: b has a slot
            second = a.get_json("/v1/reserve/echo")[1]["token"]  # b is full now
            owner = next(e["node"] for e in instances(c, "echo") if e["state"] == "reserved")
            assert owner != "b"
            async with websockets.connect(b.ws_url(token=second), max_size=None) as fwd:
                payload = os.urandom(1 << 20)  # forwarded to its owner: b is full
                await fwd.send(payload)
                received = b""
                while len(received) < len(payload):
                    received += await asyncio.wait_for(recv_bytes(fwd), 10)
                assert received == payload
                assert {e["token"]: (e["node"], e["state"]) for e in instances(c, "echo")
                        }[second] == (owner, "active")
            started = time.monotonic()
            assert c.get_json(f"/v1/release/{first}")[0] == 200
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(taken.recv(), 5)
            assert time.monotonic() - started < 1.0
            assert closed.value.rcvd is not None and received_close(closed.value).code == 1001

    asyncio.run(scenario())


def test_forwarded_websockets_give_back_their_slot_when_closed_cleanly(
        cluster: Cluster) -> None:
    """A detached session of a, re-attached 12 times through b (which must forward:
    it runs no echo), closing by a close frame or by a plain FIN in turn: every one is
    answered 101 under b's --max_tunnels_per_client 3, and b's slots and sockets come
    back (they leaked after a clean close: 2 x 101, then 429 for ever)."""
    a = cluster.start("a", {"echo": 1}, None, "--reconnect_grace", "30")
    b = cluster.start("b", {"other": 1}, None, "--max_tunnels_per_client", "3")
    token = a.get_json("/v1/reserve/echo")[1]["token"]
    request = (f"GET /websockify?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{b.ws_port}\r\n"
               "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()

    async def by_close_frame() -> None:
        async with websockets.connect(b.ws_url(token=token)) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(ws.recv(), 10) == b"x"

    async def by_fin() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.ws_port)
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        writer.write_eof()  # a plain FIN, no close frame
        await asyncio.wait_for(reader.read(), 10)  # the owner ends its side too
        writer.close()

    def detached() -> bool:
        return [e["state"] for e in instances(a, "echo")] == ["detached"]

    for attempt in range(12):
        asyncio.run(by_fin() if attempt % 2 else by_close_frame())
        wait_until(detached)
    b_process = psutil.Process(b.serving_pid())
    wait_until(lambda: len(b_process.net_connections("tcp")) < 10)


def test_one_token_on_100_websockets_across_instances_opens_one(cluster: Cluster) -> None:
    """The same token on 100 websockets at once, spread over three instances (the
    failure table's row): exactly one 101, 99 x 409."""
    nodes = [cluster.start(name, {"echo": 2}) for name in ("a", "b", "c")]
    token = nodes[0].get_json("/v1/reserve/echo")[1]["token"]

    async def upgrade(url: str, opened: asyncio.Event) -> int:
        try:
            async with websockets.connect(url):
                await opened.wait()  # held open until all have answered
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    async def scenario() -> list[int]:
        opened = asyncio.Event()
        attempts = [asyncio.create_task(upgrade(nodes[i % 3].ws_url(token=token), opened))
                    for i in range(100)]
        while sum(not a.done() for a in attempts) > 1:
            await asyncio.sleep(0.05)
        opened.set()
        return await asyncio.gather(*attempts)

    assert Counter(asyncio.run(scenario())) == {101: 1, 409: 99}


def test_a_forged_or_replayed_forward_is_refused(cluster: Cluster) -> None:
    a = cluster.start("a", {"echo": 1})
    token = a.get_json("/v1/reserve/echo")[1]["token"]

    async def upgrade(headers: dict[str, str]) -> int:
        try:
            async with websockets.connect(a.ws_url(token=token), additional_headers=headers):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    forged = {"X-Websocketserver-Forward": "nonce " + "0" * 64,
              "X-Websocketserver-Client": "10.0.0.1"}
    assert asyncio.run(upgrade(forged)) == 403
    from websocketserver.cluster.forward import sign  # a valid signature: too old, then sent twice

    def signed(at: int) -> dict[str, str]:
        signature = sign(SECRET.encode(), token, "n1", at, "10.0.0.1", None)
        return {"X-Websocketserver-Forward": f"n1 {at} {signature}",
                "X-Websocketserver-Client": "10.0.0.1"}

    now = round(time.time() * 1000)  # Redis's clock: the same machine's
    assert asyncio.run(upgrade(signed(now - 61_000))) == 403
    assert asyncio.run(upgrade(signed(now))) == 101
    assert asyncio.run(upgrade(signed(now))) == 403


def test_an_instance_killed_frees_its_slots(cluster: Cluster) -> None:
    """SIGKILL of an instance with a session and a reserved token: its session ends,
    its slots are free within 2 x TTL + 1 s, its reserved token works through another
    instance, and the other instances' sessions go on."""
    a, b = cluster.start("a", {"echo": 2}), cluster.start("b", {"echo": 2})
    mine = a.get_json("/v1/reserve/echo")[1]["token"]
    kept = a.get_json("/v1/reserve/echo")[1]["token"]  # never connected

    async def scenario() -> None:
        other = b.get_json("/v1/reserve/echo")[1]["token"]
        async with websockets.connect(a.ws_url(token=mine)) as doomed, \
                websockets.connect(b.ws_url(token=other)) as survivor:
            await doomed.send(b"1")
            await survivor.send(b"2")
            assert await doomed.recv() == b"1" and await survivor.recv() == b"2"
            os.kill(a.serving_pid(), signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(doomed.recv(), 5)
            wait_until(lambda: all(e["node"] != "a" or e["token"] == kept
                                   for e in instances(b, "echo")), timeout=2 * TTL + 1)
            assert time.monotonic() - killed <= 2 * TTL + 1
            await echo_through(b.ws_url(token=kept), 1000)  # moved to a live instance
            await survivor.send(b"still")
            assert await survivor.recv() == b"still"

    asyncio.run(scenario())


def test_redis_restart_keeps_everything_and_outage_fails_closed(cluster: Cluster) -> None:
    a = cluster.start("a", {"echo": 2})
    token = a.get_json("/v1/reserve/echo")[1]["token"]

    async def scenario() -> None:
        async with websockets.connect(a.ws_url(token=token)) as ws:
            await ws.send(b"before")
            assert await ws.recv() == b"before"
            cluster.redis.kill()
            started = time.monotonic()
            status, body = await asyncio.to_thread(a.get_json, "/v1/reserve/echo")
            assert status == 503 and "unavailable" in body["error"]
            assert time.monotonic() - started < 1.5
            assert (await asyncio.to_thread(a.get_json, "/v1/health"))[1]["store"] == \
                "unavailable"
            await asyncio.sleep(6)
            await ws.send(b"during")  # the running session never noticed
            assert await ws.recv() == b"during"
            cluster.redis.start()
            await asyncio.to_thread(wait_until, lambda: a.get_json("/v1/health")[1][
                "store"] == "ok")
            assert [e["token"] for e in instances(a, "echo")] == [token]
            await ws.send(b"after")
            assert await ws.recv() == b"after"

    asyncio.run(scenario())


def echo_servers(node: ServerProcess) -> list[Any]:
    """The echo service's processes (examples/echo_server.py) below ``node``."""
    return [p for p in node.descendants()
            if any(arg.endswith("echo_server.py") for arg in p.cmdline())]


def test_a_session_ending_while_redis_is_down_stops_now_and_frees_its_slot_later(
        cluster: Cluster) -> None:
    """The service stops when its websocket closes although Redis is down; the slot
    is freed in Redis once it is back (not held by a stopped instance for ever)."""
    a = cluster.start("a", {"echo": 1})
    token = a.get_json("/v1/reserve/echo")[1]["token"]

    async def session() -> None:
        async with websockets.connect(a.ws_url(token=token)) as ws:
            await ws.send(b"up")
            assert await ws.recv() == b"up"
            assert len(echo_servers(a)) == 1
            cluster.redis.kill()

    asyncio.run(session())
    wait_until(lambda: echo_servers(a) == [], timeout=5)
    cluster.redis.start()
    wait_until(lambda: a.get_json("/v1/health")[1]["store"] == "ok")
    wait_until(lambda: instances(a, "echo") == [], timeout=5)
    assert a.get_json("/v1/reserve/echo")[0] == 200


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime not installed")
def test_timeout_reclaims_on_redis_time_whatever_an_instance_clock_says(
        cluster: Cluster) -> None:
    a = cluster.start("a", {"echo": 1}, None, "--timeout", "2")
    skewed = cluster.start("b", {"echo": 1}, None, "--timeout", "2",
                           env={"LD_PRELOAD": _faketime_library(), "FAKETIME": "+1h",
                                "FAKETIME_DONT_RESET": "1"})
    # asctime's hour of the first log line (written just after the ports open)
    hours = [int(wait_until(node.log).split()[1][:2]) for node in (a, skewed)]
    assert (hours[1] - hours[0]) % 24 == 1, "the skewed instance's clock is not skewed"
    for reserving in (a, skewed):
        token = reserving.get_json("/v1/reserve/echo")[1]["token"]
        made = time.monotonic()
        wait_until(lambda t=token: all(e["token"] != t for e in instances(a, "echo")),
                   timeout=4, interval=0.1)
        assert 2.0 <= time.monotonic() - made <= 3.5


def _faketime_library() -> str:
    for candidate in Path("/usr/lib").glob("**/faketime/libfaketime.so.1"):
        return str(candidate)
    pytest.skip("libfaketime not found")


def test_a_duplicate_node_name_is_refused(cluster: Cluster) -> None:
    cluster.start("same", {"echo": 1})
    with pytest.raises(RuntimeError, match="exited with 1"):
        cluster.start("same", {"echo": 1})
    duplicate = list(cluster.tmp_path.glob("server-*.log"))
    assert any("--node_name: a live instance named same" in log.read_text()
               for log in duplicate)


def test_an_instance_with_a_wrong_cluster_secret_is_refused(
        cluster: Cluster, start_server: Callable[..., ServerProcess]) -> None:
    """It registered, said "store: ok" and was given reservations it could not serve."""
    cluster.start("a", {"echo": 1})
    config = services_file(cluster.tmp_path, {"echo": 1}, {})
    with pytest.raises(RuntimeError, match="exited with 1"):
        start_server("--redis", cluster.redis.url, "--cluster_secret", "another-secret",
                     "--node_name", "b", "--remote_session_config", str(config))
    assert any("error: --cluster_secret: live instance a of this cluster has another "
               "cluster secret" in log.read_text()
               for log in cluster.tmp_path.glob("server-*.log"))


LOCKING_SERVICE = r'''
import fcntl, os, signal, socket, sys, time
index, port, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lock = open(os.path.join(folder, f"lock-{index}"), "w")
try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:  # another live session holds this index
    with open(os.path.join(folder, "held-twice"), "a") as marker:
        marker.write(index + "\n")
    sys.exit(1)
signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(0)))  # a slow stop
listener = socket.create_server(("127.0.0.1", port))
while True:
    connection, _ = listener.accept()
    while data := connection.recv(65536):
        connection.sendall(data)
    connection.close()
'''


def lock_free(path: Path) -> bool:
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True


def test_a_paused_instance_never_holds_an_index_twice(
        cluster: Cluster, start_server: Callable[..., ServerProcess]) -> None:
    """An instance paused (SIGSTOP) past 2 x TTL is cleared; its supervisor ends the
    session's service before that (1.5 x TTL without a sign of life); on resume the
    instance ends its session and registers again only once that session has ended: a
    reservation landing on its index 0 at once finds the index's lock free (before,
    it re-registered at once, and the new session found the old one's lock held)."""
    folder = cluster.tmp_path
    (folder / "locking.py").write_text(LOCKING_SERVICE)
    config = folder / "locking.json"
    config.write_text(json.dumps({"locked": {"count": 1, "command": [
        sys.executable, str(folder / "locking.py"), "{index}", "{port}", str(folder)]}}))
    a = start_server("--redis", cluster.redis.url, "--cluster_secret", SECRET,
                     "--node_name", "a", "--heartbeat_ttl", str(TTL),
                     "--remote_session_config", str(config), "--relay_processes", "0")
    cluster.start("b", {"echo": 1})
    first = a.get_json("/v1/reserve/locked")[1]["token"]

    async def echo(token: str) -> None:
        async with websockets.connect(a.ws_url(token=token)) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(ws.recv(), 10) == b"x"
            if token == first:  # held open across the pause
                os.kill(a.serving_pid(), signal.SIGSTOP)
                paused = time.monotonic()
                # its supervisor ends the session's service after 1.5 x TTL
                wait_until(lambda: lock_free(folder / "lock-0"), 2 * TTL + 0.5)
                await asyncio.sleep(paused + 2 * TTL + 1 - time.monotonic())
                os.kill(a.serving_pid(), signal.SIGCONT)
                with pytest.raises(websockets.ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)

    asyncio.run(echo(first))
    second = wait_until(lambda: (lambda answer: answer[1]["token"] if answer[0] == 200
                                 else None)(a.get_json("/v1/reserve/locked")), 15, 0.01)
    asyncio.run(echo(second))
    assert not (folder / "held-twice").exists()


def test_any_instance_shows_a_tunnels_bytes_and_session_within_5_s(cluster: Cluster) -> None:
    """Each instance writes its sessions' figures into Redis every 5 s: another
    instance's /v1/status and dashboard show them, with the node that holds each, which
    node serves the page, and this node's figures apart from the cluster's."""
    n0, n1 = (cluster.start(name, {"echo": 1}) for name in ("n0", "n1"))
    token = n0.get_json("/v1/reserve/echo")[1]["token"]
    with websockets.sync.client.connect(n0.ws_url(token=token)) as ws:
        ws.send(b"x" * 5000)
        assert ws.recv(timeout=10) == b"x" * 5000

        def written() -> dict[str, Any] | None:
            [found] = instances(n1, "echo")
            return found if found["bytes_up"] == 5000 and found["pid"] else None

        began = time.monotonic()
        seen = wait_until(written, timeout=10)
        assert time.monotonic() - began < 6.5
        page = n1.get("/v1/status_view")[2].decode()
        assert seen["backend"] == instances(n0, "echo")[0]["backend"]
    assert seen["node"] == "n0" and seen["client"] == "127.0.0.1"
    assert "served by n1" in page and "this node (n1):</span>" in page
    assert "tunnels open <b>0</b>" in page and "cluster: 1 of 2 in use" in page
    assert "<th>index</th><th>node</th>" in page and "<td>0</td><td>n0</td>" in page
