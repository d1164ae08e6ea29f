"""Cluster benchmark (docs/cluster.md): memory vs Redis store, direct vs forwarded tunnel.

Usage: ``python bench/cluster.py [--quick] [--reps N] [--parallel N] [--no-pair]``;
``python bench/cluster.py --scale [--quick] [--counts ...]`` runs the scaling benchmark
of ``cluster_scale.py`` instead (what grows with the number of reservations).

Starts on free 127.0.0.1 ports a real ``redis-server`` (the settings of
docs/cluster.md: AOF, ``noeviction``, an ACL user), the TCP backend of ``backend.py``
and, in every round, fresh server instances from ``src/``:

* ``memory``: one instance with its reservations in memory (no ``--redis``);
* ``A`` and ``B``: two instances sharing reservations through the redis-server; B has
  one slot, which a held session keeps busy, so a websocket for A's reservation that
  lands on B is forwarded to A (B cannot take it over);
* ``A2`` (unless ``--no-pair``): a second instance like A, started after the
  one-instance measurements, for the cluster's cycles/s with two instances.

The service (``soak_service.py``) "starts" each instance by pointing at the shared
backend, so a cycle costs the reservation machinery, not a process start. Measured in
each round, the order of the compared pair rotating from round to round:

1. reserve→connect→close cycles: ``--parallel`` client tasks, each looping over
   ``GET /v1/reserve/bench`` (a kept-alive HTTP connection), a websocket with
   ``?token=`` to the same instance, one 12-byte echo through the backend, the close
   handshake; cycles/s over the window, the p50/p99 of one cycle, and the CPU time of
   the instance's process tree and of redis-server per cycle;
2. tunnels reserved on A, opened straight on A (direct) or on B (forwarded to A):
   64 KiB messages upstream and 64 KiB writes downstream (MB/s), and 32-byte echo
   round trips (p50/p99).

The client is a separate process (this script with ``--client``; picows and raw
uvloop connections, ``client.py``'s measurements). Every transfer is checked byte for
byte or by count; any failure aborts the run with exit status 1. The table goes to
stdout, progress to stderr, logs and raw samples to ``bench/results/cluster-<time>/``.
Every process started is stopped with its process group on exit, error, Ctrl-C or
SIGTERM (exit status 130).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from run import format_value, log, machine, run_measured

from common import HOST, BenchError, free_port, raise_nofile_limit, send_json
from servers import (
    BENCH_DIR,
    OURS,
    PYTHON,
    Processes,
    Worker,
    start_backend,
    tree_cpu,
    wait_listening,
)

KiB = 1024
MiB = 1024 * KiB
SECURITY_TOKEN = "bench"
CLUSTER_SECRET = "cluster-bench-secret"
SERVICE = "bench"
REDIS_USER = "websocketserver"
_ACL_FALLBACK = ("on ~websocketserver:* resetchannels &websocketserver:* -@all "
                 "+evalsha +eval +script|load +subscribe +unsubscribe +ping +select "
                 "+hget +hset +hdel +hvals +hincrby +time +publish +zadd +zremrangebyscore")


def _documented_acl() -> str:
    """The store's ACL as docs/cluster.md's Redis settings give it (the line
    ``user websocketserver on >CHANGE-ME ~... +...``, password left out), so that the
    benchmark follows the store's needs; the ACL of this version if the line is gone."""
    try:
        text = (BENCH_DIR.parent / "docs" / "cluster.md").read_text(encoding="utf-8")
    except OSError:
        return _ACL_FALLBACK
    for line in text.splitlines():
        words = line.split()
        if words[:3] == ["user", REDIS_USER, "on"]:
            return " ".join(word for word in words[2:] if not word.startswith(">"))
    return _ACL_FALLBACK


REDIS_ACL = _documented_acl()
"""The store's ACL (docs/cluster.md's Redis settings, as tests/cluster_support.py)."""
SAMPLE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    reps: int
    cycle_seconds: float
    warmup_seconds: float
    transfer_bytes: int
    latency_rounds: int


