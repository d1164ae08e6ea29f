"""The websocket port: accept an upgrade on any path, pick its target, tunnel.

Without ``?token=`` the target is ``--client_hostname:--client_port`` (basic mode);
with one, the reserved service is started first, or its detached instance
re-attached (``--reconnect_grace``, see :mod:`.services`).

Each connection goes through two protocols:

1. :class:`~.handshake.Handshake` reads the upgrade request, and
   :func:`~.protocol.decide` judges it; a request that cannot be served is refused
   before the upgrade with an HTTP status and a JSON reason.
2. An accepted one is handed to picows (:mod:`.tunnels`), which answers ``101`` and
   from then on parses frames in C for the :class:`~.tunnel.Tunnel`. A basic-mode
   one goes to a relay process instead, which does the same there (:mod:`.relay`).

Failures after the upgrade close the websocket with a code and a reason that the
page's ``CloseEvent.reason`` shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from picows import WSCloseCode
from prometheus_client import Counter

from ..cluster import forward
from ..core.errors import Refused, StoreUnavailable
from ..core.protocol import Accept, Policy, UpgradeRequest, decide
from ..identity import Identity
from ..metrics import Metrics
from ..sessions.reservations import Reservation
from ..sessions.service import Elsewhere
from ..sessions.services import ServiceManager
from ..sessions.session import Session
from ..sessions.shares import Viewing
from ..sessions.viewers import Viewer
from ..settings import Settings
from .backend import BackendError
from .handshake import Handshake, log_refusal, write_refusal
from .live import LiveTunnels, refusal_protocol, switch_to, websocket_protocol
from .refusal import Refusal
from .relay import RelayPool
from .rfb_filter import RfbFilter
from .tunnel import Tunnel
from .tunnel_limits import TunnelLimits

if TYPE_CHECKING:  # loaded for a cluster only (redis-py costs ~80 ms at every start)
    from ..cluster.membership import Cluster

log = logging.getLogger("websocketserver.gateway")

class _Websocket:
    """A session's websocket as its session closes it (a release, shutdown): the tunnel
    once it relays, else the task still starting the service."""

    def __init__(self, task: asyncio.Task[object], tunnel: Tunnel) -> None:
        self.task = task
        self.tunnel = tunnel
        self.running = False
        self.stopped: str | None = None  # why a release or shutdown ended it
        self.interrupted = False  # its start was cancelled for that

    @contextlib.asynccontextmanager
    async def closing(self) -> AsyncIterator[None]:
        """Run the websocket's session: a refusal closes it with its code and reason; a
        release or shutdown that interrupted its start, with 1001 and why."""
        try:
            yield
        except Refused as exc:
            self.tunnel.close(WSCloseCode(exc.close), exc.reason)
            await self.tunnel.closed
        except asyncio.CancelledError:
            if not self.interrupted:
                raise
            self.task.uncancel()
            self.tunnel.close(WSCloseCode.GOING_AWAY, self.stopped or "")
            await self.tunnel.closed

    def close(self, reason: str) -> None:
        if self.stopped is not None:
            return
        self.stopped = reason
        if self.running:
            self.tunnel.close(WSCloseCode.GOING_AWAY, reason)
        else:  # still starting: interrupt the start
            self.interrupted = True
            self.task.cancel()


class WebSocketGateway:
    """The websocket port: its listener, the decisions on upgrades, the live tunnels.

    ``relays``: hand basic-mode tunnels to relay processes (``None``: none running).
    ``cluster``: this instance's cluster, whose other instances a websocket may be
    forwarded to, or come forwarded from (``None``: one server).
    """

    def __init__(self, settings: Settings, services: ServiceManager, identity: Identity,
                 metrics: Metrics, relays: RelayPool | None = None,
                 cluster: Cluster | None = None) -> None:
        self.settings = settings
        self.cluster = cluster
        self.services = services
        self.identity = identity
        self.limits = TunnelLimits(settings.max_tunnels, settings.max_tunnels_per_client,
                                   settings.max_tunnels_per_user)
        self.live = LiveTunnels(settings, metrics.tunnel_opened, metrics.tunnel_closed)
        self.relays = relays
        if relays is not None:
            relays.attach(self.limits, metrics)
        self._server: asyncio.Server | None = None
        self._requests = metrics.http_requests
        self._upgrades = self._requests.labels("ws", "101")
        self._refusals: dict[int, Counter] = {}
        self._rfb_pages = any(service.protocol == "rfb" for service in settings.services)
        self._dropped = metrics.viewer_input_dropped

    @property
    def tunnels(self) -> set[Tunnel]:
        """The tunnels open in this process."""
        return self.live.tunnels

    async def listen(self, port: int, context: ssl.SSLContext | None) -> list[tuple[str, int]]:
        """Listen on ``port`` (TLS with ``context``); the addresses listened on."""
        settings = self.settings
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Handshake(settings.max_header_size, settings.handshake_timeout,
                              self.upgrade, self.refuse),
            settings.listen_address, port, ssl=context, backlog=1024, reuse_address=True,
            ssl_handshake_timeout=settings.handshake_timeout if context else None)
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    # -- deciding on an upgrade request ---------------------------------------------

    def refuse(self, transport: asyncio.Transport, refusal: Refused) -> None:
        """Answer ``refusal`` as JSON, close the connection, count it."""
        write_refusal(transport, refusal)
        self._count_refusal(refusal)

    def _count_refusal(self, refusal: Refused) -> None:
        counter = self._refusals.get(refusal.status)
        if counter is None:
            counter = self._refusals[refusal.status] = self._requests.labels(
                "ws", str(refusal.status))
        counter.inc()

    def upgrade(self, request: UpgradeRequest, transport: asyncio.Transport,
                tail: bytes) -> None:
        """Act on a complete upgrade request: refuse it, or open its tunnel."""
        policy = Policy(self.settings.allowed_origins, self.settings.client_port is not None,
                        self.live.closing, self.settings.host_names)
        decision = decide(request, policy)
        if isinstance(decision, Refused):
            self.refuse(transport, decision)
            return
        came = forward.check(request, self.cluster.secret if self.cluster else None)
        if isinstance(came, Refused):
            self.refuse(transport, came)
        elif decision.token is None:
            self._accept(request, transport, tail, decision)
        else:
            transport.pause_reading()  # until the reservation has been claimed
            self.live.spawn(self._upgrade_token(request, transport, tail, decision,
                                                decision.token, came),
                            f"upgrade from {request.remote or '?'}")

    async def _upgrade_token(self, request: UpgradeRequest, transport: asyncio.Transport,
                             tail: bytes, accept: Accept, token: str,
                             came: forward.Forwarded | None) -> None:
        """Claim ``token`` (reserved -> starting, or detached -> active: one store
        operation) before answering, so of simultaneous upgrades with one token exactly
        one is answered 101. In a cluster, a reservation of another instance is taken
        over here if a slot is free, else the websocket is forwarded to its owner."""
        client = came.client if came else self.identity.client_address(request)
        user = came.user if came else self.identity.user(request)
        try:
            if came is not None and self.cluster is not None and not await self.cluster.fresh(
                    came.nonce, came.at):
                raise Refused(403, "forwarded websocket replayed or too old")
            claimed = await self.services.claim(token, user)
            if isinstance(claimed, Elsewhere) and (came is not None or self.cluster is None):
                raise Refused(409, "reservation moved to another instance")  # one hop
        except Refused as exc:
            if not transport.is_closing():
                transport.resume_reading()
                self._refuse_token(request, transport, tail, accept, exc)
            return
        if isinstance(claimed, Elsewhere):
            await self._forward(request, transport, tail, token, claimed.node, client, user)
            return
        if not transport.is_closing():
            transport.resume_reading()
            if self._accept(request, transport, tail, accept, client, user, claimed):
                return
        if not isinstance(claimed, Viewing):
            await self.services.unclaim(token)  # no websocket after all: reserved again

    def _refuse_token(self, request: UpgradeRequest, transport: asyncio.Transport,
                      tail: bytes, accept: Accept, refused: Refused) -> None:
        """Refuse a token: a browser's websocket inside the websocket, so that its page
        can show why (:mod:`.refusal`); any other client's, and a limit or an
        unavailable store for anyone, before the upgrade."""
        opted = request.query.get("refusal")
        if ("Origin" not in request.headers or refused.status in (429, 503)
                or opted == "http"):
            self.refuse(transport, refused)
            return
        client = self.identity.client_address(request)
        user = self.identity.user(request)
        try:  # held while refusing: the limits bound open refusals too
            self.limits.acquire(client, user)
        except Refused as exc:
            self.refuse(transport, exc)
            return
        log_refusal(transport, refused, ", in the websocket")
        self._count_refusal(refused)
        rfb = opted == "rfb" or (self._rfb_pages and opted != "close")
        switch_to(transport, refusal_protocol(
            Refusal(refused, rfb, lambda: self.limits.release(client, user)), accept.binary),
            accept.key, tail)

    async def _forward(self, request: UpgradeRequest, transport: asyncio.Transport,
                       tail: bytes, token: str, node: str, client: str,
                       user: str | None) -> None:
        """Relay the websocket, bytes both ways, to ``node``, which runs its session."""
        assert self.cluster is not None
        try:
            self._acquire(client, user)
        except Refused as exc:
            self.refuse(transport, exc)
            return
        try:
            owner = await self.cluster.owner(node)
            if owner is None:
                raise BackendError(f"instance {node} is not available")
            host, port, now = owner
            head = forward.request_head(request, forward.signed_headers(
                self.cluster.secret, token, round(now), client, user))
            await forward.splice(transport, host, port, head, tail,
                                 lambda: self.limits.release(client, user))
        except (BackendError, StoreUnavailable) as exc:
            self.limits.release(client, user)
            if not transport.is_closing():
                detail = exc.detail if isinstance(exc, StoreUnavailable) else str(exc)
                self.refuse(transport, Refused(503, f"cannot reach instance {node}: {detail}"))
            return
        log.info("websocket forwarded: %s -> %s (%s:%d)", client, node, host, port)

    def _accept(self, request: UpgradeRequest, transport: asyncio.Transport, tail: bytes,
                accept: Accept, client: str | None = None, user: str | None = None,
                claimed: Reservation | Viewing | None = None) -> bool:
        """Answer 101 and run the tunnel; False if a limit refused it (then answered).
        ``client``/``user``: as a forwarding instance vouched for them (else the
        request's own); ``claimed``: the reservation of ``accept.token`` as claimed,
        or the shared session a share token's viewer joins."""
        if client is None:
            client = self.identity.client_address(request)
            user = self.identity.user(request)
        try:
            self._acquire(client, user)
        except Refused as exc:
            self.refuse(transport, exc)
            return False
        self._upgrades.inc()
        if accept.token is None and self.relays is not None and self.relays.hand_over(
                transport, accept.key, accept.binary, tail, client, user):
            return True
        tunnel = self.live.tunnel(client)
        job = isinstance(claimed, Reservation) and self.services.services[
            claimed.service].batch is not None
        switch_to(transport, websocket_protocol(tunnel, accept.binary, self.settings,
                                                keep_alive=job), accept.key, tail)
        if accept.token is None:
            self.live.spawn(self.live.basic(tunnel, lambda: self.limits.release(client, user)),
                            f"tunnel from {client}")
        elif isinstance(claimed, Viewing):
            self.live.spawn(self._viewer_tunnel(tunnel, client, user, claimed),
                            f"{claimed.session.id} viewer from {client}")
        else:  # claimed by _upgrade_token
            assert claimed is not None
            self.live.spawn(self._service_tunnel(tunnel, client, user, claimed),
                            f"{claimed.service}[{claimed.index}] tunnel from {client}")
        return True

    def _acquire(self, client: str, user: str | None) -> None:
        """Take the tunnel's slot in the limits, or raise :class:`~.errors.Refused`."""
        try:
            self.limits.acquire(client, user)
        except Refused:
            if self.relays is None:
                raise
            self.relays.receive()  # a relay may have freed one: its report is waiting
            self.limits.acquire(client, user)

    # -- running a tunnel -----------------------------------------------------------

    async def _service_tunnel(self, tunnel: Tunnel, client: str, user: str | None,
                              claimed: Reservation) -> None:
        try:
            await self._run_service(tunnel, claimed)
        finally:
            self.limits.release(client, user)

    async def _run_service(self, tunnel: Tunnel, claimed: Reservation) -> None:
        token = claimed.token
        task = asyncio.current_task()
        assert task is not None
        websocket = _Websocket(task, tunnel)
        async with websocket.closing(), self.services.activate(
                token, websocket.close, claimed=claimed) as session:
            deadline = time.monotonic() + self.settings.start_timeout
            tunnel.when_stopped(session.leave)
            assert session.address is not None  # started
            if session.service.config.protocol == "rfb":  # its ClientInit: shared
                tunnel.rfb = RfbFilter(tunnel, "owner", self._dropped, session.vnc_password,
                                       lambda types: setattr(session, "rfb_offered", types))
            if session.job is not None:  # the job's end is the reason, not the EOF
                tunnel.on_backend_end = lambda: self.live.spawn(
                    self._explain_end(tunnel, session), f"{session.id} ended")

            def opened() -> None:
                websocket.running = True
                session.traffic = tunnel.stats

            reached = await self._tunnel(tunnel, session.address, deadline, opened)
            # kept for a reconnect if the browser left: not a release, shutdown, or
            # the service refusing or ending the connection
            session.keep = (reached and websocket.stopped is None
                            and not self.live.closing and not tunnel.backend_ended)

    async def _viewer_tunnel(self, tunnel: Tunnel, client: str, user: str | None,
                             viewing: Viewing) -> None:
        """A viewer of a shared session: its own connection to the running instance,
        closed with the session (or when its share is revoked); nothing else changes
        when it leaves."""
        task = asyncio.current_task()
        assert task is not None
        websocket = _Websocket(task, tunnel)
        session = viewing.session
        try:
            async with websocket.closing():
                with session.viewers.joined(Viewer(viewing.share, viewing.mode, user,
                                                   websocket.close)):
                    if session.address is None:
                        raise Refused(409, "the shared session ended")
                    if session.service.config.protocol == "rfb":  # view: no input passes
                        tunnel.rfb = RfbFilter(tunnel, "view" if viewing.mode == "view"
                                               else "owner", self._dropped,
                                               session.vnc_password)
                    deadline = time.monotonic() + self.settings.start_timeout
                    await self._tunnel(tunnel, session.address, deadline,
                                       lambda: setattr(websocket, "running", True))
        finally:
            self.limits.release(client, user)

    async def _explain_end(self, tunnel: Tunnel, session: Session) -> None:
        """Close a job session's websocket whose backend ended: with the job's end if
        Slurm says it ended (the time limit, a scancel), else as any backend's end."""
        ended = await self.services.jobs.job_ended(session)
        if ended is not None:
            tunnel.close(WSCloseCode.GOING_AWAY, ended)
        else:
            tunnel.close(WSCloseCode.OK, "backend closed the connection")

    async def _tunnel(self, tunnel: Tunnel, target: tuple[str, int], deadline: float,
                      opened: Callable[[], None]) -> bool:
        """Connect to a service as soon as its port is open, and relay until the end.

        False if the service's port did not accept in time (the browser was told);
        True if it did, or the browser left before.
        """
        host, port = target
        tunnel.stats.target = f"{host}:{port}"
        try:
            await self._connect_until(tunnel, host, port, deadline)
        except BackendError as exc:
            left = tunnel.closed.done()  # the browser left while the service came up
            self.live.refused(tunnel, exc)
            await tunnel.closed
            return left
        opened()
        self.live.opened(tunnel)
        try:
            await tunnel.closed
        finally:
            self.live.ended(tunnel)
        return True

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


