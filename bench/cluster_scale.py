"""Cluster scaling benchmark (issue 22, finding 5): what grows with the reservations.

Usage: ``python bench/cluster.py --scale [--quick] [--counts 50,5000,20000]`` (or
``python bench/cluster_scale.py`` with the same options).

Starts on free 127.0.0.1 ports a real ``redis-server`` (docs/cluster.md's settings, as
``bench/cluster.py``) and three clustered server instances from ``src/``, then fills
the cluster up to each N reservations in turn (``--counts``; default 50, 5,000 and
20,000; ``--quick`` 50, 1,000 and 5,000) and measures at each N:

* ``/v1/status`` p50 (and max) for a caller who sees 10 reservations: user ``viewer``
  (``--users_file`` key) is in group ``viewers`` only, whose one service ``view``
  holds 10 reservations; every other reservation belongs to services of group
  ``fillers``, which ``viewer`` does not see. Up to ``status_calls`` sequential calls
  (fewer if they take longer than ``status_seconds`` in all), rotating over the three
  instances; each answer is checked to list exactly those 10;
* idle CPU over ``idle_seconds`` with no requests at all: redis-server's process, and
  the sum of the three instances' process trees (supervisor, server, relay), in % of
  one CPU;
* reserve rate: ``rate_parallel`` client tasks, spread over the three instances, loop
  ``/v1/reserve/rate`` + ``/v1/release/<token>`` on a small separate service (kept-alive
  HTTP connections) for ``rate_seconds`` after a short warm-up; reserves/s of the
  window. Failed calls (e.g. a 503 when Redis did not answer in time) are counted, not
  fatal, unless more than half failed;
* the longest command Redis ran meanwhile (its SLOWLOG, which times each command or
  script inside Redis), and the warnings the instances logged meanwhile.

The filling reservations are made with ``/v1/reserve`` by user ``filler`` on
``FILL_SERVICES`` services of group ``fillers`` (round-robin, so that no one service's
slots grow huge) and never used; ``--timeout`` is raised so that none is reclaimed.
A reserve that answered 503 may have been booked all the same, so it is not retried:
the cluster's count is taken from ``/v1/metrics`` (``websocketserver_reservations``) and
topped up; the table shows the count held when it is not N, and what the reserve-rate
run left behind.
Only the public REST API, Redis's own SLOWLOG and process CPU times are used, so the
benchmark does not depend on how the store keeps its data.

The table (one row per N, each figure with its ratio to the figure at the first N;
issue 22's target: within 3x of the figure at 50) goes to stdout, progress to stderr,
logs and raw samples to ``bench/results/cluster-scale-<time>/``. Every process started
is stopped with its process group on exit, error, Ctrl-C or SIGTERM (exit status 130);
a failed measurement exits with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil
from cluster import CLUSTER_SECRET, Redis, _HttpConnection, versions
from run import log, machine

from common import HOST, BenchError, free_port, raise_nofile_limit
from servers import BENCH_DIR, OURS, PYTHON, Processes, tree_cpu, wait_listening

INSTANCES = 3
VISIBLE = 10
"""Reservations the measured caller sees (issue 22: "a caller who sees at most 10")."""
FILL_SERVICES = 20
"""Services the filling reservations are spread over."""
VIEWER, VIEWER_KEY = "viewer", "viewer-key-bench"
FILLER, FILLER_KEY = "filler", "filler-key-bench"
SLOWLOG_MICROSECONDS = 100
"""Redis logs every command that ran longer than this (SLOWLOG)."""
CPU_FLOOR = 1.0
"""% of one CPU: idle CPU figures are judged against the target as at least this (CPU
times come in 10 ms ticks, 0.2 % of 5 s; 0.4 % against 1.3 % is noise, not 3×)."""
OWN_COMMANDS = ("SLOWLOG", "CONFIG", "INFO")
"""The benchmark's own commands, left out of the longest one."""
TARGET = 3.0
"""Each figure within this factor of the figure at the first N."""


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    counts: tuple[int, ...]
    status_calls: int
    status_seconds: float
    idle_seconds: float
    rate_seconds: float
    rate_parallel: int
    fill_parallel: int


