"""Relay processes: the websocket port's acceptors (the nginx worker model).

Opening a tunnel costs ~150-250 µs of CPU, and one process does that on one core
only. So the main process binds the websocket port before it forks the relays, and
each relay accepts on that inherited socket itself: it reads the upgrade request,
decides on it, checks the limits, answers ``101``, connects the backend and relays,
all in its own process, with no message to the main process. (Never a
``SO_REUSEPORT`` group: any process of the same user, a started service included,
could join it and take connections.)

What a relay does not serve it passes on to the main process, which owns the
sessions: a request with a ``?token=`` or forwarded by another cluster instance goes
there with its socket (``SCM_RIGHTS`` over a ``SOCK_SEQPACKET`` pair) and the bytes
read so far, and is read again there as if it had been accepted there.

The limits stay exact however many processes accept: each counts its tunnels in its
own region of a shared mapping, and a check sums them under one lock
(:mod:`.shared_counts`). The relays count what the metrics show there too; the main
process reads it when ``/v1/metrics`` is scraped.

No relays when the port speaks TLS (a TLS session cannot move to the process that
owns its session) or without ``--client_port`` (no basic mode: every tunnel is a
session's); ``--relay_processes 0`` keeps everything in the main process.

Relays are forked at start-up, before any event loop exists. A relay whose main
process is gone closes its tunnels and exits (and the kernel sends it SIGTERM, see
``PR_SET_PDEATHSIG``); a relay that dies is logged and its tunnels' counts are
cleared; when none is left the main process accepts on the port itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.errors import Refused
from ..core.protocol import FORWARD_HEADER, Policy, UpgradeRequest, decide
from ..identity import Identity
from ..metrics import Tally
from ..processes import die_with_parent
from ..settings import Settings
from .channel import MAX_MESSAGE, Adopt, Channel, Message, Stop
from .handshake import Handshake, write_refusal
from .live import LiveTunnels
from .shared_counts import (
    BYTES_DOWN,
    BYTES_UP,
    OPEN,
    OPENED,
    REFUSALS,
    UPGRADES,
    SharedCounts,
    SharedLimits,
)

if TYPE_CHECKING:
    from ..metrics import Metrics

log = logging.getLogger("websocketserver.relay")

BACKLOG = 1024


def listening_sockets(host: str | None, port: int) -> list[socket.socket]:
    """Sockets listening on ``host:port`` (every interface for None or ""), as
    ``loop.create_server`` would open them, for the relays to inherit."""
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
                (f, k, p, "", a) for f, k, p, _, a in found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _RelayProcess:
    __slots__ = ("pid", "channel", "region")

    def __init__(self, pid: int, channel: Channel, region: int) -> None:
        self.pid = pid
        self.channel = channel
        self.region = region  # its region of the shared counts


class RelayPool:
    """The main process's side: the relays, the counts shared with them, and the
    connections they pass on."""

    def __init__(self, relays: list[_RelayProcess], shared: SharedCounts,
                 listeners: list[socket.socket], limits: SharedLimits) -> None:
        self._relays = relays
        self._shared = shared
        self.listeners = listeners
        self.limits = limits  # the main process's view (region 0)
        self._adopt: Callable[[socket.socket, bytes], None] = lambda _s, _d: None
        self._all_gone: Callable[[], None] = lambda: None
        self._closed: asyncio.Future[None] | None = None

    @classmethod
    def fork(cls, settings: Settings, count: int,
             listeners: list[socket.socket]) -> RelayPool:
        """Start ``count`` relay processes accepting on ``listeners``; call before any
        event loop or thread exists."""
        sys.stdout.flush()
        sys.stderr.flush()
        shared = SharedCounts(count + 1, settings.max_tunnels)

        def limits(region: int) -> SharedLimits:
            return SharedLimits(shared, region, settings.max_tunnels,
                                settings.max_tunnels_per_client, settings.max_tunnels_per_user)

        relays: list[_RelayProcess] = []
        ends: list[socket.socket] = []  # the main process's ends, closed in later relays
        for region in range(1, count + 1):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:
                for end in (*ends, ours):
                    end.close()
                os._exit(_relay_main(settings, theirs, listeners, limits(region)))
            theirs.close()
            ends.append(ours)
            relays.append(_RelayProcess(pid, Channel(ours), region))
        return cls(relays, shared, listeners, limits(0))

    @property
    def pids(self) -> list[int]:
        """The relay processes' ids."""
        return [relay.pid for relay in self._relays]

    @property
    def accepting(self) -> bool:
        """Whether a relay is left to accept on the port."""
        return any(relay.channel.open for relay in self._relays)

    def attach(self, metrics: Metrics, adopt: Callable[[socket.socket, bytes], None],
               all_gone: Callable[[], None]) -> None:
        """Start listening to the relays: ``adopt`` serves a connection one passed on,
        ``all_gone`` is called when the last one has died; ``metrics`` show theirs."""
        self._adopt, self._all_gone = adopt, all_gone
        metrics.follow(self.tally)
        for relay in self._relays:
            relay.channel.attach(functools.partial(self._message, relay),
                                 functools.partial(self._relay_gone, relay))

    def tally(self) -> Tally:
        """What the relays counted so far (``/v1/metrics`` adds it to its own)."""
        shared = self._shared
        regions = [relay.region for relay in self._relays]

        def total(index: int) -> int:
            return sum(shared.counter(region, index) for region in regions)

        refusals = {status: count for status in range(400, 600)
                    if (count := total(REFUSALS + status - 400))}
        return Tally(total(UPGRADES), total(OPENED), total(OPEN), total(BYTES_UP),
                     total(BYTES_DOWN), refusals)

    def _message(self, relay: _RelayProcess, message: Message, fds: list[int]) -> None:
        if isinstance(message, Adopt) and fds:
            for fd in fds[1:]:  # a relay sends one; never leak more
                os.close(fd)
            self._adopt(socket.socket(fileno=fds[0]), message.data)
            return
        for fd in fds:
            os.close(fd)
        if isinstance(message, Adopt):  # not passed: the relay is at its open-file limit
            log.warning("relay process %d lost a connection it passed on: no file "
                        "descriptor left", relay.pid)

    def _relay_gone(self, relay: _RelayProcess) -> None:
        lost = self._shared.clear(relay.region)
        if self._closed is None:
            log.error("relay process %d exited; %d tunnels lost%s", relay.pid, lost,
                      "" if self.accepting else "; the main process accepts from now on")
            if not self.accepting:
                self._all_gone()
        elif not self.accepting and not self._closed.done():
            self._closed.set_result(None)

    async def close(self, timeout: float) -> None:
        """Ask every relay to stop accepting, close its tunnels and exit; wait
        ``timeout``, then kill."""
        self._closed = asyncio.get_running_loop().create_future()
        for relay in self._relays:
            if relay.channel.open:
                relay.channel.send(Stop("server shutting down"))
        if self.accepting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._closed
        for relay in self._relays:
            await _reap(relay.pid)
        for sock in self.listeners:
            sock.close()


