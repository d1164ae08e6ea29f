"""The dashboard (``/v1/status_view``): server-wide figures, and how long a reserved
instance has before ``--timeout`` reclaims it."""

from __future__ import annotations

import asyncio
import re

import websockets

from support import EXAMPLES, EchoBackend, StartServer, wait_until
from websocketserver import __version__


def test_dashboard_shows_server_figures_and_reclaim_time(start_server: StartServer,
                                                         echo: EchoBackend) -> None:
    server = start_server("--remote_session_config", str(EXAMPLES / "desktop_services.json"),
                          "--client_port", str(echo.port), "--timeout", "600")
    status, _ = server.get_json("/v1/reserve/echo")
    assert status == 200

    async def while_a_basic_tunnel_is_open() -> str:
        async with websockets.connect(server.ws_url()) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(ws.recv(), 30) == b"x"
            return server.get("/v1/status_view?fragment=1")[2].decode()

    fragment = asyncio.run(while_a_basic_tunnel_is_open())
    assert f"version <b>{__version__}</b>" in fragment
    assert re.search(r"up <b>\d+ s</b>", fragment)
    assert "tunnels open <b>1</b>" in fragment
    assert "bytes down <b>" in fragment and "bytes up <b>" in fragment
    left = re.search(r"reserved</span> <small>reclaimed in (\d+) min unless used", fragment)
    assert left and 9 <= int(left.group(1)) <= 10, fragment

    def once_closed() -> str | None:
        page = server.get("/v1/status_view")[2].decode()
        return page if "tunnels open <b>0</b>" in page else None

    assert "tunnels since start <b>1</b>" in wait_until(once_closed)
