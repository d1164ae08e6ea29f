"""The REST API under ``/v1/`` on the HTTP port (all GET, as in the original).

Every call needs the security token when one is configured (``?security_token=``
or ``Authorization: Bearer``), compared in constant time; the one exception is
``/v1/release/{token}``, which the holder of that reservation token may call.
Errors are JSON ``{"error": "..."}`` with a fitting status.
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

from .identity import USER_KEY_PARAM
from .services import ServiceError, ServiceManager
from .websocket import json_error

log = logging.getLogger("websocketserver.api")

TOKEN_PARAM = "security_token"
_NOT_OPTIONS = {TOKEN_PARAM, USER_KEY_PARAM}

Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


class RestApi:
    """Routes ``/v1/...`` requests; ``stop`` is called to begin a graceful shutdown."""

    def __init__(self, services: ServiceManager, security_token: str | None,
                 stop: Callable[[], None]) -> None:
        self.services = services
        self._token = security_token.encode() if security_token else None
        self._stop = stop
        self._routes: dict[str, tuple[Handler, bool]] = {
            "stop": (self.stop, False),
            "status": (self.status, False),
            "status_view": (self.status_view, False),
            "reserve": (self.reserve, True),
            "release": (self.release, True),
        }

    def authorized(self, request: web.Request) -> bool:
        """Whether the request carries the security token (always true without one)."""
        if self._token is None:
            return True
        offered = request.query.get(TOKEN_PARAM)
        if offered is None:
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            offered = value.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(offered.encode(), self._token)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Dispatch ``/vN/name[/argument]``."""
        parts = request.path.strip("/").split("/")
        version, name, args = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
        route = self._routes.get(name) if version == "v1" else None
        if route is None:
            return json_error(404, f"unknown API call: {request.path}")
        handler, takes_argument = route
        if takes_argument != (len(args) == 1) or (args and not args[0]):
            return json_error(404, f"unknown API call: {request.path}")
        if request.method not in ("GET", "HEAD"):
            return json_error(405, "the REST API takes GET requests")
        if not self.authorized(request) and not await self._holds_token(request, name, args):
            return json_error(401, "missing or wrong security_token")
        try:
            return await handler(request, args[0] if args else "")
        except ServiceError as exc:
            return json_error(exc.status, str(exc))

    async def _holds_token(self, request: web.Request, name: str, args: list[str]) -> bool:
        return name == "release" and await self.services.store.get(args[0]) is not None

    async def stop(self, request: web.Request, _: str) -> web.StreamResponse:
        log.info("stop requested over REST by %s", request.remote)
        self._stop()
        return web.json_response({"status": "stopping"})

    def _user(self, request: web.Request) -> str | None:
        return self.services.identity.user(request)

    async def status(self, request: web.Request, _: str) -> web.StreamResponse:
        return web.json_response(await self.services.status(self._user(request)))

    async def reserve(self, request: web.Request, name: str) -> web.StreamResponse:
        options = {k: v for k, v in request.query.items() if k not in _NOT_OPTIONS}
        reservation = await self.services.reserve(name, options, self._user(request))
        return web.json_response({"token": reservation.token})

    async def release(self, request: web.Request, token: str) -> web.StreamResponse:
        reservation = await self.services.release(token)
        return web.json_response({"released": reservation.token,
                                  "service": reservation.service})

    async def status_view(self, request: web.Request, _: str) -> web.StreamResponse:
        services = await self.services.status(self._user(request))
        return web.Response(text=render_status(services), content_type="text/html")


def render_status(services: list[dict[str, Any]]) -> str:
    """``/v1/status`` as a readable HTML page (refreshes itself every 5 s)."""
    now = time.time()
    blocks = []
    for service in services:
        rows = "".join(
            f"<tr><td>{i['index']}</td><td class='state {html.escape(i['state'])}'>"
            f"{html.escape(i['state'])}</td><td>{html.escape(i['owner'] or 'anonymous')}</td>"
            f"<td>{_age(now - i['timestamp'])}</td><td><code>{html.escape(i['token'])}</code>"
            f"</td><td><code>{html.escape(json.dumps(i['options']))}</code></td></tr>"
            for i in service["instances"]
        ) or "<tr><td colspan='6' class='idle'>no instances</td></tr>"
        used = len(service["instances"])
        options = html.escape(json.dumps(service["common_options"]))
        blocks.append(
            f"<section><h2>{html.escape(service['name'])} <small>{used} of "
            f"{service['count']} in use</small></h2><p>common options: <code>{options}"
            "</code></p><table><tr><th>index</th><th>state</th><th>owner</th><th>age</th>"
            f"<th>token</th><th>options</th></tr>{rows}</table></section>"
        )
    body = "".join(blocks) or "<p>No services are configured.</p>"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><meta http-equiv='refresh' "
        "content='5'><title>websocketserver status</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1em}td,th{border:1px solid #ccc;"
        "padding:.3em .8em;text-align:left}th{background:#f3f3f3}small{color:#666;"
        "font-weight:normal}.active{color:#070}.starting{color:#b60}.stopping{color:#a00}"
        ".idle{color:#888}</style></head><body><h1>websocketserver status</h1>"
        f"{body}</body></html>"
    )


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
