"""Test helpers: free ports, the real server as a subprocess, process-tree checks."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LAUNCHER = ROOT / "websocketserver.py"


_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw0", "gw1"... under pytest-xdist
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux's default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_POOL = range(10000, max(_ephemeral_low(), 12000))
_next = random.Random(os.getpid()).randrange(len(_POOL))


def free_port() -> int:
    """A free 127.0.0.1 port, from this pytest-xdist worker's share of the ports.

    A port is free between this call and the bind that uses it, so: the shares are
    disjoint (else another worker could draw the same port in that gap and one test
    would talk to the other's server), and they lie below the kernel's range for
    outgoing connections (else any client's connection could take the port in that
    gap: with tens of thousands of connections a run, it happened).
    """
    global _next
    index = int(_WORKER.removeprefix("gw"))
    for _ in range(len(_POOL)):
        port = _POOL[_next % len(_POOL)]
        _next += 1
        if port % _WORKERS != index:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or its connections are still in TIME_WAIT
            return port
    raise RuntimeError(f"no free port in {_POOL.start}-{_POOL.stop - 1}")


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Wait until 127.0.0.1:port accepts a connection."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"port {port} did not open") from None
            time.sleep(0.01)  # a refused connection costs nothing; a server starts in ~0.35 s


class EchoBackend:
    """examples/echo_server.py running as a real process on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "echo_server.py"), str(self.port)])
        wait_port(self.port, proc=self.proc)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


BYTECODE: dict[str, str] = {}
"""The environment for a Python process to keep bytecode where it may write none."""
if os.environ.get("PYTHONDONTWRITEBYTECODE") and "PYTHONPYCACHEPREFIX" not in os.environ:
    # Where Python may not write bytecode (this variable set), every server would compile
    # the package's sources again: ~0.07 s of each start's ~0.45 s of CPU, ~150 starts a
    # run. The servers keep theirs in a cache of their own instead (outside the tree;
    # Python checks each file against its source, as always).
    BYTECODE = {"PYTHONDONTWRITEBYTECODE": "",
                "PYTHONPYCACHEPREFIX": os.path.join(tempfile.gettempdir(),
                                                    f"websocketserver-tests-{os.getuid()}",
                                                    "pycache")}


class ServerProcess:
    """The real command line as a subprocess; :meth:`start` builds a typical one."""

    def __init__(self, argv: list[str], *, ws_port: int, http_port: int | None,
                 token: str | None = None, tls: tuple[Path, Path] | None = None,
                 log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.ws_port, self.http_port, self.token, self.tls = ws_port, http_port, token, tls
        self.log_path = (log_dir or Path("/tmp")) / f"server-{ws_port}-{http_port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **BYTECODE, **(env or {})})
        self.pid = self.proc.pid
        self._serving_pid: int | None = None
        for port in (ws_port, http_port):
            if port is not None and port != -1:
                wait_port(port, proc=self.proc)

    @classmethod
    def start(cls, *args: str, ws_port: int | None = None, http: bool = True,
              http_port: int | None = None,
              http_dir: Path | None = None, token: str | None = "K",
              tls: tuple[Path, Path] | None = None, log_dir: Path | None = None,
              env: dict[str, str] | None = None) -> ServerProcess:
        """``websocketserver.py`` on 127.0.0.1 and free ports, with ``args`` added."""
        ws_port = free_port() if ws_port is None else ws_port
        http_port = (http_port or free_port()) if http else None
        argv = [sys.executable, str(LAUNCHER), "--listen_address", "127.0.0.1"]
        if http_port is not None:
            argv += ["--http_directory", str(http_dir or ROOT / "demo" / "www"),
                     "--http_port", str(http_port)]
        if token is not None:
            argv += ["--security_token", token]
        if tls is not None:
            argv += ["--cert", str(tls[0]), "--key", str(tls[1])]
        argv += [*args, str(ws_port)]
        return cls(argv, ws_port=ws_port, http_port=http_port, token=token, tls=tls,
                   log_dir=log_dir, env=env)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def ws_url(self, path: str = "/websockify", **query: str) -> str:
        scheme = "wss" if self.tls else "ws"
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"{scheme}://127.0.0.1:{self.ws_port}{path}" + (f"?{qs}" if qs else "")

    def url(self, path: str, *, auth: bool = True) -> str:
        if auth and self.token is not None and path.startswith("/v"):
            path += ("&" if "?" in path else "?") + f"security_token={self.token}"
        return f"{self.scheme}://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str, *, auth: bool = True, headers: dict[str, str] | None = None,
            context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET a path; returns (status, headers, body) for any status."""
        request = urllib.request.Request(self.url(path, auth=auth), headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get_json(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, _, body = self.get(path, **kwargs)
        return status, json.loads(body)

    def descendants(self) -> list[psutil.Process]:
        """Live (non-zombie) processes below the server's top process."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
        return alive

    def tree_rss(self) -> int:
        """RSS of the server's whole process tree (supervisor, server, relays)."""
        total = 0
        for proc in [psutil.Process(self.pid), *self.descendants()]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def serving_pid(self) -> int:
        """The server process proper: the supervisor's child running the same command."""
        if self._serving_pid is None:
            supervisor = psutil.Process(self.pid)
            self._serving_pid = self.pid  # unless supervised (Linux)
            for child in supervisor.children():
                with contextlib.suppress(psutil.Error):
                    if child.cmdline() == supervisor.cmdline():
                        self._serving_pid = child.pid
        return self._serving_pid

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and check nothing it started is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                for child in self.descendants():
                    with contextlib.suppress(psutil.Error):
                        child.kill()
                self.proc.kill()
                self.proc.wait()
        self._log.close()


StartServer = Callable[..., ServerProcess]
"""The ``start_server`` fixture: ``ServerProcess.start``, each server stopped after the test."""


def marked_processes(server: ServerProcess | None = None) -> list[psutil.Process]:
    """Live processes that service instances started (of one server, or of any)."""
    prefix = f"{server.serving_pid()}-" if server is not None else ""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            marker = proc.environ().get("WEBSOCKETSERVER_INSTANCE")
            if marker is not None and marker.startswith(prefix) and \
                    proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``.

    The first polls come sooner (a fifth of ``interval``, doubling up to it): most
    conditions hold within a few tens of milliseconds."""
    deadline = time.monotonic() + timeout
    pause = interval / 5
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(pause)
        pause = min(pause * 2, interval)


async def recv_bytes(ws: ClientConnection) -> bytes:
    """The next message on ``ws``, which must be binary."""
    message = await ws.recv()
    assert isinstance(message, bytes), f"a text message where a binary one was due: {message!r}"
    return message


def received_close(closed: ConnectionClosed) -> Close:
    """The close frame the server sent before ``closed``; the test fails if it sent none."""
    assert closed.rcvd is not None, f"closed without a close frame: {closed}"
    return closed.rcvd
