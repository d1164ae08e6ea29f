"""/v1/metrics: Prometheus text with tunnels, bytes, reservations, starts, HTTP answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import websockets
from prometheus_client.parser import text_string_to_metric_families

from support import ServerProcess, StartServer

CONFIG = Path(__file__).parent / "scripts" / "services.json"


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, headers, body = server.get("/v1/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_follow_tunnels_services_and_http(start_server: StartServer) -> None:
    server = start_server("--remote_session_config", str(CONFIG), "--start_timeout", "3")
    assert server.get("/v1/metrics", auth=False)[0] == 401
    token = server.get_json("/v1/reserve/echo")[1]["token"]
    server.get_json("/v1/reserve/raising")
    before = scrape(server)
    assert before[("websocketserver_reservations", (("service", "echo"),
                                                    ("state", "reserved")))] == 1

    async def session() -> None:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await ws.send(b"x" * 1000)
            assert len(await ws.recv()) == 1000
            during = scrape(server)
            assert during[("websocketserver_tunnels_open", ())] == 1
            assert during[("websocketserver_reservations", (("service", "echo"),
                                                            ("state", "active")))] == 1

    asyncio.run(session())
    after = scrape(server)
    assert after[("websocketserver_tunnels_total", ())] == 1
    assert after[("websocketserver_tunnels_open", ())] == 0
    assert after[("websocketserver_bytes_total", (("direction", "up"),))] == 1000
    assert after[("websocketserver_bytes_total", (("direction", "down"),))] == 1000
    assert after[("websocketserver_service_starts_total", (("service", "echo"),))] == 1
    assert after[("websocketserver_service_start_seconds_count", (("service", "echo"),))] == 1
    assert after[("websocketserver_http_requests_total", (("port", "http"),
                                                         ("status", "401")))] == 1
    assert after[("websocketserver_http_requests_total", (("port", "ws"),
                                                         ("status", "101")))] == 1


def test_failures_are_counted(start_server: StartServer) -> None:
    server = start_server("--remote_session_config", str(CONFIG))
    token = server.get_json("/v1/reserve/raising")[1]["token"]

    async def attempt() -> None:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed:
                pass

    asyncio.run(attempt())
    samples = scrape(server)
    assert samples[("websocketserver_service_failures_total", (("service", "raising"),))] == 1
