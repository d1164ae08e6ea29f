"""The server's lifecycle: start both listeners, serve, and shut down in order.

Shutdown is one path whatever asks for it (``/v1/stop``, SIGTERM, SIGINT, SIGHUP):
refuse new work, close every tunnel (each one stops its service), stop the
listeners, exit 0. :func:`run` wraps it all in the supervisor of
:mod:`.processes`, which then ends any process that is still left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from . import processes
from .http_port.api import RestApi
from .http_port.files import FileServer
from .http_port.port import HttpPort
from .identity import Identity
from .install import log_install
from .limits import watch_descriptors
from .logs import configure_logging
from .metrics import Metrics
from .sessions.reservations import MemoryStore, ReservationStore
from .sessions.services import ServiceManager
from .settings import Settings, SettingsError
from .startup import listen_error, log_startup, program_name
from .tasks import Tasks
from .websocket_port.gateway import WebSocketGateway
from .websocket_port.relay import RelayPool

if TYPE_CHECKING:
    from .cluster.membership import Cluster

log = logging.getLogger("websocketserver.server")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt() parameters (malloc.h)

SHUTDOWN_TIMEOUT = 15.0
"""Upper bound for closing tunnels and stopping services at exit."""

Listen = Callable[[int, ssl.SSLContext | None], Awaitable[list[tuple[str, int]]]]


class Server:
    """Both listeners and everything behind them; ``start``, ``wait``, ``close``.

    What ``start`` opens is pushed on an exit stack as it opens, and ``close`` unwinds
    it in reverse, every step even if an earlier one failed: the services' reclaimer,
    then the websocket port (its tunnels stop their services; the relays), then the
    HTTP port.
    """

    def __init__(self, settings: Settings, relays: RelayPool | None = None) -> None:
        self.settings = settings
        self._stop = asyncio.Event()
        self._stack = contextlib.AsyncExitStack()
        self.identity = Identity(settings)
        self.metrics = Metrics()
        store: ReservationStore
        if settings.redis is not None:
            from .cluster.membership import Cluster  # imported here: redis-py costs ~80 ms a start
            from .cluster.redis_store import RedisStore

            store = RedisStore(
                settings.redis, settings.node_name,
                f"{settings.node_address}:{settings.ws_port}",
                {s.name: s.count for s in settings.services},
                [s.name for s in settings.services if s.cluster_scope], settings.heartbeat_ttl,
                secret=(settings.cluster_secret or "").encode())
            self.cluster: Cluster | None = Cluster(settings, store)
        else:
            store, self.cluster = MemoryStore(), None
        self.services = ServiceManager(settings, store, self.identity, self.metrics)
        self.gateway = WebSocketGateway(settings, self.services, self.identity, self.metrics,
                                        relays, self.cluster)
        self.http = (HttpPort(settings,
                              RestApi(self.services, settings.security_token,
                                      self.request_stop, settings.node_name,
                                      self._stop.is_set),
                              FileServer(settings.http_directory, settings.ansys_install_root),
                              self.metrics)
                     if settings.http_directory is not None else None)
        self._started = False  # close() reports a shutdown only of a server that started


    def request_stop(self) -> None:
        """Begin the graceful shutdown (after the current request is answered)."""
        self._stop.set()

    async def start(self) -> None:
        """Open the listeners; a port in use is a :class:`SettingsError`."""
        log_install(self.settings)
        context = self.settings.ssl_context()
        stack = self._stack
        if self.cluster is not None:  # registered first, left last
            stack.push_async_callback(self.cluster.close)
            await self.cluster.start(self.services.end_here, self.services.end_all_and_wait,
                                     self.services.adopt)
        if self.http is not None:
            stack.push_async_callback(self.http.close)
            await self._open("http", self.settings.http_port, context, self.http.listen)
        stack.push_async_callback(self.gateway.close, SHUTDOWN_TIMEOUT)
        if self.settings.ws_port != -1:
            await self._open("ws", self.settings.ws_port, context, self.gateway.listen)
            watching = Tasks(log)
            watching.spawn(watch_descriptors(self.settings.ws_port), "descriptor watch")
            stack.push_async_callback(watching.cancel)
        stack.push_async_callback(self.services.close)
        await self.services.jobs.cancel_left_jobs()
        if self.cluster is None and self.services.jobs.any:
            # a killed server's jobs: its supervisor cancels them (a cluster's jobs
            # outlive an instance: another one adopts them)
            processes.on_death(self.services.jobs.scancel_all())
        self.services.start_reclaiming()
        self.gateway.start_sweeping()
        log_startup(self.settings, log)
        self._started = True

    async def _open(self, name: str, port: int, context: ssl.SSLContext | None,
                    listen: Listen) -> None:
        try:
            addresses = await listen(port, context)
        except OSError as exc:
            raise SettingsError(listen_error(name, port, exc)) from None
        for address in addresses:
            log.debug("listening for %s%s on %s:%s", name, "s" if context else "", *address[:2])

    async def wait(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Unwind what ``start`` opened, in reverse; bounded by SHUTDOWN_TIMEOUT."""
        if self._started:
            log.info("shutting down")
        await self._stack.aclose()
        if self._started:
            log.info("stopped")


async def serve(settings: Settings, relays: RelayPool | None = None) -> None:
    """Run a server until it is asked to stop; SIGTERM/SIGINT/SIGHUP ask too."""
    server = Server(settings, relays)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, server.request_stop)
    try:
        await server.start()
        gc.freeze()  # start-up objects live for ever: keep them out of collections
        await server.wait()
    finally:
        await server.close()


def _raise_file_limit(wanted: int = 65536) -> None:
    """Each tunnel holds two sockets: allow ``wanted`` open files if we may (root may
    raise the hard limit), else as many as the hard limit lets us."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(wanted, hard), hard):
        with contextlib.suppress(ValueError, OSError):
            if limit > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return


def _tune_allocator() -> None:
    """Keep glibc from mapping and unmapping a fresh buffer for every socket read.

    uvloop reads into a new buffer of up to 256 KiB each time; above glibc's default
    thresholds each one is an mmap, page faults and a munmap, which cost the
    downstream relay about as much as the copying itself (see bench/README.md).
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 4 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 * 1024 * 1024)


def _serve_process(settings: Settings) -> int:
    _raise_file_limit()
    _tune_allocator()
    try:
        configure_logging(settings)
    except OSError as exc:
        print(f"{program_name(sys.argv[0])}: error: --log_file {settings.log_file}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvloop is not available on Windows
        loop_factory = None
    relays = (RelayPool.fork(settings, settings.relay_processes)
              if _relaying(settings) else None)
    if relays is not None:
        processes.spare(relays.pids)  # not a session's: a lapsed lease leaves them
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings, relays))
    except SettingsError as exc:
        print(f"{program_name(sys.argv[0])}: error: {exc}", file=sys.stderr)
        return 1
    except Exception:
        log.exception("internal error; the server stopped")
        return 1
    return 0


def _relaying(settings: Settings) -> bool:
    """Relay processes serve basic mode on a plain websocket port (a TLS session cannot
    move between processes), on Linux (``SOCK_SEQPACKET`` Unix sockets, fork)."""
    return (settings.relay_processes > 0 and settings.ws_port != -1
            and settings.client_port is not None and settings.cert is None
            and sys.platform == "linux")


def run(settings: Settings) -> int:
    """Run the server process under the no-orphans supervisor; return the exit status."""
    return processes.run_supervised(lambda: _serve_process(settings))
