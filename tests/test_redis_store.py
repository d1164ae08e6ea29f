"""The Redis store against a real redis-server: exact capacity, exactly-once claims,
take-over, fencing, reclaim of dead instances, Redis outages and restarts.

Instances are RedisStore objects in this process (each with its own connections), or a
child process where an instance must die by SIGKILL. The heartbeat TTL is 1 s here.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import TYPE_CHECKING, Any

import pytest

from support import ROOT, free_port
from websocketserver.cluster.redis_store import DuplicateNode, RedisStore, StaleNode, WrongSecret
from websocketserver.core.lifecycle import TRANSITIONS
from websocketserver.sessions.reservations import (
    ClaimOutcome,
    NoSlotFree,
    Reservation,
    State,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from cluster_support import RedisServer

pytest_plugins = ["cluster_support"]  # its fixtures (imported here, it skips assert rewriting)

TTL = 1.0
SECRET = b"store-test-secret"
Join = Callable[..., Awaitable[RedisStore]]


@pytest.fixture
async def join(redis_server: RedisServer) -> AsyncIterator[Join]:
    """``await join(name, counts, ...)``: a started instance; all are closed after."""
    stores: list[RedisStore] = []

    async def start(name: str, counts: dict[str, int], cluster_scope: Collection[str] = (),
                    url: str | None = None, secret: bytes = SECRET) -> RedisStore:
        store = RedisStore(url or redis_server.url, name, f"{name}.test:8080", counts,
                           cluster_scope, heartbeat_ttl=TTL, secret=secret)
        stores.append(store)
        await store.start()
        return store

    yield start
    for store in stores:
        await store.close()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float) -> float:
    """Poll ``check`` until it returns something truthy; the seconds it took."""
    began = time.monotonic()
    while not await check():
        assert time.monotonic() - began < timeout, f"not within {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def test_capacity_is_exact_under_concurrency(join: Join) -> None:
    counts = {"a": 7, "b": 7, "c": 6}
    nodes = [await join(name, {"svc": count, "lic": 20}, cluster_scope={"lic"})
             for name, count in counts.items()]
    assert await nodes[0].capacity("svc", 7) == 20
    assert await nodes[0].capacity("lic", 20) == 20
    for _ in range(5):
        for service, count in (("svc", None), ("lic", 20)):
            results = await asyncio.gather(
                *(nodes[i % 3].reserve(service, count or nodes[i % 3].counts["svc"], {})
                  for i in range(500)), return_exceptions=True)
            won = [r for r in results if isinstance(r, Reservation)]
            assert len(won) == 20
            assert [r for r in results if not isinstance(r, Reservation | NoSlotFree)] == []
            if service == "svc":
                assert {n: sorted(r.index for r in won if r.node == n) for n in counts} == \
                       {n: list(range(count)) for n, count in counts.items()}
            else:
                assert sorted(r.index for r in won) == list(range(20))
            assert len(await nodes[1].list(service)) == 20
            for reservation in won:
                removed = await nodes[2].remove(reservation.token)
                assert removed is not None and removed.token == reservation.token
    assert await nodes[0].list() == []


async def test_reserve_goes_to_the_least_loaded_instance_ties_to_the_local_one(
        join: Join) -> None:
    a, b = await join("a", {"svc": 2}), await join("b", {"svc": 2})
    assert (await a.reserve("svc", 2, {})).node == "a"  # tie: local
    assert (await a.reserve("svc", 2, {})).node == "b"  # b is less loaded
    assert (await b.reserve("svc", 2, {"k": "v"}, "alice")).node == "b"  # tie: local
    last = await a.reserve("svc", 2, {})
    assert (last.node, last.index) == ("a", 1)
    with pytest.raises(NoSlotFree):
        await b.reserve("svc", 2, {})
    mine = [r for r in await a.list("svc") if r.owner == "alice"]
    assert [(r.options, r.state, r.node) for r in mine] == [({"k": "v"}, State.RESERVED, "b")]


async def test_a_token_is_claimed_exactly_once_across_instances(join: Join) -> None:
    nodes = [await join(name, {"svc": 7}) for name in "abc"]
    for _ in range(3):
        token = (await nodes[0].reserve("svc", 7, {})).token
        claims = await asyncio.gather(*(nodes[i % 3].claim(token, None) for i in range(100)))
        assert Counter(c.outcome for c in claims) == {ClaimOutcome.CLAIMED: 1,
                                                      ClaimOutcome.IN_USE: 99}
        winner = next(i for i, c in enumerate(claims) if c.outcome is ClaimOutcome.CLAIMED)
        stored = await nodes[1].get(token)
        assert stored is not None and stored.state is State.STARTING
        assert stored.node == nodes[winner % 3].name


async def test_claim_takes_over_when_a_local_slot_is_free_else_names_the_owner(
        join: Join) -> None:
    a = await join("a", {"svc": 2, "lic": 3}, cluster_scope={"lic"})
    b = await join("b", {"svc": 1, "lic": 3}, cluster_scope={"lic"})
    first = await a.reserve("svc", 2, {})   # a index 0
    await b.reserve("svc", 1, {})            # b index 0: b is full
    second = await a.reserve("svc", 2, {})  # a index 1
    forward = await b.claim(second.token, None)
    assert forward.outcome is ClaimOutcome.ELSEWHERE and forward.reservation is not None
    assert (forward.reservation.node, forward.reservation.state) == ("a", State.RESERVED)
    found = await b.address("a")
    assert found is not None and found[0] == "a.test:8080"
    assert (await a.claim(second.token, None)).outcome is ClaimOutcome.CLAIMED

    await b.remove((await b.list("svc"))[-1].token)  # b has room again
    taken = await b.claim(first.token, None)
    assert taken.outcome is ClaimOutcome.CLAIMED and taken.reservation is not None
    assert (taken.reservation.node, taken.reservation.index) == ("b", 0)
    assert (await a.reserve("svc", 2, {})).index == 0  # a's slot 0 was freed

    licence = await a.reserve("lic", 3, {})
    await a.reserve("lic", 3, {})
    moved = await b.claim(licence.token, None)  # cluster scope: no local limit, same index
    assert moved.reservation is not None
    assert (moved.outcome, moved.reservation.node, moved.reservation.index) == \
           (ClaimOutcome.CLAIMED, "b", licence.index)


async def test_a_detached_session_is_reattached_only_where_it_runs(join: Join) -> None:
    a, b = await join("a", {"svc": 1}), await join("b", {"svc": 1})
    token = (await a.reserve("svc", 1, {}, "alice")).token
    assert (await a.claim(token, "alice")).outcome is ClaimOutcome.CLAIMED
    assert await a.transition(token, State.STARTING, State.ACTIVE) is not None
    assert await a.transition(token, State.ACTIVE, State.DETACHED) is not None
    assert (await b.claim(token, "bob")).outcome is ClaimOutcome.NOT_OWNER
    assert (await b.claim(token, None)).outcome is ClaimOutcome.ELSEWHERE  # b has room
    reattached = await a.claim(token, "alice")
    assert reattached.outcome is ClaimOutcome.REATTACHED
    assert reattached.reservation is not None
    assert reattached.reservation.state is State.ACTIVE
    assert (await a.claim(token, None)).outcome is ClaimOutcome.IN_USE


async def test_release_from_another_instance_reaches_the_owner_within_a_second(
        join: Join) -> None:
    a, b = await join("a", {"svc": 1}), await join("b", {"svc": 1})
    token = (await a.reserve("svc", 1, {})).token
    await a.claim(token, None)
    await a.transition(token, State.STARTING, State.ACTIVE)
    requests = a.stop_requests()
    assert isinstance(requests, AsyncGenerator)  # for aclose()
    try:
        # released while a was not listening (a Redis outage): a finds it on subscribing
        assert await b.transition(token, State.ACTIVE, State.STOPPING) is not None
        assert await asyncio.wait_for(anext(requests), 1) == token
        await a.remove(token)
        token = (await a.reserve("svc", 1, {})).token
        await a.claim(token, None)
        began = time.monotonic()
        await b.transition(token, (State.STARTING, State.ACTIVE), State.STOPPING)
        assert await asyncio.wait_for(anext(requests), 1) == token
        assert time.monotonic() - began < 1
        own = (await b.reserve("svc", 1, {})).token
        await b.claim(own, None)
        await b.transition(own, State.STARTING, State.STOPPING)  # b's own session
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(requests), 0.5)
    finally:
        await requests.aclose()


async def test_a_forwards_nonce_is_fresh_once_and_only_for_a_minute(
        join: Join, redis_server: RedisServer) -> None:
    """A forward is signed with Redis's time: its nonce is accepted once, and a time over
    a minute old or ahead of Redis is refused, so Redis keeps a minute of nonces only
    (it kept each for a day: one token holder could fill Redis)."""
    a, b = await join("a", {}), await join("b", {})
    found = await a.address("b")
    assert found is not None
    now = found[1]
    results = await asyncio.gather(*(store.remember_nonce("n1", now) for store in (a, b) * 10))
    assert sorted(results) == [False] * 19 + [True]
    assert not await a.remember_nonce("old", now - 61_000)
    assert not await a.remember_nonce("ahead", now + 10_000)
    assert await a.remember_nonce("n2", now, 0.2)
    assert not await b.remember_nonce("n2", now, 0.2)
    await asyncio.sleep(0.3)
    assert not await b.remember_nonce("n2", now, 0.2)  # too old by now
    nonces = redis_server.client().zcard("websocketserver:nonces")
    assert nonces <= 1  # only n1 is left: n2's minute (0.2 s here) is over


async def test_an_instance_forwards_only_to_an_address_signed_with_the_secret(
        join: Join, redis_server: RedisServer) -> None:
    """Write access to Redis alone cannot make forwarding a proxy to any host:port: a
    node entry whose address is not signed with the cluster secret is not used."""
    a = await join("a", {"svc": 1})
    await join("b", {"svc": 1})
    admin = redis_server.client()
    raw = admin.hget("websocketserver:nodes", "b")
    assert raw is not None
    entry = json.loads(raw)
    assert (await a.address("b") or ("",))[0] == "b.test:8080"
    entry["address"] = "evil.test:25"
    admin.hset("websocketserver:nodes", "b", json.dumps(entry))
    assert await a.address("b") is None


async def test_an_instance_with_another_secret_is_refused(join: Join) -> None:
    await join("a", {"svc": 1})
    with pytest.raises(WrongSecret):
        await join("b", {"svc": 1}, secret=b"another secret")
    assert await (await join("c", {"svc": 1})).capacity("svc", 1) == 2


async def test_after_redis_lost_its_data_sessions_are_registered_again(
        join: Join, redis_server: RedisServer) -> None:
    """FLUSHALL: each instance registers again with its running sessions (not ended),
    and their slots stay theirs; unused reservations are gone with the data."""
    a, b = await join("a", {"svc": 1}), await join("b", {"svc": 1})
    session = (await a.reserve("svc", 1, {"k": "v"}, "alice")).token
    await a.claim(session, "alice")
    await a.transition(session, State.STARTING, State.ACTIVE)
    await b.reserve("svc", 1, {})
    redis_server.client().flushall()
    for store in (a, b):
        await asyncio.wait_for(store.fenced.wait(), 3)
        assert store.lost
    assert await a.register(restore=True) == []
    await b.register(restore=True)
    kept = await b.get(session)
    assert kept is not None
    assert (kept.node, kept.index, kept.state, kept.owner, kept.options) == \
           ("a", 0, State.ACTIVE, "alice", {"k": "v"})
    with pytest.raises(NoSlotFree):  # a's slot is its session's; b's is free again
        await a.reserve("svc", 1, {}) and await a.reserve("svc", 1, {})


async def test_a_stale_instance_never_books_again(join: Join, redis_server: RedisServer,
                                                  tcp_proxy: Any) -> None:
    proxy = tcp_proxy(redis_server.port)
    a = await join("a", {"svc": 1}, url=redis_server.url.replace(
        f":{redis_server.port}/", f":{proxy.port}/"))
    b = await join("b", {"svc": 1})
    session = (await a.reserve("svc", 1, {})).token
    assert (await a.claim(session, None)).outcome is ClaimOutcome.CLAIMED
    await a.transition(session, State.STARTING, State.ACTIVE)
    proxy.blackhole()  # a is cut off from Redis, alive: b clears it after 2 x TTL
    took = await eventually(lambda: _gone(b, "a"), 2 * TTL + 1)
    assert took > TTL
    assert await b.get(session) is None  # its session's record went with it
    proxy.restore()
    for attempt in (a.reserve("svc", 1, {}), a.claim(session, None),
                    a.transition(session, State.ACTIVE, State.STOPPING), a.remove(session)):
        with pytest.raises(StaleNode):
            await attempt
    await asyncio.wait_for(a.fenced.wait(), 2)
    assert [r.node for r in await b.list()] == []
    await a.register()  # afresh: a new epoch, and beating again
    assert (await a.reserve("svc", 1, {})).node == "a"
    assert (await b.reserve("svc", 1, {})).node == "b"
    await asyncio.sleep(2 * TTL + 0.5)
    assert not a.fenced.is_set() and await b.address("a") is not None


async def _gone(store: RedisStore, node: str) -> bool:
    return await store.address(node) is None


NODE_SCRIPT = """
import asyncio, json, sys
from websocketserver.cluster.redis_store import RedisStore
from websocketserver.sessions.reservations import State

