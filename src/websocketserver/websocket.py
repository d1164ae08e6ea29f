"""The websocket listener: accept an upgrade on any path, pick its target, tunnel.

Without ``?token=`` the target is ``--client_hostname:--client_port`` (basic mode);
with one, the reserved service is started first (see :mod:`.services`). Requests
that cannot be served are refused before the upgrade with an HTTP status and a JSON
reason; failures after the upgrade close the websocket with a code and a reason
that the page's ``CloseEvent.reason`` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiohttp import WSCloseCode, web

from .limits import LimitExceeded, TunnelLimits, origin_allowed
from .reservations import State
from .services import ServiceError, ServiceManager
from .settings import Settings
from .tunnel import BackendError, Tunnel, TunnelStats, close_reason

log = logging.getLogger("websocketserver.tunnel")

START_FAILED = 1011  # websocket close code: the service behind the tunnel failed


def json_error(status: int, message: str,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


_UPGRADE_REQUIRED = {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"}


def peer_of(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return "?"
    return f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"


class _Session:
    """A service tunnel seen from its reservation: a release or shutdown ends it."""

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.tunnel: Tunnel | None = None
        self.stopped: str | None = None

    def close(self, reason: str) -> None:
        if self.tunnel is not None:
            self.tunnel.close(WSCloseCode.GOING_AWAY, reason)
        elif self.stopped is None:  # still starting: interrupt the start
            self.stopped = reason
            self.task.cancel()


class WebSocketGateway:
    """The aiohttp handler of the websocket port, and the registry of live tunnels."""

    def __init__(self, settings: Settings, services: ServiceManager) -> None:
        self.settings = settings
        self.services = services
        self.identity = services.identity
        self.limits = TunnelLimits(settings.max_tunnels, settings.max_tunnels_per_client,
                                   settings.max_tunnels_per_user)
        self.tunnels: set[Tunnel] = set()
        self._handlers: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._upgrades = services.metrics.http_requests.labels("ws", "101")
        self._closing = False

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=("binary",), compress=False,
                                   # aiohttp refuses a message of exactly max_msg_size
                                   max_msg_size=self.settings.max_message_size + 1,
                                   heartbeat=self.settings.ping_interval)
        refusal = await self._refusal(request, ws)
        if refusal is not None:
            status, message = refusal
            log.warning("websocket refused (%d): %s: %s", status, peer_of(request), message)
            return json_error(status, message, _UPGRADE_REQUIRED if status == 426 else None)
        client = self.identity.client_address(request)
        user = self.identity.user(request)
        try:
            self.limits.acquire(client, user)
        except LimitExceeded as exc:
            log.warning("websocket refused (%d): %s", exc.status, exc)
            return json_error(exc.status, str(exc))
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await ws.prepare(request)
            self._upgrades.inc()
            token = request.query.get("token")
            if token is None:
                target = (self.settings.client_hostname, self.settings.client_port)
                await self._tunnel(request, client, ws, target, None)  # type: ignore[arg-type]
            else:
                await self._service_tunnel(request, client, ws, token)
            return ws
        finally:
            self._handlers.discard(task)
            self.limits.release(client, user)

    async def _refusal(self, request: web.BaseRequest,
                       ws: web.WebSocketResponse) -> tuple[int, str] | None:
        """Why this upgrade request is refused before the handshake, if it is."""
        if self._closing:
            return 503, "server is shutting down"
        if request.method != "GET":
            return 405, "websocket upgrades are GET requests"
        if request.version < (1, 1):
            return 400, "websocket upgrades need HTTP/1.1"
        try:
            ready = ws.can_prepare(request).ok
        except (web.HTTPException, ValueError):  # aiohttp chokes on some non-ASCII headers
            ready = False
        if not ready:
            upgrade = request.headers.get("Upgrade", "").lower()
            if upgrade == "websocket" and request.headers.get("Sec-WebSocket-Version") == "13":
                return 400, "malformed websocket handshake"
            return 426, "this port serves websocket upgrades only (version 13)"
        if not origin_allowed(request.headers.get("Origin"), self.settings.allowed_origins):
            return 403, f"origin not allowed: {request.headers.get('Origin')}"
        token = request.query.get("token")
        if token is None:
            if self.settings.client_port is None:
                return 404, "no service here: no --client_port configured and no ?token= given"
            return None
        known = await self.services.store.get(token)
        if known is None:
            return 404, "unknown or expired token"
        if known.state is not State.RESERVED:
            return 409, "token is already in use"
        return None

    async def _service_tunnel(self, request: web.BaseRequest, client: str,
                              ws: web.WebSocketResponse,
                              token: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        session = _Session(task)
        try:
            async with self.services.activate(token, session.close) as target:
                deadline = time.monotonic() + self.settings.start_timeout

                def opened(tunnel: Tunnel) -> None:
                    session.tunnel = tunnel
                    self.services.attach(token, tunnel.stats)

                await self._tunnel(request, client, ws, target, deadline, opened)
        except ServiceError as exc:
            await ws.close(code=START_FAILED, message=close_reason(str(exc)))
        except asyncio.CancelledError:
            if session.stopped is None:
                raise
            task.uncancel()
            await ws.close(code=WSCloseCode.GOING_AWAY, message=close_reason(session.stopped))

    async def _tunnel(self, request: web.BaseRequest, client: str, ws: web.WebSocketResponse,
                      target: tuple[str, int], deadline: float | None,
                      opened: Callable[[Tunnel], None] | None = None) -> None:
        host, port = target
        stats = TunnelStats(peer=client, target=f"{host}:{port}")
        tunnel = Tunnel(request, ws, stats)
        try:
            await self._connect(tunnel, host, port, deadline)
        except BackendError as exc:
            log.warning("tunnel refused: %s -> %s: %s", stats.peer, stats.target, exc)
            await ws.close(code=START_FAILED, message=close_reason(str(exc)))
            return
        if opened is not None:
            opened(tunnel)
        self.tunnels.add(tunnel)
        self.services.metrics.tunnel_opened(tunnel)
        log.info("tunnel open: %s -> %s", stats.peer, stats.target)
        try:
            await tunnel.run()
        finally:
            self.tunnels.discard(tunnel)
            self.services.metrics.tunnel_closed(tunnel)
            log.info("tunnel closed: %s -> %s, %d bytes up, %d bytes down, %.2f s (%s)",
                     stats.peer, stats.target, stats.bytes_up, stats.bytes_down,
                     time.monotonic() - stats.started, tunnel.reason)

    @staticmethod
    async def _connect(tunnel: Tunnel, host: str, port: int, deadline: float | None) -> None:
        """Connect once, or keep trying until ``deadline`` while the port is not open yet."""
        while True:
            try:
                await tunnel.connect(host, port)
                return
            except BackendError:
                if deadline is None or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)

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

    async def close(self, timeout: float) -> None:
        """Refuse new upgrades, close every tunnel and wait for their handlers."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for tunnel in list(self.tunnels):
            tunnel.close(WSCloseCode.GOING_AWAY, "server shutting down")
        if self._handlers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*self._handlers, return_exceptions=True)
