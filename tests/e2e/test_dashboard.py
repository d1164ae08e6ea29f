"""The dashboard (``/v1/status_view``): server-wide figures, how long a reserved
instance has before ``--timeout`` reclaims it, what the administrator sees of each
session, and where a reservation made on the page is used."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import websockets
import websockets.sync.client
from playwright.sync_api import Browser, Page, expect

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


def test_the_administrator_sees_each_sessions_client_backend_and_process(
        start_server: StartServer) -> None:
    """The security token's holder sees where a session's browser connects from, the
    backend it is relayed to, and the process listening there (the service's own)."""
    server = start_server("--remote_session_config", str(EXAMPLES / "desktop_services.json"))
    token = server.get_json("/v1/reserve/echo")[1]["token"]

    def instance() -> dict[str, object]:
        [echo] = [s for s in server.get_json("/v1/status")[1] if s["name"] == "echo"]
        found: dict[str, object] = echo["instances"][0]
        return found

    with websockets.sync.client.connect(server.ws_url(token=token)) as ws:
        ws.send(b"x" * 1000)
        assert ws.recv(timeout=30) == b"x" * 1000
        seen = wait_until(lambda: (found := instance())["pid"] and found)
        page = server.get("/v1/status_view?fragment=1")[2].decode()
        host, port = str(seen["backend"]).rsplit(":", 1)
        # while the session lasts: its end stops the process
        listening = psutil.Process(int(str(seen["pid"]))).net_connections("tcp")
    assert seen["client"] == "127.0.0.1" and seen["bytes_up"] == 1000
    assert any(c.status == psutil.CONN_LISTEN and c.laddr.port == int(port)
               for c in listening), listening
    assert host == "127.0.0.1"
    assert "<th>client</th><th>backend</th><th>process</th>" in page
    assert f"<td>127.0.0.1</td><td>{seen['backend']}</td><td>{seen['pid']}</td>" in page
    assert "<th>node</th>" not in page and "this node" not in page  # not a cluster


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    page = chromium.new_page()
    yield page
    page.close()


def test_a_reservation_made_on_the_dashboard_says_where_to_use_it(
        page: Page, start_server: StartServer, tmp_path: Path) -> None:
    """Reserving on the page shows the websocket URL, which a client then uses; an RFB
    service's reservation also gets a link to noVNC's page, when it is served here."""
    (tmp_path / "vnc.html").write_text("<title>noVNC</title>")
    server = start_server("--remote_session_config", str(EXAMPLES / "desktop_services.json"),
                          http_dir=tmp_path)
    page.goto(server.url("/v1/status_view"))
    page.locator("section", has_text="echo").locator("button[data-reserve]").click()
    notice = page.locator("#reserved")
    expect(notice).to_contain_text("echo reserved: its client connects to ws://")
    url = notice.locator("code").inner_text()
    assert url.startswith(f"ws://127.0.0.1:{server.ws_port}/?token=")
    assert notice.locator("a").count() == 0  # echo speaks no RFB
    with websockets.sync.client.connect(url) as ws:
        ws.send(b"used")
        assert ws.recv(timeout=30) == b"used"
        expect(page.locator("section", has_text="echo").locator(".state").first
               ).to_have_text("active")
    page.locator("section", has_text="desktop").locator("button[data-reserve]").click()
    expect(notice).to_contain_text("desktop reserved")
    link = notice.locator("a")
    expect(link).to_have_text("open it in noVNC")
    token = notice.locator("code").inner_text().rpartition("token=")[2]
    assert link.get_attribute("href") == (
        f"/vnc.html?host=127.0.0.1&port={server.ws_port}&path=websockify%3Ftoken%3D{token}"
        "&autoconnect=true")
