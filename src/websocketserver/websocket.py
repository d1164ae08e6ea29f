"""The websocket listener: accept an upgrade on any path, pick its target, tunnel.

Without ``?token=`` the target is ``--client_hostname:--client_port`` (basic mode);
with one, the reserved service is started first (see :mod:`.services`).

Each connection goes through two protocols:

1. :class:`Handshake` reads the upgrade request (parsed by httptools, the llhttp
   binding) and decides. A request that cannot be served is refused before the
   upgrade with an HTTP status and a JSON reason, and the connection is closed.
2. An accepted one is handed to picows, which answers ``101`` and from then on
   parses frames in C for the :class:`~.tunnel.Tunnel` listener. picows is given
   a canonical upgrade request built from the checked one, so every decision
   about the request stays here, with its JSON reasons. A basic-mode one goes to
   a relay process instead, which does the same there (see :mod:`.relay`).

Failures after the upgrade close the websocket with a code and a reason that the
page's ``CloseEvent.reason`` shows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http
import json
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import httptools
from multidict import CIMultiDict, MultiDict, MultiDictProxy
from picows import WSAutoPingStrategy, WSCloseCode, WSUpgradeResponse, WSUpgradeResponseWithListener
from picows.picows import WSProtocol

from .limits import LimitExceeded, TunnelLimits, origin_allowed
from .services import ServiceError, ServiceManager
from .settings import Settings
from .tunnel import BackendError, Tunnel, TunnelStats, UpstreamBudget

if TYPE_CHECKING:
    from .relay import RelayPool

log = logging.getLogger("websocketserver.tunnel")

START_FAILED = WSCloseCode.INTERNAL_ERROR  # the service behind the tunnel failed
READ_BUFFER = 2048
"""picows' first read buffer per connection (it doubles as messages need): 2 KiB holds
what noVNC sends, and 10,000 idle tunnels hold 140 MB less than with its 16 KiB."""
MAX_HEADERS = 100
"""Most header lines in an upgrade request (browsers send about 15)."""
_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())


def json_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class UpgradeRequest:
    """The parts of an upgrade request that the server looks at (see :mod:`.identity`)."""

    __slots__ = ("method", "version", "target", "headers", "query", "transport")

    def __init__(self, method: str, version: str, target: bytes,
                 headers: CIMultiDict[str], transport: asyncio.Transport) -> None:
        self.method = method
        self.version = version
        self.target = target
        self.headers = headers
        self.transport = transport
        query = target.partition(b"?")[2]
        self.query = (MultiDictProxy(MultiDict(parse_qsl(
            query.decode("utf-8", "surrogateescape"), keep_blank_values=True)))
            if query else _NO_QUERY)


def peer_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if not peer:
        return "?"
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


class Refusal(Exception):
    """The upgrade request is refused with ``status`` and a JSON reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def protocol_refusal(version: str, expect: str | None) -> Refusal | None:
    """What neither port speaks: HTTP other than 1.0 and 1.1, an unknown ``Expect``."""
    if version not in ("1.0", "1.1"):
        return Refusal(505, f"HTTP/{version} is not supported")
    if expect is not None and expect.lower() != "100-continue":
        return Refusal(417, "unsupported Expect header")
    return None


_SECOND_CLOSE = "Received CLOSE for the second time"
_PICOWS_LOGGER = logging.getLogger("websocketserver.websocket")


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

    def __init__(self, tunnel: Tunnel) -> None:
        super().__init__(_PICOWS_LOGGER, None)
        self._tunnel = tunnel

    def info(self, msg: object, *args: object, **kwargs: object) -> None:
        self.log(logging.DEBUG, msg, *args, **kwargs)  # type: ignore[arg-type]

    def error(self, msg: object, *args: object, **kwargs: object) -> None:
        if args and _SECOND_CLOSE in str(args[0]):
            self._tunnel.closed_twice()
        self.log(logging.INFO, msg, *args, **kwargs)  # type: ignore[arg-type]