FULL = Plan(counts=(50, 5_000, 20_000), status_calls=40, status_seconds=12.0,
            idle_seconds=5.0, rate_seconds=5.0, rate_parallel=8, fill_parallel=32)
QUICK = Plan(counts=(50, 1_000, 5_000), status_calls=15, status_seconds=5.0,
             idle_seconds=3.0, rate_seconds=2.0, rate_parallel=8, fill_parallel=32)


@dataclass
class Point:
    """The figures at one N."""

    count: int
    fill_seconds: float = 0.0
    status_ms: list[float] = field(default_factory=list)
    status_errors: int = 0
    redis_idle: float = 0.0
    """% of one CPU."""
    instances_idle: float = 0.0
    rate: float = 0.0
    rate_errors: int = 0
    rate_calls: int = 0
    reserve_ms: list[float] = field(default_factory=list)
    """Durations of the counted cycles' reserve calls."""
    longest_ms: float | None = None
    longest_command: str = ""
    warnings: int = 0
    held: int = 0
    """Reservations the cluster held after filling (more than ``count`` if a reserve
    that answered 503 was booked all the same)."""
    left_over: int = 0
    """Reservations the reserve-rate run left behind (a failed call booked all the same)."""
    other_load: float = 0.0
    """Share of all CPUs that processes not started by the benchmark took meanwhile."""

    @property
    def status_p50(self) -> float | None:
        return statistics.median(self.status_ms) if self.status_ms else None

    def reserve_p(self, share: float) -> float:
        values = self.reserve_ms
        return values[min(len(values) - 1, int(len(values) * share))] if values else 0.0


# -- the load: kept-alive HTTP connections ---------------------------------------------


def _get(path: str, port: int, key: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"X-User-Key: {key}\r\n\r\n").encode()


async def _connect(port: int) -> tuple[asyncio.BaseTransport, _HttpConnection]:
    loop = asyncio.get_running_loop()
    return await loop.create_connection(_HttpConnection, HOST, port)


async def fill(ports: Sequence[int], first: int, count: int, parallel: int,
               seconds: float) -> int:
    """Ask for ``count`` reservations (numbered from ``first``) of the filler services
    as user ``filler``: ``parallel`` tasks, round-robin over the instances. Returns how
    many answered 503 (the store did not answer in time: such a reservation may have
    been booked all the same, so it is not retried here); any other error fails the
    run."""
    numbers = iter(range(first, first + count))
    failed = 0

    async def worker(port: int) -> None:
        nonlocal failed
        transport, http = await _connect(port)
        try:
            for number in numbers:
                request = _get(f"/v1/reserve/fill{number % FILL_SERVICES}", port, FILLER_KEY)
                status, body = await http.get(request)
                if status == 503:
                    failed += 1
                    await asyncio.sleep(0.2)
                elif status != 200:
                    raise BenchError(f"filling: reserve answered {status}: {body[:200]!r}")
        finally:
            transport.close()

    async with asyncio.timeout(seconds):
        await asyncio.gather(*(worker(ports[i % len(ports)]) for i in range(parallel)))
    return failed


async def status_calls(ports: Sequence[int], calls: int, seconds: float
                       ) -> tuple[list[float], int]:
    """Sequential ``/v1/status`` calls as user ``viewer`` (rotating over the instances)
    until ``calls`` are done or ``seconds`` have passed (at least 5): their durations
    (s), and how many did not answer 200. Each answer must list exactly the ``view``
    service with its 10 reservations."""
    connections = [await _connect(port) for port in ports]
    durations: list[float] = []
    errors = 0
    began = time.perf_counter()
    try:
        async with asyncio.timeout(seconds + 120):
            for number in range(calls):
                if number >= 5 and time.perf_counter() - began > seconds:
                    break
                port = ports[number % len(ports)]
                http = connections[number % len(ports)][1]
                started = time.perf_counter()
                status, body = await http.get(_get("/v1/status", port, VIEWER_KEY))
                elapsed = time.perf_counter() - started
                if status != 200:
                    errors += 1
                    continue
                durations.append(elapsed)
                services = json.loads(body)
                seen = {s["name"]: len(s["instances"]) for s in services}
                if seen != {"view": VISIBLE}:
                    raise BenchError(f"/v1/status: {VIEWER} should see {VISIBLE} reservations "
                                     f"of 'view' and nothing else, saw {seen}")
    finally:
        for transport, _http in connections:
            transport.close()
    return durations, errors


