"""The REST API under ``/v1/`` on the HTTP port (all GET, as in the original, but the
Slurm jobs' ``POST /v1/job_report``).

Every call needs the security token when one is configured (``?security_token=``
or ``Authorization: Bearer``), compared in constant time; the one exception is
``/v1/release/{token}``, which the holder of that reservation token may call.
Errors are JSON ``{"error": "..."}`` with a fitting status. The calls that change
state (stop, reserve, release) made by a page of another site are refused (403) unless
they carry the security token or the page's origin is in ``--allowed_origin``: with no
security token, an ``<img src=".../v1/stop">`` on any page stopped the server.

A token reserved by a known user is that user's: other callers see its instance
with ``"token": null`` and may not release it (403); the security token's holder
is an administrator, who sees and may release every one.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from .. import __version__
from ..core.errors import Refused
from ..core.protocol import cross_site_refusal
from ..identity import USER_KEY_PARAM
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..sessions.job_launcher import HEADER
from ..sessions.jobs import REPORT_MAX_SIZE
from ..sessions.reservations import Reservation, State, may_use
from ..sessions.services import ServiceManager
from ..sessions.token_status import describe
from . import openapi
from .dashboard import View, render_overview, render_services, render_status
from .events import EventStreams

log = logging.getLogger("websocketserver.api")

TOKEN_PARAM = "security_token"
_NOT_OPTIONS = {TOKEN_PARAM, USER_KEY_PARAM}
_STATE_CHANGING = {"stop", "reserve", "release", "share"}

Handler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]


def json_error(status: int, message: str) -> web.Response:
    """An error answer of the HTTP port: ``{"error": message}``."""
    return web.json_response({"error": message}, status=status)


class RestApi:
    """Routes ``/v1/...`` requests; ``stop`` is called to begin a graceful shutdown."""

    def __init__(self, services: ServiceManager, security_token: str | None,
                 stop: Callable[[], None], node: str = "",
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self.services = services
        self._token = security_token.encode() if security_token else None
        self._stop = stop
        self._node = node
        self._stopping = stopping
        self._began = time.monotonic()
        self.events = EventStreams(services.store, self._describe, services.metrics)
        services.metrics.event_streams.set_function(lambda: self.events.open)
        self._routes: dict[tuple[str, str | None], Handler] = {
            ("stop", None): self.stop,
            ("status", None): self.status,
            ("status", "token"): self.token_status,
            ("events", "token"): self.token_events,
            ("status_view", None): self.status_view,
            ("metrics", None): self.metrics,
            ("reserve", "service"): self.reserve,
            ("release", "token"): self.release,
            ("share", "token"): self.share,
        }
        """The GET calls: (name, the name of its one path parameter, if any) ->
        handler; :meth:`routes` lists them with the calls outside this table."""

    def routes(self) -> list[tuple[str, str]]:
        """Every call this API answers, as (method, path template): what the OpenAPI
        document must describe, read from the dispatch itself."""
        calls = [("GET", f"/v1/{name}" + (f"/{{{param}}}" if param else ""))
                 for name, param in self._routes]
        return [*calls, ("GET", "/v1/health"), ("GET", "/v1/openapi.json"),
                ("POST", "/v1/job_report")]

    def authorized(self, request: web.BaseRequest) -> bool:
        """Whether the request carries the security token (always true without one)."""
        if self._token is None:
            return True
        offered = request.query.get(TOKEN_PARAM)
        if offered is None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            offered = value.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), self._token)

    def _admin(self, request: web.BaseRequest) -> bool:
        """Whether the caller holds the configured security token (without one: nobody)."""
        return self._token is not None and self.authorized(request)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Dispatch ``/vN/name[/argument]``."""
        parts = request.path.strip("/").split("/")
        version, name, args = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
        if (version, name, args) == ("v1", "health", []) and request.method in ("GET", "HEAD"):
            return self.health()  # for load balancers: no token needed
        if (version, name, args) == ("v1", "job_report", []):
            return await self.job_report(request)  # signed per job: no token needed
        if (version, name, args) == ("v1", "openapi.json", []) and request.method in (
                "GET", "HEAD"):
            return web.json_response(openapi.document(self.routes()))  # public
        matches = [key for key in self._routes if key[0] == name
                   and (key[1] is not None) == (len(args) == 1) and len(args) <= 1]
        if version != "v1" or not matches or (args and not args[0]):
            return json_error(404, f"unknown API call: {request.path}")
        handler = self._routes[matches[0]]
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "the REST API takes GET requests")
        if request.method == "HEAD" and name in _STATE_CHANGING:  # a probe changes nothing
            return json_error(405, f"/v1/{name} changes the server's state: use GET")
        if name in _STATE_CHANGING and not self._admin(request):  # a forged request
            refusal = cross_site_refusal(  # cannot carry the security token
                request.headers, self.services.settings.allowed_origins)
            if refusal is not None:
                return json_error(refusal.status, refusal.reason)
        try:
            if not self.authorized(request) and not await self._holds_token(request, name,
                                                                            args):
                return json_error(401, "missing or wrong security_token")
            return await handler(request, args[0] if args else "")
        except Refused as exc:  # a store outage too: 503, fail closed, say why
            return json_error(exc.status, exc.reason)

    def health(self) -> web.StreamResponse:
        """``/v1/health``: 200 while serving, 503 while shutting down. A store outage
        shows as ``"store": "unavailable"`` but is no failure: a Redis outage must not
        make a balancer drop every instance."""
        body = {"status": "stopping" if self._stopping() else "ok",
                "node": self._node or None,
                "store": "ok" if self.services.store.available else "unavailable"}
        return web.json_response(body, status=503 if self._stopping() else 200)

    async def job_report(self, request: web.BaseRequest) -> web.StreamResponse:
        """``POST /v1/job_report``: a Slurm job's launcher reports its port, signed with
        the job's own secret (:meth:`~.services.ServiceManager.job_report`)."""
        if request.method != "POST":
            return json_error(405, "a job report is a POST")
        refusal = cross_site_refusal(request.headers,
                                     self.services.settings.allowed_origins)
        if refusal is not None:  # a job's launcher is no browser
            return json_error(refusal.status, refusal.reason)
        if (request.content_length or 0) > REPORT_MAX_SIZE:
            return json_error(413, f"a job report has at most {REPORT_MAX_SIZE} bytes")
        body = await request.content.read(REPORT_MAX_SIZE + 1)
        if len(body) > REPORT_MAX_SIZE:
            return json_error(413, f"a job report has at most {REPORT_MAX_SIZE} bytes")
        status, message = await self.services.jobs.report(body, request.headers.get(HEADER, ""))
        if status != 200:
            return json_error(status, message)
        return web.json_response({"status": message})

    async def _holds_token(self, request: web.BaseRequest, name: str, args: list[str]) -> bool:
        """The reservation token is the credential of the calls about it (an ended one's
        status and events too, for a while)."""
        if not args or name not in ("release", "status", "events", "share"):
            return False
        if name == "release" and await self.services.store.find_share(args[0]):
            return True  # a share token revokes itself
        ended = name in ("status", "events")
        return await self.services.store.get(args[0], ended=ended) is not None

    async def _token_reservation(self, request: web.BaseRequest, token: str) -> Reservation:
        """``token``'s reservation (ended ones too), if the caller may see it: its
        holder (owner binding as for a release), or the administrator."""
        reservation = await self.services.store.get(token, ended=True)
        if reservation is None:
            raise Refused(404, "unknown or expired token")
        user = self._user(request)
        if not self._admin(request) and not may_use(reservation, user):
            raise Refused(403, f"token is reserved by another user than {user}")
        return reservation

    def _describe(self, reservation: Reservation) -> dict[str, Any]:
        service = self.services.services.get(reservation.service)
        grace = self.services.grace(service) if service is not None else 0.0
        return describe(reservation, grace, self.services.settings.timeout)

    async def share(self, request: web.BaseRequest, token: str) -> web.StreamResponse:
        """``/v1/share/{token}?mode=view|control``: a share token for viewers."""
        reservation = await self._token_reservation(request, token)
        mode = request.query.get("mode", "view")
        share = await self.services.shares.share(reservation, mode)
        return web.json_response({"token": share, "mode": mode})

    async def token_status(self, request: web.BaseRequest, token: str) -> web.StreamResponse:
        return web.json_response(self._describe(await self._token_reservation(request,
                                                                               token)))

    async def token_events(self, request: web.BaseRequest, token: str) -> web.StreamResponse:
        reservation = await self._token_reservation(request, token)
        client = self.services.identity.client_address(request)
        return await self.events.stream(request, reservation, client)

    async def stop(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        log.info("stop requested over REST by %s", request.remote)
        self._stop()
        return web.json_response({"status": "stopping"})

    def _user(self, request: web.BaseRequest) -> str | None:
        return self.services.identity.user(request)

    async def status(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        return web.json_response(await self.services.status(self._user(request),
                                                            self._admin(request)))

    async def reserve(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        options = {k: v for k, v in request.query.items() if k not in _NOT_OPTIONS}
        reservation = await self.services.reserve(name, options, self._user(request))
        return web.json_response({"token": reservation.token})

    async def release(self, request: web.BaseRequest, token: str) -> web.StreamResponse:
        reservation = await self.services.release(token, self._user(request),
                                                  self._admin(request))
        # the token asked for: a share token's revoke must not reveal the reservation's
        return web.json_response({"released": token, "service": reservation.service})

    async def status_view(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        admin = self._admin(request)
        services = await self.services.status(self._user(request), admin)
        await self._reclaim_times(services)
        view = View(self._node, admin, self.services.settings.ws_port, self._novnc())
        overview = render_overview(self._figures(), view)
        if "fragment" in request.query:  # the live page refreshing itself
            return web.Response(text=overview + render_services(services, view),
                                content_type="text/html")
        return web.Response(text=render_status(services, overview, view),
                            content_type="text/html")

    def _novnc(self) -> frozenset[str]:
        """The RFB services whose reservations noVNC's ``vnc.html``, served here, opens."""
        folder = self.services.settings.http_directory
        if folder is None or not (folder / "vnc.html").is_file():
            return frozenset()
        return frozenset(name for name, service in self.services.services.items()
                         if service.config.protocol == "rfb")

    async def _reclaim_times(self, services: list[dict[str, Any]]) -> None:
        """Add ``reclaim_seconds_left`` to each reserved, never used instance: when
        ``--timeout`` frees it."""
        timeout = self.services.settings.timeout
        now = time.monotonic()
        reserved = {(r.service, r.index, r.node): r.changed + timeout - now
                    for r in await self.services.store.list() if r.state is State.RESERVED}
        for service in services:
            for instance in service["instances"]:
                left = reserved.get((service["name"], instance["index"], instance.get("node")))
                if left is not None and instance["state"] == str(State.RESERVED):
                    instance["reclaim_seconds_left"] = max(0.0, left)

    def _figures(self) -> dict[str, Any]:
        """Server-wide figures for the dashboard, from the metrics (one collection)."""
        samples = _samples(self.services.metrics.registry)
        return {"version": __version__, "uptime": time.monotonic() - self._began,
                "tunnels_open": samples.get(("websocketserver_tunnels_open", ()), 0),
                "tunnels_total": samples.get(("websocketserver_tunnels_total", ()), 0),
                "bytes_down": samples.get(("websocketserver_bytes_total",
                                           (("direction", "down"),)), 0),
                "bytes_up": samples.get(("websocketserver_bytes_total",
                                         (("direction", "up"),)), 0)}

    async def metrics(self, request: web.BaseRequest, _: str) -> web.StreamResponse:
        body = self.services.metrics.render(self.services.services,
                                            await self.services.store.list())
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in registry.collect() for sample in family.samples}
