"""Relay processes: basic-mode tunnels relayed outside the main process.

Opening a tunnel costs the server ~250 µs of CPU, half of it kernel work on the
sockets, and one process does that on one core only (~4,000 tunnels/s here). So the
main process keeps every decision about a request — the checks, the limits, the
identity, the JSON refusals, reservations and services — and hands each accepted
basic-mode websocket to a relay process: the socket itself (``SCM_RIGHTS`` over a
``SOCK_SEQPACKET`` pair), its checked ``Sec-WebSocket-Key`` and the bytes that came
after the request. The relay answers ``101``, connects the backend and relays until
the end, then reports it, so that the main process releases the tunnel's limits and
counts it. Measured with ``bench/`` on two cores: 5,500–5,950 tunnels/s instead of
3,800–4,100 with everything in one process (``bench/README.md``, fourth round).

What stays in the main process: service tunnels (``?token=``: their service's life
is tied to the reservation), and every tunnel when the port speaks TLS (a TLS
session cannot move between processes). ``--relay_processes 0`` keeps everything in
the main process.

Relays are forked at start-up, before any event loop exists. A relay whose main
process is gone closes its tunnels and exits (and the kernel sends it SIGTERM, see
``PR_SET_PDEATHSIG``); a relay that dies is logged, its tunnels' limits are
released, and its share of new tunnels goes to the others or the main process.
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
from typing import TYPE_CHECKING

from ..processes import die_with_parent
from ..settings import Settings
from .channel import MAX_MESSAGE, Channel, Ended, HandOver, Message, Opened, Stop
from .live import LiveTunnels, answer_upgrade, websocket_protocol
from .tunnel import Tunnel, TunnelStats

if TYPE_CHECKING:
    from ..metrics import Metrics
    from .tunnel_limits import TunnelLimits

log = logging.getLogger("websocketserver.relay")

class RemoteTunnel:
    """The main process's record of a tunnel in a relay: what its end releases."""

    __slots__ = ("stats", "user", "opened")

    def __init__(self, stats: TunnelStats, user: str | None) -> None:
        self.stats = stats  # its peer is the client address the limits counted
        self.user = user
        self.opened = False


class _RelayProcess:
    __slots__ = ("pid", "channel", "tunnels")

    def __init__(self, pid: int, channel: Channel) -> None:
        self.pid = pid
        self.channel = channel
        self.tunnels: dict[int, RemoteTunnel] = {}