async def reserve_rate(ports: Sequence[int], parallel: int, seconds: float,
                       warmup: float) -> dict[str, Any]:
    """``parallel`` tasks loop reserve + release of the ``rate`` service as ``filler``;
    the cycles that ended inside the window of ``seconds`` after ``warmup``, the
    durations (s) of their reserve calls, and the calls and failed calls of the whole
    run."""
    begin = time.perf_counter() + warmup
    end = begin + seconds
    counted = calls = errors = 0
    reserves: list[float] = []

    async def worker(port: int) -> None:
        nonlocal counted, calls, errors
        transport, http = await _connect(port)
        try:
            while time.perf_counter() < end:
                calls += 1
                started = time.perf_counter()
                status, body = await http.get(_get("/v1/reserve/rate", port, FILLER_KEY))
                reserved = time.perf_counter() - started
                if status != 200:
                    errors += 1
                    await asyncio.sleep(0.05)
                    continue
                token = json.loads(body)["token"]
                for _attempt in range(50):  # release it, or the slots run out
                    calls += 1
                    status, body = await http.get(_get(f"/v1/release/{token}", port,
                                                       FILLER_KEY))
                    if status == 200:
                        break
                    errors += 1
                    if status != 503:
                        raise BenchError(f"release answered {status}: {body[:200]!r}")
                    await asyncio.sleep(0.05)
                else:
                    raise BenchError("release kept answering 503")
                if begin <= time.perf_counter() <= end:
                    counted += 1
                    reserves.append(reserved)
        finally:
            transport.close()

    async with asyncio.timeout(warmup + seconds + 120):
        await asyncio.gather(*(worker(ports[i % len(ports)]) for i in range(parallel)))
    return {"cycles": counted, "calls": calls, "errors": errors, "reserves": reserves}


# -- the orchestrator -----------------------------------------------------------------


@dataclass
class Instance:
    """One running clustered ``websocketserver``."""

    name: str
    proc: subprocess.Popen[bytes]
    ws_port: int
    http_port: int
    log: Path