async def main():
    store = RedisStore(sys.argv[1], "a", "a.test:8080", {"svc": 2},
                       heartbeat_ttl=float(sys.argv[2]), secret=b"store-test-secret")
    await store.start()
    session = (await store.reserve("svc", 2, {})).token
    await store.claim(session, None)
    await store.transition(session, State.STARTING, State.ACTIVE)
    unused = (await store.reserve("svc", 2, {})).token
    print(json.dumps([session, unused]), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_node_process(url: str) -> tuple[subprocess.Popen[str], str, str]:
    """Instance "a" in a child process: one active session, one unused reservation."""
    proc = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, url, str(TTL)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT / "src")
    assert proc.stdout is not None
    session, unused = json.loads(proc.stdout.readline())
    return proc, session, unused


async def test_a_killed_instance_is_cleared_within_two_ttl_and_a_second(
        join: Join, redis_server: RedisServer) -> None:
    b = await join("b", {"svc": 2})
    own = (await b.reserve("svc", 2, {})).token
    await b.claim(own, None)
    await b.transition(own, State.STARTING, State.ACTIVE)
    proc, session, unused = await asyncio.to_thread(start_node_process, redis_server.url)
    try:
        assert {r.token: r.node for r in await b.list()} == {own: "b", session: "a",
                                                            unused: "a"}
        with pytest.raises(DuplicateNode):  # "a" is alive
            await join("a", {"svc": 2})
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        await eventually(lambda: _gone(b, "a"), 2 * TTL + 1)
        assert time.monotonic() - killed <= 2 * TTL + 1
    finally:
        proc.kill()
        proc.wait()
    assert await b.get(session) is None  # its session ended with it: the slot is free
    moved = await b.get(unused)  # its never-used reservation moved to b, still usable
    assert moved is not None and (moved.node, moved.index, moved.state) == \
           ("b", 1, State.RESERVED)
    assert (await b.claim(unused, None)).outcome is ClaimOutcome.CLAIMED
    kept = await b.get(own)
    assert kept is not None and kept.state is State.ACTIVE
    assert await b.capacity("svc", 2) == 2