class Handshake(asyncio.Protocol):
    """Reads one upgrade request on a new connection; refuses it or hands it to picows."""

    def __init__(self, gateway: WebSocketGateway) -> None:
        self._gateway = gateway
        self._limit = gateway.settings.max_header_size
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._target = b""
        self._headers: CIMultiDict[str] = CIMultiDict()
        self._complete = False
        self._received = 0
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(
            self._gateway.settings.handshake_timeout, self._expire)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        if not self._done and self._transport is not None:
            self._done = True
            log.warning("closing connection from %s: no request within %g s",
                        peer_of(self._transport), self._gateway.settings.handshake_timeout)
            self._transport.abort()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > self._limit:
            raise Refusal(400, f"request line over {self._limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > self._limit or len(value) > self._limit:
            raise Refusal(400, f"header line over {self._limit} bytes")
        if len(self._headers) >= MAX_HEADERS:
            raise Refusal(400, f"more than {MAX_HEADERS} header lines")
        self._headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))

    def on_headers_complete(self) -> None:
        self._complete = True

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        tail = b""
        try:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                tail = data[exc.args[0]:]
            except httptools.HttpParserCallbackError as exc:
                if isinstance(exc.__context__, Refusal):
                    raise exc.__context__ from None
                raise
            except httptools.HttpParserError as exc:
                raise Refusal(400, f"malformed HTTP request: {exc}") from None
            self._received += len(data) - len(tail)
            if self._received > 4 * self._limit:  # httptools holds a line until its end
                raise Refusal(400, f"request head over {4 * self._limit} bytes")
            if not self._complete:
                return
            self._done = True
            self._timer.cancel()  # type: ignore[union-attr]
            request = UpgradeRequest(
                self._parser.get_method().decode("ascii"), self._parser.get_http_version(),
                self._target, self._headers, self._transport)  # type: ignore[arg-type]
            self._gateway.upgrade(request, tail)
        except Refusal as refusal:
            self._done = True
            self._gateway.refuse(self._transport, refusal)  # type: ignore[arg-type]


class _Session:
    """A service tunnel seen from its reservation: a release or shutdown ends it."""

    def __init__(self, task: asyncio.Task[object], tunnel: Tunnel) -> None:
        self.task = task
        self.tunnel = tunnel
        self.running = False
        self.stopped: str | None = None

    def close(self, reason: str) -> None:
        if self.running:
            self.tunnel.close(WSCloseCode.GOING_AWAY, reason)
        elif self.stopped is None:  # still starting: interrupt the start
            self.stopped = reason
            self.task.cancel()


