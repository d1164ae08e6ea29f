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
import html
import json
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
        services = await self.services.status(self._user(request), self._admin(request))
        await self._reclaim_times(services)
        overview = render_overview(self._figures())
        if "fragment" in request.query:  # the live page refreshing itself
            return web.Response(text=overview + render_services(services),
                                content_type="text/html")
        return web.Response(text=render_status(services, overview), content_type="text/html")

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


def render_overview(figures: dict[str, Any]) -> str:
    """The dashboard's head: version, uptime, tunnels (basic mode ones included), bytes."""
    return (
        "<p class='overview'>"
        f"<span>version <b>{html.escape(str(figures['version']))}</b></span>"
        f"<span>up <b>{_age(figures['uptime'])}</b></span>"
        f"<span>tunnels open <b>{figures['tunnels_open']:.0f}</b> "
        "<small>(basic mode and reserved)</small></span>"
        f"<span>tunnels since start <b>{figures['tunnels_total']:.0f}</b></span>"
        f"<span>bytes down <b>{_bytes(figures['bytes_down'])}</b></span>"
        f"<span>bytes up <b>{_bytes(figures['bytes_up'])}</b></span></p>"
    )


def render_services(services: list[dict[str, Any]]) -> str:
    """The dashboard's body: a card per service with its instances."""
    now = time.time()
    blocks = []
    for service in services:
        name = html.escape(service["name"])
        rows = "".join(
            f"<tr><td>{i['index']}</td><td>{_state_cell(i)}</td>"
            f"<td>{html.escape(i['owner'] or 'anonymous')}</td>"
            f"<td>{_age(now - i['timestamp'])}</td>"
            f"<td class='num'>{_bytes(i['bytes_down'])}</td>"
            f"<td class='num'>{_bytes(i['bytes_up'])}</td>"
            f"<td><code>{html.escape(json.dumps(i['options']))}</code></td>"
            f"{_token_cells(i['token'])}</tr>"
            for i in service["instances"]
        ) or "<tr><td colspan='9' class='idle'>no instances</td></tr>"
        used, count = len(service["instances"]), service["count"]
        reserve = (f"<button data-reserve='{name}'>reserve</button>" if used < count
                   else "<span class='full'>all in use</span>")
        options = html.escape(json.dumps(service["common_options"]))
        blocks.append(
            f"<section><h2>{name} <small>{used} of {count} in use</small> {reserve}</h2>"
            f"<p class='options'>common options: <code>{options}</code></p><table><tr>"
            "<th>index</th><th>state</th><th>owner</th><th>age</th><th>bytes down</th>"
            "<th>bytes up</th><th>options</th><th>token</th><th></th></tr>"
            f"{rows}</table></section>"
        )
    return "".join(blocks) or "<p class='idle'>No services are configured.</p>"


def _state_cell(instance: dict[str, Any]) -> str:
    """The state chip; a detached instance's also says how long it is kept, a reserved
    one's how long until it is reclaimed unused (``--timeout``)."""
    state = html.escape(instance["state"])
    left = instance.get("detached_seconds_left")
    until = f" <small>{left:.0f} s left</small>" if left is not None else ""
    reclaim = instance.get("reclaim_seconds_left")
    if reclaim is not None:
        until = f" <small>reclaimed in {_age(reclaim)} unless used</small>"
    return (f"<span class='state {state}'>{state}</span>{until}{_job(instance)}"
            f"{_viewers(instance)}")


def _viewers(instance: dict[str, Any]) -> str:
    """The viewers of the instance's shares here: how many, their modes and users."""
    viewers = instance.get("viewers") or []
    if not viewers:
        return ""
    who = ", ".join(f"{v['mode']}: {v['user'] or 'anonymous'}" for v in viewers)
    return (f" <small class='viewers'>{len(viewers)} viewer{'s' if len(viewers) > 1 else ''}"
            f" ({html.escape(who)})</small>")


def _job(instance: dict[str, Any]) -> str:
    """A Slurm job's id, and why it waits (with its expected start) or where it runs."""
    if instance.get("job_id") is None:
        return ""
    text = f"job {instance['job_id']}"
    if instance.get("job_node"):
        text += f" on {instance['job_node']}"
    elif instance.get("queue_reason"):
        text += f": {instance['queue_reason']}"
        if instance.get("expected_start"):
            text += f", expected {instance['expected_start']}"
    return f" <small class='job'>{html.escape(text)}</small>"


def _token_cells(token: str | None) -> str:
    """The token and release cells of an instance; empty for another user's token."""
    if token is None:
        return "<td class='idle'>another user's</td><td></td>"
    token = html.escape(token)
    return (f"<td><code title='{token}'>{token[:8]}…</code></td>"
            f"<td><button data-release='{token}'>release</button></td>")


_DASHBOARD_SCRIPT = """
const params = new URLSearchParams(location.search);
const auth = new URLSearchParams();
for (const name of ['security_token', 'user_key']) {
  if (params.get(name)) auth.set(name, params.get(name));
}
const withAuth = (path) => auth.size ? `${path}?${auth}` : path;
async function refresh() {
  const url = new URL(location.href);
  url.searchParams.set('fragment', '1');
  try {
    const response = await fetch(url);
    if (response.ok) {
      document.getElementById('services').innerHTML = await response.text();
      document.getElementById('updated').textContent =
        'updated ' + new Date().toLocaleTimeString();
    }
  } catch (error) {
    document.getElementById('updated').textContent = 'server unreachable';
  }
}
document.addEventListener('click', async (event) => {
  const reserve = event.target.dataset.reserve, release = event.target.dataset.release;
  if (reserve) await fetch(withAuth(`/v1/reserve/${encodeURIComponent(reserve)}`));
  if (release) await fetch(withAuth(`/v1/release/${encodeURIComponent(release)}`));
  if (reserve || release) refresh();
});
setInterval(refresh, 2000);
"""


def render_status(services: list[dict[str, Any]], overview: str = "") -> str:
    """``/v1/status_view``: the status as a live dashboard (refreshes every 2 s), under
    the server-wide ``overview``."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>websocketserver status</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222;background:#fafafa}"
        "section{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em 1.5em;"
        "margin-bottom:1.5em}h2{margin:0 0 .3em}small{color:#666;font-weight:normal;"
        "font-size:.7em}table{border-collapse:collapse;width:100%}td,th{border-bottom:1px "
        "solid #eee;padding:.35em .8em;text-align:left}th{color:#555;font-weight:600}"
        ".num{text-align:right;font-variant-numeric:tabular-nums}.state{padding:.1em .5em;"
        "border-radius:1em;background:#eee}.active{background:#d7f5dc;color:#075}"
        ".starting{background:#fff1c9;color:#850}.stopping{background:#fde0e0;color:#a00}"
        ".reserved{background:#e3ecff;color:#248}.queued{background:#ffe6cc;color:#940}"
        ".detached{background:#efe2ff;color:#63a}"
        ".idle,.options,#updated{color:#888}.overview span{margin-right:1.5em}"
        ".full{font-size:.6em;color:#a00}button{cursor:pointer}</style></head><body>"
        "<h1>websocketserver status</h1><p id='updated'></p>"
        f"<main id='services'>{overview}{render_services(services)}</main>"
        f"<script>{_DASHBOARD_SCRIPT}</script></body></html>"
    )


def _bytes(count: float) -> str:
    exponent = 0
    while count >= 1024 and exponent < 3:
        count /= 1024
        exponent += 1
    return f"{count:,.0f} B" if exponent == 0 else f"{count:,.1f} {'KMG'[exponent - 1]}iB"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
