"""Cluster test helpers: a real ``redis-server`` and a real ``haproxy`` on free ports.

Both are installed by ``scripts/install-test-deps`` (Debian packages, their system
services kept stopped); a test that needs one skips when it is missing and we are not
root, and fails when we are root (then the installer should have put it there).
Fixtures (``pytest_plugins = ["cluster_support"]`` in a test module):

* ``redis_server``: a started :class:`RedisServer` (AOF, ``noeviction``, no RDB
  snapshots, the default user off, an ACL user limited to the store's keys and
  commands), with :meth:`RedisServer.kill` and :meth:`RedisServer.restart` keeping the
  port and the AOF; always stopped;
* ``start_haproxy``: ``start_haproxy([(ws_port, http_port), ...])`` runs
  ``deploy/haproxy.cfg`` with those backends and free front ports; always stopped;
* ``tcp_proxy``: ``tcp_proxy(port)`` is a :class:`TcpProxy` to 127.0.0.1:``port`` that
  a test can make unreachable (a network partition) and reachable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from support import ROOT, free_port, wait_port

REDIS_USER = "websocketserver"
KEY_PREFIX = "websocketserver:"
REDIS_ACL = (f"on ~{KEY_PREFIX}* resetchannels &{KEY_PREFIX}* -@all "
             "+evalsha +eval +script|load +subscribe +unsubscribe +ping +select "
             "+hget +hset +hdel +hvals +hkeys +hincrby +time +publish +zadd +zrem +zrangebyscore "
             "+zremrangebyscore")
"""The ACL the store needs, as docs/cluster.md's Redis settings give it (password added)."""


def require(binary: str) -> str:
    """The path of ``binary``; skip when missing and not root, fail when root."""
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if path is not None:
        return path
    if os.geteuid() != 0:
        pytest.skip(f"{binary} not installed (scripts/install-test-deps as root installs it)")
    pytest.fail(f"{binary} missing although running as root: run scripts/install-test-deps")


class RedisServer:
    """``redis-server`` on 127.0.0.1:``port`` with its data (the AOF) in ``directory``."""

    def __init__(self, directory: Path, appendfsync: str = "everysec") -> None:
        self.binary = require("redis-server")
        self.directory = directory
        self.port = free_port()
        self.password = os.urandom(12).hex()
        self.config = directory / "redis.conf"
        self.config.write_text(
            f"bind 127.0.0.1\nport {self.port}\nprotected-mode yes\ndaemonize no\n"
            f"dir {directory}\nlogfile {directory / 'redis.log'}\n"
            'save ""\nappendonly yes\n'
            f"appendfsync {appendfsync}\n"
            "maxmemory 256mb\nmaxmemory-policy noeviction\n"
            # "off": nobody logs in as default; its rights stay: Redis 7.0 replays the
            # AOF's transactions (each script's writes) as the default user, and one
            # without rights would drop them at a restart (redis/redis#14541)
            "user default off ~* &* +@all\n"
            f"user {REDIS_USER} {REDIS_ACL} >{self.password}\n"
            f"user admin on ~* &* +@all >{self.password}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{REDIS_USER}:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client with every right (to look at or change the data)."""
        return redis.Redis(host="127.0.0.1", port=self.port, username="admin",
                           password=self.password, decode_responses=True, socket_timeout=5)

    def start(self) -> None:
        """Start it (again, on the same port and data) and wait until it answers."""
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen([self.binary, str(self.config)],
                                     stdout=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        deadline = time.monotonic() + 15
        with self.client() as client:
            while True:
                try:
                    client.ping()  # LOADING while the AOF is replayed
                    return
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL it: no shutdown, what it has written to its AOF stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    yield server
    server.close()


class HAProxy:
    """``haproxy`` running ``deploy/haproxy.cfg`` in front of the given instances.

    The config's ``global`` section is replaced (no syslog or user switch in a test);
    the ``bind`` of frontend ``ws``/``http`` gets the free port ``ws_port``/``http_port``
    on 127.0.0.1, and each backend's example servers become one line per instance of
    ``backends`` (ws port, HTTP port), with the options of the example's first line.
    """

    def __init__(self, directory: Path, backends: list[tuple[int, int]]) -> None:
        self.binary = require("haproxy")
        self.ws_port, self.http_port = free_port(), free_port()
        self.config = directory / "haproxy.cfg"
        self.config.write_text(self.render((ROOT / "deploy" / "haproxy.cfg").read_text(),
                                           backends))
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(self.config)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.log_path = directory / "haproxy.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.ws_port, proc=self.proc)
        wait_port(self.http_port, proc=self.proc)

    def render(self, template: str, backends: list[tuple[int, int]]) -> str:
        out = ["global", "    maxconn 4096", "    log stdout format raw local0 info"]
        section: list[str] = []
        for line in template.splitlines():
            words = line.split()
            if words and not line[0].isspace() and not line.startswith("#"):
                section = words
            if section[:1] == ["global"] or not words:
                continue
            if words[0] == "bind":
                port = self.ws_port if section == ["frontend", "ws"] else self.http_port
                out.append(f"    bind 127.0.0.1:{port}")
            elif words[0] == "server":
                if out[-1].split()[:1] == ["server"]:
                    continue  # the example's other servers
                ws = section[-1].endswith("_ws")
                options = re.sub(r"\bport \d+", "port {http}", " ".join(words[3:]))
                for number, (ws_port, http_port) in enumerate(backends):
                    out.append(f"    server node{number} 127.0.0.1:"
                               f"{ws_port if ws else http_port} "
                               + options.format(http=http_port))
            else:
                out.append(line)
        return "\n".join(out) + "\n"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[Callable[[list[tuple[int, int]]], HAProxy]]:
    started: list[HAProxy] = []

    def start(backends: list[tuple[int, int]]) -> HAProxy:
        directory = tmp_path / f"haproxy{len(started)}"
        directory.mkdir()
        proxy = HAProxy(directory, backends)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


class TcpProxy:
    """A TCP forwarder from a free port to 127.0.0.1:``target``, in its own thread.

    :meth:`blackhole` makes the target unreachable the way a network partition does:
    connections are accepted but nothing passes either way, so clients time out.
    :meth:`restore` closes every connection (as a partition's end does, eventually)
    and forwards again.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.passing = True
        self._connections: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            ready.set()
        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = [writer]
        self._connections.add(writer)
        try:
            if not self.passing:
                await reader.read()  # held until the client or restore() closes it
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            mine.append(up_writer)
            self._connections.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            for each in mine:
                self._connections.discard(each)
                each.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self.passing:
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.close()  # half of a pair gone: end the other half too

    def blackhole(self) -> None:
        self.passing = False

    def restore(self) -> None:
        def close_all() -> None:
            for writer in list(self._connections):
                writer.transport.abort()
            self._connections.clear()
        self._loop.call_soon_threadsafe(close_all)
        self.passing = True

    def close(self) -> None:
        self.restore()

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    started: list[TcpProxy] = []

    def start(target: int) -> TcpProxy:
        proxy = TcpProxy(target)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()