QUICK = Plan(reps=3, cycle_seconds=1.0, warmup_seconds=0.3, transfer_bytes=64 * MiB,
             latency_rounds=1_000)
FULL = Plan(reps=7, cycle_seconds=3.0, warmup_seconds=0.5, transfer_bytes=256 * MiB,
            latency_rounds=5_000)


@dataclass
class Row:
    """One line of the table: samples of the two compared columns and a target ratio."""

    label: str
    unit: str
    left: list[float] = field(default_factory=list)
    right: list[float] = field(default_factory=list)
    target: tuple[str, float] | None = None
    """(">=" or "<=", ratio) that right / left must meet."""

    @staticmethod
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        left, right = self.median(self.left), self.median(self.right)
        return None if left is None or right is None or left == 0 else right / left

    def holds(self) -> bool | None:
        ratio = self.ratio()
        if self.target is None or ratio is None:
            return None
        sign, bound = self.target
        return ratio >= bound if sign == ">=" else ratio <= bound

    def cells(self) -> list[str]:
        ratio, holds = self.ratio(), self.holds()
        target = "" if self.target is None else f"{'≥' if self.target[0] == '>=' else '≤'} " \
            f"{self.target[1]:g}×"
        return [f"{self.label} ({self.unit})", format_value(self.median(self.left)),
                format_value(self.median(self.right)),
                "—" if ratio is None else f"{ratio:.2f}×", target,
                "" if holds is None else ("yes" if holds else "**NO**")]


# -- the client process ---------------------------------------------------------------