class WebSocketGateway:
    """The websocket port: its listener, the decisions on upgrades, the live tunnels."""

    def __init__(self, settings: Settings, services: ServiceManager) -> None:
        self.settings = settings
        self.services = services
        self.identity = services.identity
        self.limits = TunnelLimits(settings.max_tunnels, settings.max_tunnels_per_client,
                                   settings.max_tunnels_per_user)
        metrics = services.metrics
        self.live = LiveTunnels(settings, metrics.tunnel_opened, metrics.tunnel_closed)
        self.relays: RelayPool | None = None  # see attach_relays
        self._server: asyncio.Server | None = None
        self._requests = metrics.http_requests
        self._upgrades = self._requests.labels("ws", "101")

    @property
    def tunnels(self) -> set[Tunnel]:
        """The tunnels open in this process."""
        return self.live.tunnels

    def attach_relays(self, relays: RelayPool) -> None:
        """Hand basic-mode tunnels to relay processes (see :mod:`.relay`)."""
        self.relays = relays
        relays.attach(self.limits, self.services.metrics)

    async def listen(self, port: int, context: ssl.SSLContext | None) -> list[tuple[str, int]]:
        """Listen on ``port`` (TLS with ``context``); the addresses listened on."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Handshake(self), self.settings.listen_address, port,
            ssl=context, backlog=1024, reuse_address=True,
            ssl_handshake_timeout=self.settings.handshake_timeout if context else None)
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    # -- deciding on an upgrade request ---------------------------------------------

    def refuse(self, transport: asyncio.Transport, refusal: Refusal) -> None:
        """Answer ``refusal`` as JSON and close the connection."""
        status = refusal.status
        log.warning("websocket refused (%d): %s: %s", status, peer_of(transport), refusal)
        body = json_body(str(refusal))
        extra = (b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" if status == 426
                 else b"")
        transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json; charset=utf-8\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n%s\r\n%s"
                        % (status, http.HTTPStatus(status).phrase.encode(), len(body),
                           extra, body))
        transport.close()
        self._requests.labels("ws", str(status)).inc()

    def _check(self, request: UpgradeRequest) -> None:
        """Raise :class:`Refusal` if the request is not a websocket upgrade we serve."""
        if self.live.closing:
            raise Refusal(503, "server is shutting down")
        headers = request.headers
        refusal = protocol_refusal(request.version, headers.get("Expect"))
        if refusal is not None:
            raise refusal
        if request.version == "1.1" and len(headers.getall("Host", ())) != 1:
            raise Refusal(400, "an HTTP/1.1 request needs one Host header")
        if request.method != "GET":
            raise Refusal(405, "websocket upgrades are GET requests")
        if (headers.get("Upgrade", "").lower() != "websocket"
                or headers.get("Sec-WebSocket-Version") != "13"):
            raise Refusal(426, "this port serves websocket upgrades only (version 13)")
        if request.version != "1.1":
            raise Refusal(400, "websocket upgrades need HTTP/1.1")
        connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
        if "upgrade" not in connection or not _valid_key(headers.get("Sec-WebSocket-Key")):
            raise Refusal(400, "malformed websocket handshake")
        origin = headers.get("Origin")
        if not origin_allowed(origin, self.settings.allowed_origins):
            raise Refusal(403, f"origin not allowed: {origin}")
        if "token" not in request.query and self.settings.client_port is None:
            raise Refusal(404, "no service here: no --client_port configured and no ?token= given")

    async def _check_token(self, token: str, user: str | None) -> None:
        """Claim ``token`` for this upgrade, or raise :class:`Refusal` (404, 403, 409).

        The claim (reserved -> starting) is one store operation made before answering,
        so of simultaneous upgrades with one token exactly one is answered 101.
        """
        try:
            await self.services.claim(token, user)
        except ServiceError as exc:
            raise Refusal(exc.status, str(exc)) from None

    def upgrade(self, request: UpgradeRequest, tail: bytes) -> None:
        """Decide on a complete upgrade request: refuse it, or open its tunnel."""
        self._check(request)
        token = request.query.get("token")
        if token is None:
            self._accept(request, tail, None)
            return
        transport = request.transport
        transport.pause_reading()  # until the reservation has been claimed
        self.live.spawn(self._upgrade_token(request, tail, token))

    async def _upgrade_token(self, request: UpgradeRequest, tail: bytes, token: str) -> None:
        transport = request.transport
        try:
            await self._check_token(token, self.identity.user(request))
        except Refusal as refusal:
            if not transport.is_closing():
                self.refuse(transport, refusal)
            return
        if not transport.is_closing():
            transport.resume_reading()
            if self._accept(request, tail, token):
                return
        await self.services.unclaim(token)  # no websocket after all: reserved again

    def _accept(self, request: UpgradeRequest, tail: bytes, token: str | None) -> bool:
        """Answer 101 and run the tunnel; False if a limit refused it (then answered)."""
        client = self.identity.client_address(request)
        user = self.identity.user(request)
        try:
            self._acquire(client, user)
        except LimitExceeded as exc:
            self.refuse(request.transport, Refusal(exc.status, str(exc)))
            return False
        key = request.headers["Sec-WebSocket-Key"].encode("ascii")
        offered = request.headers.get("Sec-WebSocket-Protocol", "")
        binary = "binary" in (p.strip() for p in offered.split(","))
        transport = request.transport
        self._upgrades.inc()
        if token is None and self.relays is not None and self.relays.hand_over(
                transport, key, binary, tail, client, user):
            return True
        tunnel = self.live.tunnel(client)
        protocol = websocket_protocol(tunnel, binary, self.settings)
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        answer_upgrade(protocol, key, tail)
        if token is None:
            self.live.spawn(self.live.basic(tunnel, lambda: self.limits.release(client, user)))
        else:  # claimed by _upgrade_token
            self.live.spawn(self._service_tunnel(tunnel, client, user, token))
        return True

    def _acquire(self, client: str, user: str | None) -> None:
        """Take the tunnel's slot in the limits, or raise :class:`LimitExceeded`."""
        try:
            self.limits.acquire(client, user)
        except LimitExceeded:
            if self.relays is None:
                raise
            self.relays.receive()  # a relay may have freed one: its report is waiting
            self.limits.acquire(client, user)

    # -- running a tunnel -----------------------------------------------------------

    async def _service_tunnel(self, tunnel: Tunnel, client: str, user: str | None,
                              token: str) -> None:
        try:
            await self._run_service(tunnel, token)
        finally:
            self.limits.release(client, user)

    async def _run_service(self, tunnel: Tunnel, token: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = _Session(task, tunnel)
        try:
            async with self.services.activate(token, session.close, claimed=True) as target:
                deadline = time.monotonic() + self.settings.start_timeout

                def opened() -> None:
                    session.running = True
                    self.services.attach(token, tunnel.stats)

                await self._tunnel(tunnel, target, deadline, opened)
        except ServiceError as exc:
            tunnel.close(START_FAILED, str(exc))
            await tunnel.closed
        except asyncio.CancelledError:
            if session.stopped is None:
                raise
            task.uncancel()
            tunnel.close(WSCloseCode.GOING_AWAY, session.stopped)
            await tunnel.closed

    async def _tunnel(self, tunnel: Tunnel, target: tuple[str, int], deadline: float,
                      opened: Callable[[], None]) -> None:
        """Connect to a service as soon as its port is open, and relay until the end."""
        host, port = target
        tunnel.stats.target = f"{host}:{port}"
        try:
            await self._connect_until(tunnel, host, port, deadline)
        except BackendError as exc:
            self.live.refused(tunnel, exc)
            await tunnel.closed
            return
        opened()
        self.live.opened(tunnel)
        try:
            await tunnel.closed
        finally:
            self.live.ended(tunnel)

    @staticmethod
    async def _connect_until(tunnel: Tunnel, host: str, port: int, deadline: float) -> None:
        """Keep trying until ``deadline`` while the service's port is not open yet."""
        while True:
            try:
                await tunnel.connect(host, port)
                return
            except BackendError:
                if time.monotonic() > deadline or tunnel.closed.done():
                    raise
            await asyncio.sleep(0.05)

    def start_sweeping(self) -> None:
        self.live.start_sweeping()

    async def close(self, timeout: float) -> None:
        """Stop listening, refuse new upgrades, close every tunnel and wait for them."""
        self.live.closing = True
        if self._server is not None:
            self._server.close()
        waiting = [self.live.close(timeout)]
        if self.relays is not None:
            waiting.append(self.relays.close(timeout))
        await asyncio.gather(*waiting)


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
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.budget = UpstreamBudget(settings.max_upstream_buffer)

    def tunnel(self, peer: str) -> Tunnel:
        """A new tunnel for a browser at ``peer``, charged to this process's budget."""
        return Tunnel(TunnelStats(peer=peer, target=""), self.settings.max_message_size,
                      self.budget)

    def spawn(self, coroutine: Coroutine[object, object, None]) -> None:
        """Run ``coroutine`` as a task that :meth:`close` waits for."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            self._sweeper = asyncio.create_task(self._sweep(self.settings.idle_timeout))

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
        if self._sweeper is not None:
            self._sweeper.cancel()
        for tunnel in list(self.tunnels):
            tunnel.close(WSCloseCode.GOING_AWAY, reason)
        waiting = [*self._tasks, *(tunnel.closed for tunnel in self.tunnels)]
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*waiting, return_exceptions=True)


def _valid_key(key: str | None) -> bool:
    """RFC 6455 4.2.1: the key is 16 bytes in base64."""
    try:
        return key is not None and len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (UnicodeEncodeError, binascii.Error):
        return False


_RESPONSES = {  # the 101 answers, by whether the client offered the "binary" subprotocol
    False: WSUpgradeResponse.create_101_response(),
    True: WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": "binary"})}


class _CountingProtocol(WSProtocol):
    """picows' protocol, telling the tunnel what each read gave it: the tunnel keeps
    what picows holds (a frame not yet whole) within its process's budget."""

    def __init__(self, tunnel: Tunnel, *args: object) -> None:
        super().__init__(*args)
        self._tunnel = tunnel

    def buffer_updated(self, nbytes: int) -> None:
        self._tunnel.received(nbytes)
        super().buffer_updated(nbytes)
        self._tunnel.parsed()


def websocket_protocol(tunnel: Tunnel, binary: bool, settings: Settings) -> WSProtocol:
    """The picows protocol that will answer an accepted upgrade and feed ``tunnel``."""
    response = WSUpgradeResponseWithListener(_RESPONSES[binary], tunnel)
    ping = settings.ping_interval
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


def answer_upgrade(protocol: WSProtocol, key: bytes, tail: bytes) -> None:
    """Give ``protocol`` (already connected) the canonical request of a checked upgrade
    and the bytes that followed it: it answers 101 and reads on."""
    _feed(protocol, b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n%s"
                    % (key, tail))


def _feed(protocol: WSProtocol, data: bytes) -> None:
    """Give bytes to a buffered protocol as its transport would."""
    view = memoryview(data)
    while view:
        buffer = protocol.get_buffer(len(view))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