async def test_a_restarted_instance_registers_afresh_once_its_old_self_is_silent(
        join: Join, redis_server: RedisServer) -> None:
    await join("b", {"svc": 2})
    proc, session, unused = await asyncio.to_thread(start_node_process, redis_server.url)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = RedisStore(redis_server.url, "a", "a.test:8080", {"svc": 2}, heartbeat_ttl=TTL,
                       secret=SECRET)
    with pytest.raises(DuplicateNode):  # not silent for a TTL yet
        await again.register()
    await asyncio.sleep(TTL)
    await again.start()
    try:
        assert await again.get(session) is None
        kept = await again.get(unused)
        assert kept is not None and kept.state is State.RESERVED
        assert (await again.claim(unused, None)).outcome is ClaimOutcome.CLAIMED
    finally:
        await again.close()


async def test_a_duplicate_live_name_is_refused(join: Join, redis_server: RedisServer) -> None:
    first = await join("a", {"svc": 1})
    token = (await first.reserve("svc", 1, {})).token
    with pytest.raises(DuplicateNode, match="a live instance named a"):
        await join("a", {"svc": 1})
    await first.close()  # a graceful exit frees the name; its unused reservation stays
    second = await join("a", {"svc": 1})
    assert (await second.reserve("svc", 1, {})).index == 0
    assert await second.get(token) is None  # nowhere to move it: no live instance had room