async def _reap(pid: int, grace: float = 2.0) -> None:
    """Wait for a relay process to exit (it was asked to), killing it past ``grace``."""
    deadline = time.monotonic() + grace
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return
        await asyncio.sleep(0.01)


# -- the relay process ----------------------------------------------------------------


def _relay_main(settings: Settings, sock: socket.socket, listeners: list[socket.socket],
                limits: SharedLimits) -> int:
    """Body of a relay process (a fork of the main one before its loop started)."""
    die_with_parent()  # SIGTERM: close the tunnels and go (see _Relay.serve)
    for signum in (signal.SIGINT, signal.SIGHUP):  # a terminal's: the main process leads
        signal.signal(signum, signal.SIG_IGN)
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_Relay(settings, Channel(sock), listeners, limits).serve())
    except Exception:
        log.exception("relay process failed")
        return 1
    finally:
        logging.shutdown()
    return 0


class _Relay:
    """A relay process's loop: accept, serve basic-mode upgrades, pass on the rest."""

    def __init__(self, settings: Settings, channel: Channel, listeners: list[socket.socket],
                 limits: SharedLimits) -> None:
        self.settings = settings
        self.channel = channel
        self.listeners = listeners
        self.limits = limits
        self.identity = Identity(settings)
        self.live = LiveTunnels(settings, lambda _tunnel: limits.opened(),
                                lambda tunnel: limits.closed(tunnel.stats.bytes_up,
                                                             tunnel.stats.bytes_down))
        self._stop: asyncio.Future[str] | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self.channel.attach(self._on_message, self._main_gone)
        loop.add_signal_handler(signal.SIGTERM, self._main_gone)
        settings = self.settings
        servers = [await loop.create_server(
            lambda: Handshake(settings.max_header_size, settings.handshake_timeout,
                              self._upgrade, self._refuse), sock=sock, backlog=BACKLOG)
            for sock in self.listeners]
        self.live.start_sweeping()
        gc.freeze()
        reason = await self._stop
        for server in servers:
            server.close()
        await self.live.close(settings.stop_timeout, reason)

    def _main_gone(self) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result("server shutting down")

    def _on_message(self, message: Message, fds: list[int]) -> None:
        for fd in fds:  # the main process sends none
            os.close(fd)
        if isinstance(message, Stop) and self._stop is not None and not self._stop.done():
            self._stop.set_result(message.reason)

    def _refuse(self, transport: asyncio.Transport, refusal: Refused) -> None:
        write_refusal(transport, refusal)
        self.limits.refused(refusal.status)

    def _upgrade(self, request: UpgradeRequest, transport: asyncio.Transport,
                 tail: bytes) -> None:
        settings = self.settings
        decision = decide(request, Policy(settings.allowed_origins, True, self.live.closing,
                                          settings.host_names))
        if isinstance(decision, Refused):
            self._refuse(transport, decision)
        elif decision.token is not None or FORWARD_HEADER in request.headers:
            self._pass_on(transport)
        else:
            client = self.identity.client_address(request)
            user = self.identity.user(request)
            try:
                self.limits.acquire(client, user)
            except Refused as exc:
                self._refuse(transport, exc)
                return
            self.limits.upgraded()
            self.live.accept_basic(transport, decision, tail, client,
                                   lambda: self.limits.release(client, user))

    def _pass_on(self, transport: asyncio.Transport) -> None:
        """Give a session's connection to the main process, which reads it again."""
        handshake = transport.get_protocol()
        assert isinstance(handshake, Handshake)
        data = handshake.received
        sock = transport.get_extra_info("socket")
        if len(data) > MAX_MESSAGE - 64 or sock is None:
            self._refuse(transport, Refused(400, "too much data before the 101"))
            return
        transport.pause_reading()
        self.channel.send(Adopt(data), [os.dup(sock.fileno())])
        transport.close()  # the main process holds the connection now
