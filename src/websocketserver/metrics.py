"""Metrics for ``/v1/metrics`` in the Prometheus text format.

Events (a tunnel closing, a service starting, an HTTP answer) are counted as they
happen; levels (open tunnels, bytes carried so far, reservations by state) are read
when the page is scraped, so the tunnel's hot path pays nothing for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily

from .core.lifecycle import State

if TYPE_CHECKING:
    from .sessions.reservations import Reservation
    from .websocket_port.tunnel import TunnelStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Carrier(Protocol):
    """A tunnel as metrics see it: a :class:`~.tunnel.Tunnel` in this process, or a
    relay process's tunnel seen from the main one (its bytes come when it ends)."""

    stats: TunnelStats


class Metrics:
    """One server's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._open: set[Carrier] = set()
        self._closed_bytes = {"up": 0, "down": 0}
        self.tunnels_total = Counter("websocketserver_tunnels", "Tunnels opened",
                                     registry=self.registry)
        self.tunnels_open = Gauge("websocketserver_tunnels_open", "Tunnels open now",
                                  registry=self.registry)
        self.tunnels_open.set_function(lambda: len(self._open))
        self.reservations = Gauge("websocketserver_reservations", "Reservations by state",
                                  ["service", "state"], registry=self.registry)
        self.service_starts = Counter("websocketserver_service_starts",
                                      "Service instances started", ["service"],
                                      registry=self.registry)
        self.service_failures = Counter("websocketserver_service_failures",
                                        "Service instances that failed to start",
                                        ["service"], registry=self.registry)
        self.reattaches = Counter("websocketserver_service_reattaches",
                                  "Websockets re-attached to a detached instance "
                                  "(--reconnect_grace)", ["service"], registry=self.registry)
        self.start_seconds = Histogram("websocketserver_service_start_seconds",
                                       "Time from websocket to a listening service",
                                       ["service"], registry=self.registry,
                                       buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.http_requests = Counter("websocketserver_http_requests",
                                     "HTTP answers by status", ["port", "status"],
                                     registry=self.registry)
        self.tasks = Gauge("websocketserver_asyncio_tasks", "Tasks alive in the event loop",
                           registry=self.registry)
        self.event_streams = Gauge("websocketserver_event_streams_open",
                                   "/v1/events streams open now", registry=self.registry)
        self.events_sent = Counter("websocketserver_events", "Events sent on /v1/events",
                                   registry=self.registry)
        self.viewer_input_dropped = Counter(
            "websocketserver_viewer_input_dropped",
            "Messages of view-only viewers that never reached the application",
            ["message"], registry=self.registry)
        self.tasks.set_function(lambda: len(asyncio.all_tasks()))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, fds, ...
        self.registry.register(_BytesCollector(self))

    def tunnel_opened(self, tunnel: Carrier) -> None:
        self.tunnels_total.inc()
        self._open.add(tunnel)

    def tunnel_closed(self, tunnel: Carrier) -> None:
        self._open.discard(tunnel)
        self._closed_bytes["up"] += tunnel.stats.bytes_up
        self._closed_bytes["down"] += tunnel.stats.bytes_down

    def bytes_total(self) -> dict[str, int]:
        """Bytes carried by every tunnel so far, closed and open, per direction."""
        totals = dict(self._closed_bytes)
        for tunnel in self._open:
            totals["up"] += tunnel.stats.bytes_up
            totals["down"] += tunnel.stats.bytes_down
        return totals

    def service_started(self, service: str, seconds: float) -> None:
        self.service_starts.labels(service).inc()
        self.start_seconds.labels(service).observe(seconds)

    def service_failed(self, service: str) -> None:
        self.service_failures.labels(service).inc()

    def service_reattached(self, service: str) -> None:
        self.reattaches.labels(service).inc()

    def render(self, services: Iterable[str], reservations: Iterable[Reservation]) -> bytes:
        """The text exposition, with reservation levels taken from ``reservations``."""
        counts = {(name, state): 0 for name in services for state in State}
        for reservation in reservations:
            counts[(reservation.service, reservation.state)] = \
                counts.get((reservation.service, reservation.state), 0) + 1
        for (name, state), count in counts.items():
            self.reservations.labels(name, str(state)).set(count)
        return generate_latest(self.registry)


class _BytesCollector:
    """``websocketserver_bytes_total{direction}``, summed at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily("websocketserver_bytes", "Bytes tunnelled",
                                     labels=["direction"])
        for direction, total in self._metrics.bytes_total().items():
            family.add_metric([direction], total)
        yield family