async def test_redis_down_fails_closed_within_1_5_s(join: Join, redis_server: RedisServer,
                                                   tcp_proxy: Any) -> None:
    a = await join("a", {"svc": 1})
    token = (await a.reserve("svc", 1, {})).token
    redis_server.kill()
    for operation in (lambda: a.reserve("svc", 1, {}), lambda: a.get(token), a.list,
                      lambda: a.claim(token, None), lambda: a.remove(token)):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await operation()
        assert time.monotonic() - began < 1.5
    assert not a.available

    redis_server.start()
    proxy = tcp_proxy(redis_server.port)
    cut = await join("b", {"svc": 1}, url=redis_server.url.replace(
        f":{redis_server.port}/", f":{proxy.port}/"))
    proxy.blackhole()  # unreachable rather than refused: timeouts
    for operation in (lambda: cut.reserve("svc", 1, {}), cut.list):
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await operation()
        assert time.monotonic() - began < 1.5
    proxy.restore()


async def test_redis_restart_keeps_everything_and_instances_reconnect(
        join: Join, redis_server: RedisServer) -> None:
    a, b = await join("a", {"svc": 2}), await join("b", {"svc": 2})
    session = (await a.reserve("svc", 2, {})).token
    await a.claim(session, None)
    await a.transition(session, State.STARTING, State.ACTIVE)
    await b.reserve("svc", 2, {}, "alice")
    before = await a.list()
    requests = a.stop_requests()
    assert isinstance(requests, AsyncGenerator)  # for aclose()
    listening = asyncio.ensure_future(anext(requests))
    redis_server.kill()
    await asyncio.sleep(3 * TTL)  # longer than it takes to clear a silent instance
    redis_server.start()
    await eventually(lambda: _reserves(a), 5)  # a reconnected by itself
    await eventually(lambda: _reserves(b), 5)
    await asyncio.sleep(2 * TTL + 0.5)  # the outage counted as nobody's silence
    assert not a.fenced.is_set() and not b.fenced.is_set()
    assert a.available and b.available
    after = {r.token: r for r in await b.list()}
    for reservation in before:
        assert (after[reservation.token].state, after[reservation.token].node) == \
               (reservation.state, reservation.node)
    assert not listening.done()
    await b.transition(session, State.ACTIVE, State.STOPPING)  # a listens again
    assert await asyncio.wait_for(listening, 1.5) == session
    await requests.aclose()


