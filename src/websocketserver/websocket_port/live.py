"""The tunnels of one process, and the picows side of each websocket.

Used by the main process (the tunnels it relays itself) and by each relay process
(the tunnels handed to it), so it depends on neither: :class:`LiveTunnels` runs,
logs, sweeps and closes tunnels and reports their opening and end to its owner;
:func:`websocket_protocol` and :func:`answer_upgrade` give an accepted connection to
picows, which answers 101 and parses frames for the :class:`~.tunnel.Tunnel`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSListener,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in its stub

from ..core.errors import Close
from ..core.upstream import UpstreamBudget
from ..settings import Settings
from ..tasks import Tasks
from .backend import BackendError
from .tunnel import Tunnel, TunnelStats

log = logging.getLogger("websocketserver.tunnels")

START_FAILED = WSCloseCode(Close.INTERNAL_ERROR)  # the backend could not be reached
READ_BUFFER = 2048
"""picows' first read buffer per connection (it doubles as messages need): 2 KiB holds
what noVNC sends, and 10,000 idle tunnels hold 140 MB less than with its 16 KiB."""


class LiveTunnels:
    """The tunnels open in one process: run them, log them, sweep idle ones, close all.

    The main process has one for the tunnels it relays itself, and each relay process
    one for the tunnels handed to it; ``opened``/``ended`` report to their owner.
    """

    def __init__(self, settings: Settings, opened: Callable[[Tunnel], None],
                 ended: Callable[[Tunnel], None]) -> None:
        self.settings = settings
        self.tunnels: set[Tunnel] = set()
        self.closing = False
        self._on_opened = opened
        self._on_ended = ended
        self._tasks = Tasks(log)
        self._sweeper = Tasks(log)
        self.budget = UpstreamBudget(settings.max_upstream_buffer)

    def tunnel(self, peer: str) -> Tunnel:
        """A new tunnel for a browser at ``peer``, charged to this process's budget."""
        return Tunnel(TunnelStats(peer=peer, target=""), self.settings.max_message_size,
                      self.budget)

    def spawn(self, coroutine: Coroutine[object, object, None], label: str) -> None:
        """Run ``coroutine`` as a task that :meth:`close` waits for; if it fails, the
        error is logged with ``label`` (the connection it serves) and ends only it."""
        self._tasks.spawn(coroutine, label)

    async def basic(self, tunnel: Tunnel, released: Callable[[], None]) -> None:
        """Connect to ``--client_hostname:--client_port``; the task ends there, and the
        end of the tunnel is handled by a callback (one task wake-up less per tunnel).
        ``released`` is called once the tunnel stops relaying, however it ends, before
        the browser learns of it (see :meth:`Tunnel.when_stopped`)."""
        tunnel.when_stopped(released)
        settings = self.settings
        host, port = settings.client_hostname, settings.client_port
        tunnel.stats.target = f"{host}:{port}"
        try:
            await tunnel.connect(host, port)  # type: ignore[arg-type]
        except BackendError as exc:
            self.refused(tunnel, exc)
            return
        if tunnel.stopped:  # the browser left while the backend connected
            return
        self.opened(tunnel)
        tunnel.closed.add_done_callback(lambda _: self.ended(tunnel))

    @staticmethod
    def refused(tunnel: Tunnel, exc: BackendError) -> None:
        log.warning("tunnel refused: %s -> %s: %s", tunnel.stats.peer, tunnel.stats.target, exc)
        tunnel.close(START_FAILED, str(exc))

    def opened(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        self._on_opened(tunnel)
        log.info("tunnel open: %s -> %s", tunnel.stats.peer, tunnel.stats.target)
        if self.closing:  # shutdown began while it connected
            tunnel.close(WSCloseCode.GOING_AWAY, "server shutting down")

    def ended(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self._on_ended(tunnel)
        stats = tunnel.stats
        log.info("tunnel closed: %s -> %s, %d bytes up, %d bytes down, %.2f s (%s)",
                 stats.peer, stats.target, stats.bytes_up, stats.bytes_down,
                 time.monotonic() - stats.started, tunnel.reason)

    def start_sweeping(self) -> None:
        """With ``--idle_timeout``, close tunnels that carry no traffic for that long."""
        if self.settings.idle_timeout is not None:
            self._sweeper.spawn(self._sweep(self.settings.idle_timeout), "idle sweep")

    async def _sweep(self, timeout: float) -> None:
        # Byte counters are compared between sweeps, so the hot path pays nothing.
        seen: dict[Tunnel, tuple[int, int, float]] = {}
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            current = {}
            for tunnel in self.tunnels:
                counts = (tunnel.stats.bytes_up, tunnel.stats.bytes_down)
                before = seen.get(tunnel)
                since = before[2] if before is not None and before[:2] == counts else now
                if now - since >= timeout:
                    tunnel.close(WSCloseCode.GOING_AWAY, f"idle for {timeout:g} s")
                current[tunnel] = (*counts, since)
            seen = current

    async def close(self, timeout: float, reason: str = "server shutting down") -> None:
        """Refuse new tunnels, close every open one and wait (at most ``timeout``)."""
        self.closing = True
        await self._sweeper.cancel()
        for tunnel in list(self.tunnels):
            tunnel.close(WSCloseCode.GOING_AWAY, reason)
        began = time.monotonic()
        await self._tasks.wait(timeout)
        closing = [tunnel.closed for tunnel in self.tunnels]
        left = timeout - (time.monotonic() - began)
        if closing and left > 0:
            await asyncio.wait(closing, timeout=left)


_SECOND_CLOSE = "Received CLOSE for the second time"
_PICOWS_LOGGER = logging.getLogger("websocketserver.picows")


class _PicowsLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows logs every connection and disconnection at INFO, where this server logs
    one line per tunnel: DEBUG. It reports a peer's protocol error as an ERROR; that
    is the peer's fault: INFO. (A bug in our listener comes through ``exception()``
    and stays an ERROR with its traceback.)

    One per connection, for one case: picows parses a frame ahead, so a second close
    frame in the same read as the first is refused (1002) before the first reaches
    the tunnel, where RFC 6455 5.5.1 says it is ignored. Its log call comes just before
    its close frame; the tunnel answers 1000 first, and picows' close is then not sent.
    """

    def __init__(self, tunnel: Tunnel | None) -> None:
        super().__init__(_PICOWS_LOGGER, None)
        self._tunnel = tunnel

    def info(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)  # type: ignore[arg-type]

    def error(self, msg: object, *args: object, **kwargs: object) -> None:
        if self._tunnel is not None and args and _SECOND_CLOSE in str(args[0]):
            self._tunnel.closed_twice()
        self.log(logging.INFO, msg, *args, **kwargs)  # type: ignore[arg-type]



_RESPONSES = {  # the 101 answers, by whether the client offered the "binary" subprotocol
    False: WSUpgradeResponse.create_101_response(),
    True: WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": "binary"})}


class _CountingProtocol(WSProtocol):  # type: ignore[misc]  # WSProtocol is untyped
    """picows' protocol, telling the tunnel what each read gave it: the tunnel keeps
    what picows holds (a frame not yet whole) within its process's budget."""

    def __init__(self, tunnel: Tunnel, *args: object) -> None:
        super().__init__(*args)
        self._tunnel = tunnel

    def buffer_updated(self, nbytes: int) -> None:
        self._tunnel.received(nbytes)
        super().buffer_updated(nbytes)
        self._tunnel.parsed()


def websocket_protocol(tunnel: Tunnel, binary: bool, settings: Settings,
                       keep_alive: bool = False) -> WSProtocol:
    """The picows protocol that will answer an accepted upgrade and feed ``tunnel``.

    ``keep_alive``: ping the browser when idle even without ``--ping_interval`` (every
    KEEP_ALIVE seconds): a websocket that waits for a queued Slurm job carries nothing
    for minutes, and proxies close idle connections (nginx after 60 s by default).
    """
    response = WSUpgradeResponseWithListener(_RESPONSES[binary], tunnel)
    ping = settings.ping_interval or (KEEP_ALIVE if keep_alive else None)
    return _CountingProtocol(
        tunnel,
        None, None, False, lambda _: response, _PicowsLog(tunnel),
        True,  # disconnect on an exception in the listener
        None,  # the handshake timeout was ours
        ping is not None, ping or 20.0, (ping or 20.0) / 2,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        False,  # pings are answered by the tunnel, after its own checks
        settings.max_message_size,
        None, READ_BUFFER)


def refusal_protocol(listener: WSListener, binary: bool) -> WSProtocol:
    """The picows protocol of a websocket accepted only to be refused inside it
    (:mod:`.refusal`): pongs answered by picows, frames of at most 4 KiB."""
    response = WSUpgradeResponseWithListener(_RESPONSES[binary], listener)
    return WSProtocol(None, None, False, lambda _: response, _PicowsLog(None), True, None,
                      False, 20.0, 10.0, WSAutoPingStrategy.PING_WHEN_IDLE, True, 4096,
                      None, READ_BUFFER)


KEEP_ALIVE = 20.0
"""Seconds between pings of an idle websocket of a Slurm session (``keep_alive``)."""


def answer_upgrade(protocol: WSProtocol, key: bytes, tail: bytes) -> None:
    """Give ``protocol`` (already connected) the canonical request of a checked upgrade
    and the bytes that followed it: it answers 101 and reads on."""
    _feed(protocol, b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n%s"
                    % (key, tail))


def switch_to(transport: asyncio.Transport, protocol: WSProtocol, key: bytes,
              tail: bytes) -> None:
    """Give a connection whose upgrade request was read (by the handshake) to
    ``protocol``, which answers 101 and reads on."""
    protocol.connection_made(transport)
    transport.set_protocol(protocol)
    answer_upgrade(protocol, key, tail)


def _feed(protocol: WSProtocol, data: bytes) -> None:
    """Give bytes to a buffered protocol as its transport would."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