class _HttpConnection(asyncio.Protocol):
    """A kept-alive HTTP/1.1 connection: one request at a time, Content-Length replies."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].lower()
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            self._fail(BenchError(f"HTTP reply without Content-Length: {head[:200]!r}"))
            return
        length = int(head[start + 17:].split(b"\r\n", 1)[0])
        if len(self.buffer) < end + 4 + length:
            return
        body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(BenchError(f"HTTP connection lost: {exc}"))

    def _fail(self, exc: BenchError) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def get(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


def _upgrade_request(port: int, token: str) -> bytes:
    """The websocket upgrade request ``client.TunnelProbe`` checks the answer to."""
    from client import PROBE_KEY

    return (f"GET /websockify?token={token} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {PROBE_KEY}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: binary\r\n\r\n").encode()


async def cycles(targets: list[list[int]], parallel: int, seconds: float,
                 warmup: float) -> dict[str, Any]:
    """``parallel`` tasks loop reserve→connect→echo→close; task i uses instance
    ``targets[i % len(targets)]`` (HTTP port, ws port). Cycles that end inside the
    window of ``seconds`` after ``warmup`` are counted, with their durations."""
    from client import probe_tunnel

    loop = asyncio.get_running_loop()
    begin = time.perf_counter() + warmup
    end = begin + seconds
    durations: list[float] = []
    total = 0

    async def worker(http_port: int, ws_port: int) -> None:
        nonlocal total
        transport, http = await loop.create_connection(_HttpConnection, HOST, http_port)
        reserve = (f"GET /v1/reserve/{SERVICE}?security_token={SECURITY_TOKEN} HTTP/1.1\r\n"
                   f"Host: {HOST}:{http_port}\r\n\r\n").encode()
        try:
            while (started := time.perf_counter()) < end:
                status, body = await http.get(reserve)
                if status != 200:
                    raise BenchError(f"reserve answered {status}: {body[:200]!r}")
                await probe_tunnel(HOST, ws_port, _upgrade_request(ws_port, json.loads(body)[
                    "token"]))
                finished = time.perf_counter()
                total += 1
                if begin <= finished <= end:
                    durations.append(finished - started)
        finally:
            transport.close()

    async with asyncio.timeout(warmup + seconds + 60):
        await asyncio.gather(*(worker(*targets[i % len(targets)]) for i in range(parallel)))
    return {"cycles": len(durations), "seconds": seconds, "durations": durations,
            "all": total}


async def serve_client() -> None:
    """Command loop of the client process: one JSON request per stdin line."""
    import client

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    holders: dict[str, client.Holder] = {}

    async def hold(key: str, url: str) -> dict[str, Any]:
        return await holders.setdefault(key, client.Holder()).hold(url, 1, 1)

    async def release(key: str) -> dict[str, Any]:
        return await holders.pop(key).release()

    commands: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
        "up": client.up, "down": client.down, "latency": client.latency,
        "hold": hold, "release": release, "cycles": cycles}
    send_json({"ready": True})
    while line := await reader.readline():
        request = json.loads(line)
        op = request.pop("op")
        try:
            reply = await commands[op](**request)
        except Exception as exc:  # reported to the orchestrator, which fails the run
            reply = {"error": f"{op}: {type(exc).__name__}: {exc}"}
        send_json(reply)


# -- the orchestrator -----------------------------------------------------------------


class Redis:
    """A real ``redis-server`` on a free port, configured like tests/cluster_support.py."""

    def __init__(self, procs: Processes, directory: Path) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
        if binary is None:
            raise BenchError("redis-server not installed (scripts/install-test-deps)")
        self.port = free_port()
        self.password = os.urandom(12).hex()
        config = directory / "redis.conf"
        config.write_text(
            f"bind {HOST}\nport {self.port}\nprotected-mode yes\ndaemonize no\n"
            f"dir {directory}\nlogfile {directory / 'redis.log'}\n"
            'save ""\nappendonly yes\nappendfsync everysec\n'
            "maxmemory 256mb\nmaxmemory-policy noeviction\n"
            "user default off ~* &* +@all\n"
            f"user {REDIS_USER} {REDIS_ACL} >{self.password}\n"
            f"user admin on ~* &* +@all >{self.password}\n")
        self.proc = procs.spawn("redis", [binary, str(config)])
        wait_listening(self.proc, self.port, "redis-server", directory / "redis.log")
        self.version = self.admin().info("server")["redis_version"]

    @property
    def url(self) -> str:
        return f"redis://{REDIS_USER}:{self.password}@{HOST}:{self.port}/0"

    def admin(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.port, username="admin",
                           password=self.password, decode_responses=True, socket_timeout=5)


@dataclass
class Instance:
    """One running ``websocketserver``."""

    name: str
    proc: subprocess.Popen[bytes]
    ws_port: int
    http_port: int
    clustered: bool

    def get(self, path: str) -> tuple[int, Any]:
        url = (f"http://{HOST}:{self.http_port}{path}{'&' if '?' in path else '?'}"
               f"security_token={SECURITY_TOKEN}")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def reserve(self) -> str:
        status, body = self.get(f"/v1/reserve/{SERVICE}")
        if status != 200:
            raise BenchError(f"{self.name}: reserve answered {status}: {body}")
        return str(body["token"])

    def ws_url(self, token: str) -> str:
        return f"ws://{HOST}:{self.ws_port}/websockify?token={token}"

    def entries(self) -> list[dict[str, Any]]:
        status, body = self.get("/v1/status")
        if status != 200:
            raise BenchError(f"{self.name}: status answered {status}: {body}")
        return [entry for service in body if service["name"] == SERVICE
                for entry in service["instances"]]


class Bench:
    """One run: its processes, its client and the rows measured."""

    def __init__(self, plan: Plan, parallel: int, pair: bool, out_dir: Path) -> None:
        self.plan = plan
        self.parallel = parallel
        self.pair = pair
        self.out_dir = out_dir
        self.procs = Processes(out_dir)
        self.www = out_dir / "www"
        self.www.mkdir()
        self.redis: Redis | None = None
        self.client: Worker | None = None
        self.configs: dict[int, Path] = {}
        self.started = 0
        self.rows = {key: Row(label, unit, target=target) for key, label, unit, target in (
            ("rate", f"reserve→connect→close, {parallel} parallel", "cycles/s", (">=", 0.5)),
            ("p50", f"one cycle, {parallel} parallel, p50", "ms", None),
            ("p99", f"one cycle, {parallel} parallel, p99", "ms", None),
            ("alone50", "one cycle, 1 client, p50", "ms", ("<=", 2.0)),
            ("alone99", "one cycle, 1 client, p99", "ms", None),
            ("cpu", "instance CPU per cycle", "µs", None),
            ("redis_cpu", "redis-server CPU per cycle", "µs", None),
            ("pair", "the same, two Redis instances vs one memory instance", "cycles/s",
             None),
            ("up", "tunnel upstream, 64 KiB messages", "MB/s", (">=", 0.6)),
            ("down", "tunnel downstream, 64 KiB writes", "MB/s", (">=", 0.6)),
            ("rtt50", "tunnel round trip, 32 B, p50", "µs", ("<=", 2.0)),
            ("rtt99", "tunnel round trip, 32 B, p99", "µs", None))}
        if not pair:
            del self.rows["pair"]

    def close(self) -> None:
        self.procs.close()

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.client is not None
        return self.client.request(op, **args)

    def config(self, count: int) -> Path:
        """A --remote_session_config with ``count`` slots of the shared-backend service."""
        if count not in self.configs:
            path = self.out_dir / f"services-{count}.json"
            path.write_text(json.dumps({SERVICE: {
                "script": str(BENCH_DIR / "soak_service.py"), "count": count,
                "options": {"port": self.backend_port}}}))
            self.configs[count] = path
        return self.configs[count]

    def start(self, specs: Sequence[tuple[str, int, bool]]) -> list[Instance]:
        """Start instances (name, slots, with Redis) at once; wait until all listen."""
        assert self.redis is not None
        started = []
        for name, count, clustered in specs:
            ws_port, http_port = free_port(), free_port()
            self.started += 1
            argv = [PYTHON, "-m", "websocketserver", "--listen_address", HOST,
                    "--http_directory", str(self.www), "--http_port", str(http_port),
                    "--security_token", SECURITY_TOKEN, "--verbose", "0",
                    "--remote_session_config", str(self.config(count)),
                    "--max_tunnels", "100000", "--max_tunnels_per_client", "100000"]
            if clustered:
                argv += ["--redis", self.redis.url, "--cluster_secret", CLUSTER_SECRET,
                         "--node_name", f"{name}-{self.started}"]
            label = f"{name}-{self.started}"
            proc = self.procs.spawn(label, [*argv, str(ws_port)], env=OURS.env())
            started.append(Instance(label, proc, ws_port, http_port, clustered))
        for instance in started:
            for port in (instance.ws_port, instance.http_port):
                wait_listening(instance.proc, port, instance.name,
                               self.out_dir / f"{instance.name}.log")
        return started

    def stop(self, instances: Sequence[Instance]) -> None:
        """SIGTERM all at once (they shut down in parallel), then reap each."""
        for instance in instances:
            try:
                os.killpg(instance.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for instance in instances:
            self.procs.stop(instance.proc)

    def run(self) -> dict[str, Row]:
        _backend, self.backend_port = start_backend(self.procs)
        self.redis = Redis(self.procs, self.out_dir)
        self.client = Worker(self.procs, "client", [PYTHON, __file__, "--client"])
        for rep in range(self.plan.reps):
            log(f"round {rep + 1}/{self.plan.reps}")
            self.round(rep)
        return self.rows

    def round(self, rep: int) -> None:
        count = max(64, 4 * self.parallel)  # a closed cycle's slot may come free late
        memory, a, b = self.start([("memory", count, False), ("a", count, True),
                                   ("b", 1, True)])
        self.fill(b)
        first, second = ((memory, a), (a, memory))[rep % 2]
        results = {instance.name: self.cycles([instance]) for instance in (first, second)}
        self.add_cycles(results[memory.name], results[a.name])
        for instance in (first, second):
            alone = self.cycles([instance], 1)
            for key, index in (("alone50", 1), ("alone99", 2)):
                row = self.rows[key]
                (row.right if instance is a else row.left).append(alone[index])
        direct_first = rep % 2 == 0
        for forwarded in (not direct_first, direct_first):
            self.tunnels(a, b if forwarded else a, forwarded)
        if self.pair:
            [a2] = self.start([("a2", count, True)])
            pair = self.cycles([a, a2])
            self.rows["pair"].left.append(results[memory.name][0])
            self.rows["pair"].right.append(pair[0])
            log(f"  two Redis instances: {pair[0]:,.0f} cycles/s")
            self.stop([a2])
        self.stop([memory, a, b])

    def fill(self, b: Instance) -> None:
        """Keep B's one slot busy with a held session, so B forwards to A."""
        self.request("hold", key="fill", url=b.ws_url(b.reserve()))
        mine = [entry for entry in b.entries() if entry["node"] == b.name]
        if [entry["state"] for entry in mine] != ["active"]:
            raise BenchError(f"{b.name}: its slot is not held: {mine}")

    def cycles(self, instances: Sequence[Instance], parallel: int = 0) -> tuple[float, ...]:
        """One cycles run against ``instances`` with ``parallel`` clients (default:
        ``--parallel``): (cycles/s, p50 ms, p99 ms, instance
        CPU µs per cycle, redis-server CPU µs per cycle)."""
        assert self.redis is not None
        clustered = any(instance.clustered for instance in instances)
        before = [tree_cpu(instance.proc.pid)[0] for instance in instances]
        redis_before = tree_cpu(self.redis.proc.pid)[0]
        reply = self.request("cycles", wait=SAMPLE_TIMEOUT, targets=[
            [instance.http_port, instance.ws_port] for instance in instances],
            parallel=parallel or self.parallel, seconds=self.plan.cycle_seconds / 2
            if parallel == 1 else self.plan.cycle_seconds, warmup=self.plan.warmup_seconds)
        done = reply["all"]  # the cycles of the CPU's interval (warm-up included)
        cpu = sum(tree_cpu(instance.proc.pid)[0] - was
                  for instance, was in zip(instances, before, strict=True))
        redis_cpu = tree_cpu(self.redis.proc.pid)[0] - redis_before
        durations = sorted(reply["durations"])
        if not durations:
            raise BenchError("no cycle completed")
        values = (reply["cycles"] / reply["seconds"], durations[len(durations) // 2] * 1e3,
                  durations[int(len(durations) * 0.99)] * 1e3, cpu / done * 1e6,
                  redis_cpu / done * 1e6 if clustered else float("nan"))
        log(f"  {'+'.join(i.name for i in instances)}, {parallel or self.parallel} "
            f"parallel: {values[0]:,.0f} cycles/s, "
            f"p50 {values[1]:.2f} ms, p99 {values[2]:.2f} ms, {values[3]:.0f} µs CPU/cycle"
            + (f" + redis {values[4]:.0f}" if clustered else ""))
        return values

    def add_cycles(self, memory: tuple[float, ...], redis: tuple[float, ...]) -> None:
        for key, index in (("rate", 0), ("p50", 1), ("p99", 2), ("cpu", 3)):
            self.rows[key].left.append(memory[index])
            self.rows[key].right.append(redis[index])
        self.rows["redis_cpu"].right.append(redis[4])

    def tunnels(self, a: Instance, via: Instance, forwarded: bool) -> None:
        """Up, down, latency through a tunnel reserved on A and opened on ``via``."""
        size = 64 * KiB
        values: dict[str, float] = {}
        for op in ("down", "up"):
            reply = self.request(op, wait=SAMPLE_TIMEOUT, url=via.ws_url(a.reserve()),
                                 total=4 * MiB, chunk=size, timeout=SAMPLE_TIMEOUT)  # warm-up
            if forwarded and op == "down":
                self.check_forwarded(a, via)
            reply = self.request(op, wait=SAMPLE_TIMEOUT, url=via.ws_url(a.reserve()),
                                 total=self.plan.transfer_bytes, chunk=size,
                                 timeout=SAMPLE_TIMEOUT)
            values[op] = reply["bytes"] / reply["seconds"] / 1e6
        reply = self.request("latency", wait=SAMPLE_TIMEOUT, url=via.ws_url(a.reserve()),
                             count=self.plan.latency_rounds, size=32, warmup=100)
        rtts = sorted(reply["rtts"])
        values["rtt50"] = rtts[len(rtts) // 2] * 1e6
        values["rtt99"] = rtts[int(len(rtts) * 0.99)] * 1e6
        for key, value in values.items():
            (self.rows[key].right if forwarded else self.rows[key].left).append(value)
        log(f"  {'forwarded' if forwarded else 'direct'}: down {values['down']:,.0f} MB/s, "
            f"up {values['up']:,.0f} MB/s, p50 {values['rtt50']:.0f} µs, "
            f"p99 {values['rtt99']:.0f} µs")

    def check_forwarded(self, a: Instance, b: Instance) -> None:
        """A tunnel opened on B for A's reservation runs on A (it was forwarded, not
        taken over): held open while the cluster's status is looked at."""
        token = a.reserve()
        self.request("hold", key="check", url=b.ws_url(token))
        entry = next((e for e in a.entries() if e.get("token") == token), None)
        self.request("release", key="check")
        if entry is None or (entry["node"], entry["state"]) != (a.name, "active"):
            raise BenchError(f"the websocket on {b.name} was not forwarded: {entry}")


def render(rows: dict[str, Row]) -> str:
    head = ["metric", "memory / direct", "redis / forwarded", "ratio", "target", "holds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows.values()]
    lines += [
        "",
        "Medians over the rounds, a fresh set of instances per round. The cycle rows "
        "compare one instance with reservations in memory (left) with one sharing them "
        "through redis-server (right); the tunnel rows a tunnel opened on the instance "
        "that holds its reservation (left) with one opened on another instance, which "
        "forwards it (right). ratio = right / left; MB = 10⁶ bytes. CPU per cycle: the "
        "instance's process tree, and redis-server's, over the window and its warm-up.",
    ]
    return "\n".join(lines)


def versions(redis_version: str) -> str:
    names = ("picows", "aiohttp", "uvloop", "redis", "httptools")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found).replace("redis ", "redis-py ") + f", redis-server {redis_version}"


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; the exit status (1 if a measurement failed, 130 interrupted)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if "--scale" in arguments:
        import cluster_scale

        return cluster_scale.main([a for a in arguments if a != "--scale"])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds (~40 s)")
    parser.add_argument("--reps", type=int, help="rounds (fresh instances each)")
    parser.add_argument("--parallel", type=int, default=32, help="client tasks in the cycles")
    parser.add_argument("--no-pair", action="store_true",
                        help="skip the two-instance cycles row")
    parser.add_argument("--scale", action="store_true",
                        help="the scaling benchmark instead (cluster_scale.py; its options)")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(arguments)
    raise_nofile_limit()
    if args.client:
        import uvloop

        uvloop.run(serve_client())
        return 0
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = Plan(**{**asdict(plan), "reps": args.reps})
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out_dir = BENCH_DIR / "results" / datetime.datetime.now().strftime("cluster-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    load = os.getloadavg()
    bench = Bench(plan, args.parallel, not args.no_pair, out_dir)
    outcome = run_measured(bench, out_dir)
    if isinstance(outcome, int):
        return outcome
    rows: dict[str, Row] = outcome.rows
    redis_version = bench.redis.version if bench.redis else "?"
    header = (f"cluster benchmark, {'quick' if args.quick else 'full'} run, {plan.reps} rounds, "
              f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine()}; "
              f"{versions(redis_version)}; load average at start {load[0]:.2f}; "
              f"{outcome.seconds:.0f} s, other load {outcome.other_load:.0%}")
    table = render(rows)
    (out_dir / "table.md").write_text(header + "\n\n" + table + "\n")
    (out_dir / "samples.json").write_text(json.dumps(
        {key: {"label": row.label, "unit": row.unit, "left": row.left, "right": row.right}
         for key, row in rows.items()}, indent=1))
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