async def _reserves(store: RedisStore) -> bool:
    try:
        await store.remove((await store.reserve("svc", 2, {})).token)
        return True
    except StoreUnavailable:
        return False


async def test_times_come_from_redis_not_from_the_instance(
        join: Join, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this clock is off
    a = await join("a", {"svc": 1})
    with redis_server.client() as client:
        seconds, micros = client.time()
        reservation = await a.reserve("svc", 1, {})
        assert abs(reservation.timestamp - (seconds + micros / 1e6)) < 1
        assert await a.capacity("svc", 1) == 1  # a's heartbeats are judged by Redis's clock
        record = json.loads(client.hget("websocketserver:res", reservation.token))
        record["changed"] -= 10_000  # changed 10 s ago by Redis's clock
        client.hset("websocketserver:res", reservation.token, json.dumps(record))
    listed = await a.get(reservation.token)
    assert listed is not None
    assert 9.5 < time.monotonic() - listed.changed < 11  # the age --timeout compares


def test_haproxy_config_balances_both_ports(start_haproxy: Any) -> None:
    backends = [_HealthyBackend(name) for name in ("one", "two")]
    try:
        proxy = start_haproxy([(b.port, b.port) for b in backends])
        seen: Counter[str] = Counter()
        for _ in range(4):
            for port in (proxy.http_port, proxy.ws_port):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health",
                                            timeout=5) as answer:
                    seen[json.load(answer)["node"]] += 1
        assert set(seen) == {"one", "two"}
    finally:
        for backend in backends:
            backend.close()


