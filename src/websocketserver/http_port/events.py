"""``/v1/events/{token}``: a page's live view of its session, as server-sent events.

A browser's ``EventSource`` opens it with the reservation token (the credential, as for
``/v1/release/{token}``). The first event is the token's state now; then one event per
change a page sees (the store's per-token ``seq``, the same on every instance of a
cluster, is each event's ``id``; ``stopping`` is not sent, its ``ended`` follows),
warnings 5 and 1 minute before the session ends on its own, and a comment every
:data:`HEARTBEAT` seconds so that proxies keep the connection; the stream ends after the
``ended`` event. A reconnecting ``EventSource`` sends ``Last-Event-ID``; whatever it
says, the stream resumes with the state now (a page needs the present, not the changes
it missed), on any instance.

Bounded: :data:`MAX_PER_CLIENT` streams per client address (then 429) and
:data:`MAX_STREAMS` in all (then 503); a reader that takes more than
:data:`WRITE_TIMEOUT` seconds for one event is dropped, so a stalled one holds at most
one event's bytes beyond the socket's buffers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..core.errors import Refused
from ..metrics import Metrics
from ..sessions.reservations import Reservation, ReservationStore
from ..sessions.token_status import WARNINGS

HEARTBEAT = 15.0
"""Seconds between comments on an idle stream (proxies close idle connections)."""
MAX_PER_CLIENT = 10
"""Event streams one client address may have open (browsers allow 6 HTTP/1.1
connections per host: one stream per page)."""
MAX_STREAMS = 1000
"""Event streams open in all on this instance."""
LOOK = 1.0
"""Seconds between looks at whether a reader left (the store's changes wake it at once)."""
WRITE_TIMEOUT = 30.0
"""Seconds one event may take to reach a reader before the stream is dropped."""
HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
           "X-Accel-Buffering": "no"}  # nginx: pass each event on at once


class EventStreams:
    """The event streams of this instance. ``describe(reservation)`` is what a page is
    told of it (:func:`~.token_status.describe` with the service's grace)."""

    def __init__(self, store: ReservationStore,
                 describe: Callable[[Reservation], dict[str, Any]], metrics: Metrics,
                 heartbeat: float = HEARTBEAT) -> None:
        self._store = store
        self._heartbeat = heartbeat
        self._describe = describe
        self._metrics = metrics
        self._clients: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self._clients.values())

    def _acquire(self, client: str) -> None:
        if self.open >= MAX_STREAMS:
            raise Refused(503, f"too many event streams ({MAX_STREAMS}); try again later")
        if self._clients[client] >= MAX_PER_CLIENT:
            raise Refused(429, f"too many event streams from {client} ({MAX_PER_CLIENT})")
        self._clients[client] += 1

    def _release(self, client: str) -> None:
        self._clients[client] -= 1
        if self._clients[client] <= 0:
            del self._clients[client]

    async def stream(self, request: web.BaseRequest, reservation: Reservation,
                     client: str) -> web.StreamResponse:
        """Stream ``reservation``'s events until it ends or the reader leaves; raises
        :class:`~.errors.Refused` (429, 503) before answering when over a limit."""
        self._acquire(client)
        try:
            response = web.StreamResponse(headers=HEADERS)
            await response.prepare(request)
            try:
                await self._events(request, response, reservation)
            except (ConnectionError, TimeoutError):
                pass  # the reader left, or stalled
            return response
        finally:
            self._release(client)

    async def _events(self, request: web.BaseRequest, response: web.StreamResponse,
                      reservation: Reservation) -> None:
        token, seq = reservation.token, -1
        current: Reservation | None = reservation
        before: float | None = None  # seconds left at the last look
        written = time.monotonic()
        while current is not None:
            if request.transport is None or request.transport.is_closing():
                return  # the reader left (aiohttp does not cancel the handler)
            view = self._describe(current)
            left = view["seconds_left"]
            if current.seq != seq:
                seq = current.seq
                ended = view["state"] == "ended"
                if view["state"] != "stopping":  # brief: its "ended" follows
                    await self._send(response, seq, "ended" if ended else "state", view)
                    written = time.monotonic()
                if ended:
                    return
            elif left is not None and before is not None and any(
                    left <= mark < before for mark in WARNINGS):
                await self._send(response, seq, "warning", view)
                written = time.monotonic()
            elif time.monotonic() - written >= self._heartbeat:
                await asyncio.wait_for(response.write(b": keep-alive\n\n"), WRITE_TIMEOUT)
                written = time.monotonic()
            before = left
            wait = min(LOOK, written + self._heartbeat - time.monotonic())
            if left is not None:  # wake for the next warning
                wait = min([wait, *(left - mark + 0.05 for mark in WARNINGS if left > mark)])
            current = await self._store.wait_change(token, seq, max(0.01, wait))

    async def _send(self, response: web.StreamResponse, seq: int, event: str,
                    view: dict[str, Any]) -> None:
        data = json.dumps({"event": event, **view})
        await asyncio.wait_for(response.write(f"id: {seq}\ndata: {data}\n\n".encode()),
                               WRITE_TIMEOUT)
        self._metrics.events_sent.inc()