class Bench:
    """One run: its processes and the figures measured."""

    def __init__(self, plan: Plan, out_dir: Path) -> None:
        self.plan = plan
        self.out_dir = out_dir
        self.procs = Processes(out_dir)
        self.redis: Redis | None = None
        self.instances: list[Instance] = []
        self.points: list[Point] = []
        self.made = 0  # filling reservations asked for so far
        self.total = VISIBLE  # reservations the cluster holds
        self.log_sizes: dict[str, int] = {}

    def close(self) -> None:
        self.procs.close()

    @property
    def ports(self) -> list[int]:
        return [instance.http_port for instance in self.instances]

    def write_config(self) -> tuple[Path, Path, Path]:
        """The services (the soak's service: nothing runs for an unused reservation),
        the users and their groups."""
        per_fill = -(-max(self.plan.counts) // (FILL_SERVICES * INSTANCES)) + 16
        script = str(BENCH_DIR / "soak_service.py")
        services: dict[str, Any] = {
            "view": {"script": script, "count": VISIBLE,
                     "options": {"port": 9, "group": "viewers"}},
            "rate": {"script": script, "count": self.plan.rate_parallel + 16,
                     "options": {"port": 9, "group": "fillers"}}}
        for number in range(FILL_SERVICES):
            services[f"fill{number}"] = {"script": script, "count": per_fill,
                                         "options": {"port": 9, "group": "fillers"}}
        paths = (self.out_dir / "services.json", self.out_dir / "users.json",
                 self.out_dir / "groups.json")
        paths[0].write_text(json.dumps(services, indent=1))
        paths[1].write_text(json.dumps({VIEWER: VIEWER_KEY, FILLER: FILLER_KEY}))
        paths[2].write_text(json.dumps({"viewers": [VIEWER], "fillers": [FILLER]}))
        return paths

    def start(self) -> None:
        assert self.redis is not None
        services, users, groups = self.write_config()
        www = self.out_dir / "www"
        www.mkdir()
        for number in range(1, INSTANCES + 1):
            name = f"node{number}"
            ws_port, http_port = free_port(), free_port()
            argv = [PYTHON, "-m", "websocketserver", "--listen_address", HOST,
                    "--http_directory", str(www), "--http_port", str(http_port),
                    "--verbose", "0", "--remote_session_config", str(services),
                    "--users_file", str(users), "--groups_file", str(groups),
                    "--timeout", "86400", "--redis", self.redis.url,
                    "--cluster_secret", CLUSTER_SECRET, "--node_name", name, str(ws_port)]
            proc = self.procs.spawn(name, argv, env=OURS.env())
            self.instances.append(Instance(name, proc, ws_port, http_port,
                                           self.out_dir / f"{name}.log"))
        for instance in self.instances:
            for port in (instance.ws_port, instance.http_port):
                wait_listening(instance.proc, port, instance.name, instance.log)

    def admin(self) -> Any:
        assert self.redis is not None
        return self.redis.admin()

    def run(self) -> list[Point]:
        self.redis = Redis(self.procs, self.out_dir)
        admin = self.admin()
        admin.config_set("slowlog-log-slower-than", SLOWLOG_MICROSECONDS)
        admin.config_set("slowlog-max-len", 10_000)
        self.start()
        self.view()
        for count in self.plan.counts:
            self.points.append(self.measure(count))
        return self.points

    def view(self) -> None:
        """The viewer's 10 reservations (on any instances: Redis places them)."""

        async def reserve() -> None:
            for number in range(VISIBLE):
                port = self.ports[number % INSTANCES]
                transport, http = await _connect(port)
                try:
                    status, body = await http.get(_get("/v1/reserve/view", port, VIEWER_KEY))
                finally:
                    transport.close()
                if status != 200:
                    raise BenchError(f"reserve view answered {status}: {body[:200]!r}")

        asyncio.run(reserve())

    def cpu_split(self) -> tuple[float, float]:
        """(CPU seconds of the whole machine so far, of this benchmark's processes so
        far): user + nice + system time of all CPUs, and this process's and its
        children's trees. The difference over a window is what other processes took
        (a test suite in another terminal, say)."""
        times = psutil.cpu_times()
        machine_cpu = times.user + times.nice + times.system
        mine = psutil.Process().cpu_times()
        ours = mine.user + mine.system + sum(tree_cpu(proc.pid)[0]
                                             for proc in self.procs.procs)
        return machine_cpu, ours

    def measure(self, count: int) -> Point:
        assert self.redis is not None
        point = Point(count)
        wanted = count - self.total
        if wanted < 0:
            raise BenchError(f"the cluster holds {self.total:,} reservations already, more "
                             f"than {count:,}")
        log(f"N = {count:,}: making {wanted:,} more reservations")
        started = time.monotonic()
        point.held = self.total
        for _round in range(5):  # what answered 503 and was not booked: again
            failed = asyncio.run(fill(self.ports, self.made, count - point.held,
                                      self.plan.fill_parallel, 900))
            self.made += count - point.held
            held = self.held()
            if held is None:
                log("  could not count the reservations; assuming what was asked for")
                held = count
            point.held = held
            if failed:
                log(f"  {failed} reserves answered 503; the cluster holds {point.held:,}")
            if point.held >= count:
                break
        else:
            raise BenchError(f"the cluster holds {point.held:,} reservations after five "
                             f"rounds of filling, not {count:,}")
        point.fill_seconds = time.monotonic() - started
        log(f"  filled in {point.fill_seconds:.1f} s ({wanted / point.fill_seconds:,.0f}/s)")
        time.sleep(2.0)  # let the last calls' after-effects settle
        admin = self.admin()
        admin.slowlog_reset()
        self.mark_logs()
        window = time.monotonic()
        cpu_before = self.cpu_split()

        # idle: no requests at all
        redis_before = tree_cpu(self.redis.proc.pid)[0]
        instances_before = sum(tree_cpu(i.proc.pid)[0] for i in self.instances)
        idle_start = time.monotonic()
        time.sleep(self.plan.idle_seconds)
        idle = time.monotonic() - idle_start
        point.redis_idle = (tree_cpu(self.redis.proc.pid)[0] - redis_before) / idle * 100
        point.instances_idle = (sum(tree_cpu(i.proc.pid)[0] for i in self.instances)
                                - instances_before) / idle * 100
        log(f"  idle: redis-server {point.redis_idle:.1f} %, "
            f"instances {point.instances_idle:.1f} % of one CPU")

        durations, point.status_errors = asyncio.run(status_calls(
            self.ports, self.plan.status_calls, self.plan.status_seconds))
        point.status_ms = [d * 1e3 for d in durations]
        if not durations:
            raise BenchError(f"/v1/status never answered 200 at N = {count}")
        log(f"  /v1/status ({len(durations)} calls, {point.status_errors} failed): "
            f"p50 {point.status_p50:.1f} ms, max {max(point.status_ms):.1f} ms")

        reply = asyncio.run(reserve_rate(self.ports, self.plan.rate_parallel,
                                         self.plan.rate_seconds, 0.3))
        point.rate = reply["cycles"] / self.plan.rate_seconds
        point.rate_calls, point.rate_errors = reply["calls"], reply["errors"]
        point.reserve_ms = sorted(d * 1e3 for d in reply["reserves"])
        if point.rate_errors * 2 > point.rate_calls:
            raise BenchError(f"reserve rate at N = {count}: {point.rate_errors} of "
                             f"{point.rate_calls} calls failed")
        log(f"  reserve+release: {point.rate:,.0f}/s, reserve p50 {point.reserve_p(0.5):.1f} "
            f"ms, p99 {point.reserve_p(0.99):.1f} ms ({point.rate_errors} of "
            f"{point.rate_calls} calls failed)")

        elapsed = time.monotonic() - window
        cpu_after = self.cpu_split()
        foreign = (cpu_after[0] - cpu_before[0]) - (cpu_after[1] - cpu_before[1])
        point.other_load = max(0.0, foreign) / (elapsed * (os.cpu_count() or 1))
        self.slowest(point, admin)
        point.warnings = self.new_warnings()
        log(f"  longest Redis command {point.longest_ms} ms ({point.longest_command}); "
            f"{point.warnings} warnings logged; other load {point.other_load:.0%}")
        after = self.held()
        point.left_over = 0 if after is None else max(0, after - point.held)
        self.total = point.held + point.left_over
        if point.left_over:
            log(f"  {point.left_over} reservations of the reserve-rate run were left over "
                "(calls that failed but were booked all the same)")
        return point

    def slowest(self, point: Point, admin: Any) -> None:
        """The longest command in Redis's SLOWLOG since it was reset."""
        entries = [entry for entry in admin.slowlog_get(10_000)
                   if not _text(entry["command"]).upper().startswith(OWN_COMMANDS)]
        if not entries:
            return
        top = max(entries, key=lambda entry: entry["duration"])
        point.longest_ms = top["duration"] / 1e3
        point.longest_command = _text(top["command"])[:60]
        (self.out_dir / f"slowlog-{point.count}.json").write_text(json.dumps(
            [{"duration_us": e["duration"], "command": _text(e["command"])[:400]}
             for e in sorted(entries, key=lambda e: -e["duration"])], indent=1))

    def mark_logs(self) -> None:
        for instance in self.instances:
            self.log_sizes[instance.name] = instance.log.stat().st_size

    def new_warnings(self) -> int:
        """WARNING/ERROR lines the instances logged since ``mark_logs``."""
        found = 0
        for instance in self.instances:
            with instance.log.open("rb") as stream:
                stream.seek(self.log_sizes.get(instance.name, 0))
                found += sum(1 for line in stream
                             if b"WARNING" in line or b"ERROR" in line)
        return found

    def held(self) -> int | None:
        """How many reservations the cluster holds, by ``/v1/metrics``
        (``websocketserver_reservations``, summed over services and states); None if
        it did not answer 200 in ten tries (a store too slow to list them)."""

        async def total() -> int | None:
            port = self.ports[0]
            transport, http = await _connect(port)
            try:
                for _attempt in range(10):
                    status, body = await http.get(_get("/v1/metrics", port, FILLER_KEY))
                    if status == 200:
                        break
                    await asyncio.sleep(1.0)
                else:
                    log(f"  /v1/metrics answered {status}: {body[:200]!r}")
                    return None
            finally:
                transport.close()
            found = 0.0
            for line in body.decode().splitlines():
                if line.startswith("websocketserver_reservations{"):
                    found += float(line.rsplit(" ", 1)[1])
            return round(found)

        return asyncio.run(total())


def _text(command: str | bytes) -> str:
    return command if isinstance(command, str) else command.decode(errors="replace")


# -- the table ------------------------------------------------------------------------


def _cell(value: float | None, base: float | None, higher_is_worse: bool = True,
          digits: int = 1, floor: float = 0.0) -> tuple[str, bool | None]:
    """``value (ratio×)`` and whether it is within TARGET of ``base``, both taken as at
    least ``floor`` for that (the noise of the measurement)."""
    if value is None:
        return "—", None
    text = f"{value:,.{digits}f}"
    if base is None or base <= 0:
        return text, None
    ratio = value / base
    judged = max(value, floor) / max(base, floor)
    holds = judged <= TARGET if higher_is_worse else judged >= 1 / TARGET
    return f"{text} ({ratio:.2f}×)", holds


def render(points: Sequence[Point], plan: Plan) -> str:
    head = ["reservations", "/v1/status p50 (ms)", "Redis idle CPU (%)",
            "instances idle CPU (%)", "reserves/s", "reserve p99 (ms)",
            "longest Redis command (ms)",
            "within 3× of first", "other load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = points[0]
    for point in points:
        cells = [f"{point.count:,}" + (f" ({point.held:,} held)" if point.held != point.count
                                       else "")]
        misses = []
        for name, value, first, worse in (
                ("status", point.status_p50, base.status_p50, True),
                ("Redis CPU", point.redis_idle, base.redis_idle, True),
                ("instance CPU", point.instances_idle, base.instances_idle, True),
                ("reserves", point.rate, base.rate, False)):
            text, holds = _cell(value, first, worse, 0 if name == "reserves" else 1,
                                CPU_FLOOR if "CPU" in name else 0.0)
            if name == "status" and point.status_errors:
                text += f", {point.status_errors} failed"
            if name == "reserves" and point.rate_errors:
                text += f", {point.rate_errors} failed calls"
            cells.append(text)
            if holds is False:
                misses.append(name)
        cells.append(_cell(point.reserve_p(0.99), base.reserve_p(0.99))[0])
        longest, _ = _cell(point.longest_ms, base.longest_ms, digits=2)
        cells.append(longest if point.longest_ms is not None
                     else f"< {SLOWLOG_MICROSECONDS / 1e3:g}")
        cells.append("—" if point is base else
                     ("yes" if not misses else "**NO**: " + ", ".join(misses)))
        cells.append(f"{point.other_load:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Three clustered instances and one redis-server on loopback; N = all reservations "
        "in the cluster, unused. (×) = ratio to the figure at the first N; the target "
        f"(issue 22) is within {TARGET:g}× (reserves/s: at least 1/{TARGET:g} of it). "
        f"/v1/status: a caller who sees {VISIBLE} of them (one service); p50 of sequential "
        "calls over the three instances. Idle CPU: no requests at all, in % of one CPU; "
        f"instances = the sum of the three process trees; judged against the target as at "
        f"least {CPU_FLOOR:g} % each (below that, tick-sized noise). reserves/s: reserve + release "
        f"of a small separate service, {plan.rate_parallel} client tasks over kept-alive "
        "connections; reserve p99: "
        "of those reserve calls (no target). Longest "
        "Redis command: SLOWLOG, over the idle, status and reserve measurements. "
        "Other load: the share of all CPUs that processes not started by the benchmark "
        "took during those measurements (the machine's user + system time minus the "
        "benchmark's processes'); above a few % the figures are disturbed.",
    ]
    over = [f"{p.count:,}: {p.left_over}" for p in points if p.left_over]
    if over:
        lines.append(f"Reservations the reserve-rate run left behind (failed calls booked all "
                     f"the same; N: count): {', '.join(over)}.")
    warned = [f"{p.count:,}: {p.warnings}" for p in points if p.warnings]
    if warned:
        lines.append(f"Warnings logged by the instances meanwhile (N: lines): "
                     f"{', '.join(warned)}.")
    return "\n".join(lines)


def _cpu_now() -> tuple[float, float]:
    """(user + nice + system seconds of all CPUs, this process's and every child's it
    has reaped): once all the benchmark's processes are reaped, the difference of the
    two over the run is what other processes took. (run.py's ``other_load`` sums the
    other processes instead, counting a long-lived child they reap, e.g. a test
    server, in full.)"""
    times = psutil.cpu_times()
    mine = psutil.Process().cpu_times()
    return (times.user + times.nice + times.system,
            mine.user + mine.system + mine.children_user + mine.children_system)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; the exit status (1 if a measurement failed, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog="cluster.py --scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="N = 50, 1,000, 5,000 and shorter measurements (~1 min)")
    parser.add_argument("--counts", help="comma-separated reservation counts, growing "
                        "(default 50,5000,20000; the first is the reference)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.counts:
        counts = tuple(int(c.replace("_", "")) for c in args.counts.split(","))
        if list(counts) != sorted(set(counts)) or counts[0] < VISIBLE:
            parser.error(f"--counts: growing numbers, each at least {VISIBLE}")
        plan = Plan(**{**asdict(plan), "counts": counts})
    raise_nofile_limit()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out_dir = BENCH_DIR / "results" / datetime.datetime.now().strftime(
        "cluster-scale-%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    load = os.getloadavg()
    bench = Bench(plan, out_dir)
    started, machine_before, mine_before = time.monotonic(), *_cpu_now()
    try:
        points = bench.run()
    except BenchError as exc:
        log(f"benchmark failed: {exc}\n(logs in {out_dir})")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping every process the benchmark started")
        return 130
    finally:
        bench.close()
    seconds = time.monotonic() - started
    machine_after, mine_after = _cpu_now()
    other_load = max(0.0, (machine_after - machine_before) - (mine_after - mine_before)) / (
        seconds * (os.cpu_count() or 1))
    if other_load > 0.05:
        log(f"warning: other processes used {other_load:.0%} of the CPUs during the run; "
            "the numbers are disturbed")
    redis_version = bench.redis.version if bench.redis else "?"
    header = (f"cluster scaling benchmark, {'quick' if args.quick else 'full'} run, "
              f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine()}; "
              f"{versions(redis_version)}; load average at start {load[0]:.2f}; "
              f"{seconds:.0f} s, other load {other_load:.0%}; filled in "
              + ", ".join(f"{p.fill_seconds:.0f} s" for p in points))
    table = render(points, plan)
    (out_dir / "table.md").write_text(header + "\n\n" + table + "\n")
    (out_dir / "samples.json").write_text(json.dumps([asdict(p) for p in points], indent=1))
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