class _HealthyBackend:
    """An HTTP server answering ``/v1/health`` with its name, as an instance would."""

    def __init__(self, name: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps({"status": "ok", "node": name, "store": "ok"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_nginx_cluster_config_is_valid(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx not installed (scripts/install-test-deps)")
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("viz.example.com")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    site = (ROOT / "deploy" / "nginx-cluster.conf").read_text() \
        .replace("/etc/ssl/certs/viz.example.com.pem", str(tmp_path / "cert.pem")) \
        .replace("/etc/ssl/private/viz.example.com.key", str(tmp_path / "key.pem")) \
        .replace("listen 443 ssl", f"listen 127.0.0.1:{free_port()} ssl") \
        .replace("/var/log/nginx/", f"{tmp_path}/")
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n access_log off;\n{site}\n}}\n")
    check = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c",
                            str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


async def test_the_used_slots_always_match_the_reservations(join: Join,
                                                            redis_server: RedisServer) -> None:
    """The per-instance slot index that reserve reads (``used``) stays what the
    reservations say, and no slot is held twice, through random reserves, claims
    (take-overs), transitions, removes and instances leaving and joining again."""
    counts = {"a": 3, "c": 4}
    names = ["x", "y", "z"]
    stores = [await join(name, counts, {"c"}) for name in names]
    admin = redis_server.client()
    rng = random.Random(1)
    tokens: list[str] = []

    def consistent() -> None:
        records = [json.loads(v) for v in admin.hvals("websocketserver:res")]
        want: dict[str, dict[str, str]] = {}
        held: set[tuple[str, ...]] = set()
        for r in records:
            want.setdefault(f"{r['node']}\t{r['service']}", {})[str(r["index"])] = r["token"]
            slot = ((r["service"], str(r["index"])) if r["scope"] == "cluster"
                    else (r["node"], r["service"], str(r["index"])))
            assert slot not in held, slot
            held.add(slot)
        got = {k: json.loads(v) for k, v in admin.hgetall("websocketserver:used").items()}
        assert {k: v for k, v in got.items() if v} == want

    for _ in range(400):
        i = rng.randrange(3)
        store, op = stores[i], rng.random()
        try:
            if op < 0.35:
                tokens.append((await store.reserve(rng.choice("ac"), 4, {}, None)).token)
            elif op < 0.6 and tokens:
                await store.claim(rng.choice(tokens), None)
            elif op < 0.75 and tokens:
                old = rng.choice([State.STARTING, State.ACTIVE])
                await store.transition(rng.choice(tokens), old, rng.choice(
                    [new for new in TRANSITIONS[old] if new is not State.ENDED]))
            elif op < 0.93 and tokens:
                token = rng.choice(tokens)
                tokens.remove(token)
                await store.remove(token)
            elif op < 0.96:
                await store.close()
                stores[i] = await join(names[i], counts, {"c"})
        except NoSlotFree:
            pass
        consistent()


async def test_an_instance_writes_figures_into_its_own_reservations_only(join: Join) -> None:
    """A session's figures come from the instance running it: another instance's write
    for that token is skipped."""
    a, b = await join("a", {"echo": 1}), await join("b", {"echo": 1})
    r = await a.reserve("echo", 1, {})
    assert r.node == "a"
    await b.record_figures({r.token: {"bytes_up": 1}})
    got = await a.get(r.token)
    assert got is not None and got.figures is None
    await a.record_figures({r.token: {"bytes_up": 2}})
    got = await b.get(r.token)
    assert got is not None and got.figures == {"bytes_up": 2}