class RelayPool:
    """The main process's side: hand basic tunnels to the relays in turn, and learn
    when each one opens and ends."""

    def __init__(self, relays: list[_RelayProcess]) -> None:
        self._relays = relays
        self._next = 0
        self._ids = 0
        self._limits: TunnelLimits | None = None
        self._metrics: Metrics | None = None
        self._all_closed: asyncio.Future[None] | None = None

    @classmethod
    def fork(cls, settings: Settings, count: int) -> RelayPool:
        """Start ``count`` relay processes; call before any event loop or thread exists."""
        sys.stdout.flush()
        sys.stderr.flush()
        relays: list[_RelayProcess] = []
        ends: list[socket.socket] = []  # the main process's ends, closed in later relays
        for _ in range(count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            pid = os.fork()
            if pid == 0:
                for end in (*ends, ours):
                    end.close()
                os._exit(_relay_main(settings, theirs))
            theirs.close()
            ends.append(ours)
            relays.append(_RelayProcess(pid, Channel(ours)))
        return cls(relays)

    @property
    def pids(self) -> list[int]:
        """The relay processes' ids."""
        return [relay.pid for relay in self._relays]

    def attach(self, limits: TunnelLimits, metrics: Metrics) -> None:
        """Start listening to the relays; their ends release ``limits``."""
        self._limits, self._metrics = limits, metrics
        for relay in self._relays:
            relay.channel.attach(functools.partial(self._report, relay),
                                 functools.partial(self._relay_gone, relay))

    def hand_over(self, transport: asyncio.Transport, key: bytes, binary: bool,
                  tail: bytes, client: str, user: str | None) -> bool:
        """Give an accepted basic-mode websocket to a relay; False: keep it here."""
        relay = self._pick()
        if relay is None or len(tail) > MAX_MESSAGE // 2:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        self._ids += 1
        tunnel_id = self._ids
        relay.tunnels[tunnel_id] = RemoteTunnel(TunnelStats(peer=client, target=""), user)
        transport.pause_reading()
        relay.channel.send(HandOver(tunnel_id, key, binary, tail, client),
                           [os.dup(sock.fileno())])
        transport.close()  # the relay holds the connection now
        return True

    def receive(self) -> None:
        """Take in the relays' waiting reports now, not at the loop's next turn.

        A relay reports a tunnel's end before the browser can see it; reading that
        before refusing a client at its limit makes an immediate reconnect find its
        slot free, whatever order the loop would have handled the two in.
        """
        for relay in self._relays:
            relay.channel.receive()

    def _pick(self) -> _RelayProcess | None:
        relays = self._relays
        for _ in range(len(relays)):
            relay = relays[self._next % len(relays)]
            self._next += 1
            if relay.channel.open:
                return relay
        return None

    def _report(self, relay: _RelayProcess, message: Message, fds: list[int]) -> None:
        for fd in fds:  # a relay sends none; never leak one
            os.close(fd)
        if not isinstance(message, Opened | Ended):
            return
        record = relay.tunnels.get(message.tunnel_id)
        if record is None:
            return
        assert self._metrics is not None
        if isinstance(message, Opened):
            record.stats.target = message.target
            record.opened = True
            self._metrics.tunnel_opened(record)
        else:
            record.stats.bytes_up, record.stats.bytes_down = message.bytes_up, message.bytes_down
            self._end(relay, message.tunnel_id)

    def _end(self, relay: _RelayProcess, tunnel_id: int) -> None:
        record = relay.tunnels.pop(tunnel_id)
        assert self._limits is not None and self._metrics is not None
        self._limits.release(record.stats.peer, record.user)
        if record.opened:
            self._metrics.tunnel_closed(record)

    def _relay_gone(self, relay: _RelayProcess) -> None:
        if self._all_closed is None:
            log.error("relay process %d exited; %d tunnels lost, new ones go elsewhere",
                      relay.pid, len(relay.tunnels))
        for tunnel_id in list(relay.tunnels):
            self._end(relay, tunnel_id)
        if self._all_closed is not None and not any(r.channel.open for r in self._relays):
            if not self._all_closed.done():
                self._all_closed.set_result(None)

    async def close(self, timeout: float) -> None:
        """Ask every relay to close its tunnels and exit; wait ``timeout``, then kill."""
        self._all_closed = asyncio.get_running_loop().create_future()
        for relay in self._relays:
            if relay.channel.open:
                relay.channel.send(Stop("server shutting down"))
        if any(relay.channel.open for relay in self._relays):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._all_closed
        for relay in self._relays:
            await _reap(relay.pid)


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


def _relay_main(settings: Settings, sock: socket.socket) -> int:
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
            runner.run(_Relay(settings, Channel(sock)).serve())
    except Exception:
        log.exception("relay process failed")
        return 1
    finally:
        logging.shutdown()
    return 0


class _Relay:
    """A relay process's loop: adopt handed-over websockets, relay, report."""

    def __init__(self, settings: Settings, channel: Channel) -> None:
        self.settings = settings
        self.channel = channel
        self.live = LiveTunnels(settings, self._opened, lambda _tunnel: None)
        self._ids: dict[Tunnel, int] = {}
        self._stop: asyncio.Future[str] | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self.channel.attach(self._on_message, self._main_gone)
        loop.add_signal_handler(signal.SIGTERM, self._main_gone)
        self.live.start_sweeping()
        gc.freeze()
        reason = await self._stop
        await self.live.close(self.settings.stop_timeout, reason)

    def _main_gone(self) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result("server shutting down")

    def _on_message(self, message: Message, fds: list[int]) -> None:
        if not isinstance(message, HandOver):
            for fd in fds:
                os.close(fd)
            if isinstance(message, Stop) and self._stop is not None and not self._stop.done():
                self._stop.set_result(message.reason)
            return
        if not fds:  # not passed: this process is at its open-file limit
            log.warning("websocket from %s lost in the hand-over: no file descriptor left",
                        message.peer)
            self.channel.send(Ended(message.tunnel_id, 0, 0))
            return
        sock = socket.socket(fileno=fds[0])
        tunnel = self.live.tunnel(message.peer)
        self._ids[tunnel] = message.tunnel_id
        self.live.spawn(self._run(sock, tunnel, message.key, message.binary, message.tail),
                        f"relayed tunnel from {message.peer}")

    async def _run(self, sock: socket.socket, tunnel: Tunnel, key: bytes, binary: bool,
                   tail: bytes) -> None:
        protocol = websocket_protocol(tunnel, binary, self.settings)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, sock)
        except OSError as exc:
            log.info("websocket from %s lost before its 101: %s", tunnel.stats.peer, exc)
            sock.close()
            self._ended(tunnel)
            return
        answer_upgrade(protocol, key, tail)
        await self.live.basic(tunnel, lambda: self._ended(tunnel))

    def _opened(self, tunnel: Tunnel) -> None:
        self.channel.send(Opened(self._ids[tunnel], tunnel.stats.target))

    def _ended(self, tunnel: Tunnel) -> None:
        self.channel.send(Ended(self._ids.pop(tunnel), tunnel.stats.bytes_up,
                             tunnel.stats.bytes_down))
