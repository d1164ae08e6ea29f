"""Soak: hold many idle tunnels for minutes while churning reservations; report leaks.

    python bench/soak.py                 # 10,000 idle tunnels, 10 minutes, 100 cycles/s
    python bench/soak.py --quick         # 1,000 idle tunnels, 1 minute

A cycle is: reserve a service over REST, open a websocket with the token (the server
"starts" the service), one echo, close (the server stops it, the slot is freed); then
one basic-mode tunnel (relayed by a relay process), one echo, close. Snapshots of the
server (RSS and open fds summed over the main and relay processes, asyncio tasks of
the main process, relay and service processes, reservations, open tunnels) are taken
after the idle tunnels are up, every minute, after the churn and after the idle
tunnels are closed; the report compares them. Exit status 1 when something leaked,
0 otherwise. Every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

import aiohttp
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKEN = "soak"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def echo_backend(port: int) -> None:
    """The shared TCP echo backend (run in its own process with --backend)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            argv = cast(list[str], proc.args)  # Soak starts every process from a list
            raise SystemExit(f"soak: process {argv[:3]} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: port {port} did not open")
        time.sleep(0.05)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.backend_port, self.ws_port, self.http_port = free_port(), free_port(), free_port()
        self.cycles = 0
        self.failures: list[str] = []
        self.snapshots: list[tuple[str, dict[str, float]]] = []

    def start(self) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, __file__, "--backend", str(self.backend_port)],
            start_new_session=True))
        wait_port(self.backend_port, self.procs[-1])
        config = self.workdir / "services.json"
        config.write_text(json.dumps({"soak": {
            "script": str(HERE / "soak_service.py"), "count": 512,
            "options": {"port": self.backend_port}}}))
        (self.workdir / "www").mkdir()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "websocketserver", "--listen_address", "127.0.0.1",
             "--http_directory", str(self.workdir / "www"), "--http_port", str(self.http_port),
             "--client_port", str(self.backend_port), "--remote_session_config", str(config),
             "--security_token", TOKEN, "--max_tunnels", "100000",
             "--max_tunnels_per_client", "100000", "--log_file",
             str(self.workdir / "server.log"), str(self.ws_port)],
            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        self.procs.append(self.server)
        wait_port(self.ws_port, self.server)
        wait_port(self.http_port, self.server)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    async def snapshot(self, session: aiohttp.ClientSession, label: str) -> None:
        supervisor = psutil.Process(self.server.pid)
        [serving] = supervisor.children()
        relays = [c for c in serving.children() if c.cmdline() == serving.cmdline()]
        tree = [serving, *relays]  # the idle basic-mode tunnels live in the relays
        async with session.get(f"http://127.0.0.1:{self.http_port}/v1/metrics",
                               params={"security_token": TOKEN}) as response:
            text = await response.text()
        metrics = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                   if line and not line.startswith("#")}
        reservations = sum(v for k, v in metrics.items()
                           if k.startswith("websocketserver_reservations{"))
        self.snapshots.append((label, {
            "RSS MB": sum(proc.memory_info().rss for proc in tree) / 1e6,
            "open fds": sum(proc.num_fds() for proc in tree),
            "asyncio tasks": metrics["websocketserver_asyncio_tasks"],
            "relay processes": len(relays),
            "service processes": len(serving.children(recursive=True)) - len(relays),
            "reservations": reservations,
            "tunnels open": metrics["websocketserver_tunnels_open"],
            "cycles done": self.cycles,
        }))
        print(f"soak: {label}: " + ", ".join(f"{k} {v:,.0f}"
                                              for k, v in self.snapshots[-1][1].items()),
              file=sys.stderr, flush=True)

    async def hold_idle(self, session: aiohttp.ClientSession, count: int
                        ) -> list[aiohttp.ClientWebSocketResponse]:
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        gate = asyncio.Semaphore(64)

        async def one() -> None:
            async with gate:
                ws = await session.ws_connect(f"ws://127.0.0.1:{self.ws_port}/websockify")
                await ws.send_bytes(b"idle")
                assert (await ws.receive(timeout=30)).data == b"idle"
                sockets.append(ws)

        await asyncio.gather(*(one() for _ in range(count)))
        return sockets

    async def cycle(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(f"http://127.0.0.1:{self.http_port}/v1/reserve/soak",
                                   params={"security_token": TOKEN}) as response:
                token = (await response.json())["token"]
            async with session.ws_connect(f"ws://127.0.0.1:{self.ws_port}/websockify",
                                          params={"token": token}) as ws:
                await ws.send_bytes(token.encode())
                message = await ws.receive(timeout=30)
                if message.data != token.encode():
                    raise RuntimeError(f"echo mismatch: {message!r}")
            async with session.ws_connect(  # a basic-mode tunnel: through a relay process
                    f"ws://127.0.0.1:{self.ws_port}/websockify") as ws:
                await ws.send_bytes(b"basic")
                message = await ws.receive(timeout=30)
                if message.data != b"basic":
                    raise RuntimeError(f"echo mismatch: {message!r}")
            self.cycles += 1
        except Exception as exc:  # every failure is reported at the end
            self.failures.append(f"{type(exc).__name__}: {exc}")

    async def churn(self, session: aiohttp.ClientSession, seconds: float) -> None:
        began = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        next_snapshot = began + 60
        tick = 0
        while (now := time.monotonic()) < began + seconds:
            for _ in range(self.args.rate // 10):  # launch in tenth-of-a-second batches
                if len(pending) < 256:
                    task = asyncio.create_task(self.cycle(session))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            tick += 1
            if now >= next_snapshot:
                await self.snapshot(session, f"after {round(now - began)} s of churn")
                next_snapshot += 60
            await asyncio.sleep(max(0.0, began + tick / 10 - time.monotonic()))
        await asyncio.gather(*pending)

    async def run(self) -> int:
        # No keep-alive: pooled REST connections would look like leaked fds and tasks.
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            idle = await self.hold_idle(session, self.args.idle)
            await asyncio.sleep(1)
            await self.snapshot(session, f"{len(idle):,} idle tunnels up")
            await self.churn(session, self.args.minutes * 60)
            await asyncio.sleep(2)
            await self.snapshot(session, "churn over")
            await asyncio.gather(*(ws.close() for ws in idle))
            await asyncio.sleep(2)
            await self.snapshot(session, "idle tunnels closed")
        return self.report()

    def report(self) -> int:
        names = list(self.snapshots[0][1])
        print(f"\nsoak: {self.args.idle:,} idle tunnels, {self.args.minutes:g} min of churn "
              f"at {self.args.rate}/s target, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
        print("\n| snapshot | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for label, values in self.snapshots:
            print(f"| {label} | " + " | ".join(f"{values[n]:,.1f}" if n == "RSS MB"
                                              else f"{values[n]:,.0f}" for n in names) + " |")
        up, over, closed = (self.snapshots[0][1], self.snapshots[-2][1], self.snapshots[-1][1])
        leaks = []
        if over["RSS MB"] - up["RSS MB"] > 64:
            leaks.append(f"RSS grew {over['RSS MB'] - up['RSS MB']:.0f} MB during the churn")
        if over["open fds"] > up["open fds"] + 16:
            leaks.append(f"{over['open fds'] - up['open fds']:.0f} more open fds after the churn")
        if over["asyncio tasks"] > up["asyncio tasks"] + 16:
            leaks.append(f"{over['asyncio tasks'] - up['asyncio tasks']:.0f} more tasks")
        if closed["tunnels open"] or closed["reservations"] or closed["service processes"]:
            leaks.append("tunnels, reservations or processes left after everything closed")
        rate = over["cycles done"] / (self.args.minutes * 60)
        print(f"\ncycles: {over['cycles done']:,.0f} ({rate:.0f}/s), failures: "
              f"{len(self.failures)}" + (f" (first: {self.failures[0]})" if self.failures else ""))
        print("leaks: " + ("; ".join(leaks) if leaks else "none"))
        return 1 if leaks or self.failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=10_000, help="idle tunnels to hold")
    parser.add_argument("--minutes", type=float, default=10, help="how long to churn")
    parser.add_argument("--rate", type=int, default=100, help="cycles per second")
    parser.add_argument("--quick", action="store_true", help="1,000 idle, 1 minute")
    parser.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hard = raise_file_limit()
    if args.backend:
        import uvloop
        uvloop.run(echo_backend(args.backend))
        return 0
    if args.quick:
        args.idle, args.minutes = 1_000, 1
    feasible = (hard - 500) // 2  # the server holds two sockets per tunnel
    if args.idle > feasible:
        print(f"soak: the open-file limit ({hard}) allows {feasible:,} idle tunnels, "
              f"not {args.idle:,}; holding {feasible:,}", file=sys.stderr)
        args.idle = feasible
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        soak = Soak(args, Path(workdir))
        try:
            soak.start()
            return asyncio.run(soak.run())
        except KeyboardInterrupt:
            return 130
        finally:
            soak.stop()


if __name__ == "__main__":
    sys.exit(main())
