"""Refusals a page can show (docs/rest-api.md): a browser's websocket whose token is
refused is answered 101 and refused inside it, at the RFB level first on a server with
an RFB service; other clients, limits and a disallowed Origin keep the HTTP answer.

One server of each kind is shared by the tests of this module (none changes it)."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from e2e.test_metrics import scrape
from e2e.vnc_support import DESKTOP_CONFIG
from support import ROOT, ServerProcess, received_close

REASON = "unknown or expired token"


@pytest.fixture(scope="module")
def rfb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Serves an RFB service (the example desktop; never started here)."""
    server = ServerProcess.start("--remote_session_config", str(DESKTOP_CONFIG),
                                 "--allowed_origin", "http://page.test",
                                 log_dir=tmp_path_factory.mktemp("rfb"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Serves only a service that does not speak RFB (echo)."""
    where = tmp_path_factory.mktemp("plain")
    config = where / "services.json"
    config.write_text(json.dumps({"echo": {
        "script": str(ROOT / "examples" / "echo_service.py"), "count": 1}}))
    server = ServerProcess.start("--remote_session_config", str(config), log_dir=where)
    yield server
    server.close()


def connect(server: ServerProcess, token: str = "typo", origin: str | None = "http://page.test",
            **query: str) -> ws_connect:
    return ws_connect(server.ws_url(token=token, **query),
                      origin=origin,  # type: ignore[arg-type]  # a str is an Origin
                      open_timeout=10)


async def closed(ws: ClientConnection) -> tuple[int | None, str | None]:
    with pytest.raises(websockets.ConnectionClosed) as ended:
        await asyncio.wait_for(ws.recv(), 10)
    close = received_close(ended.value)
    return close.code, close.reason


def test_an_rfb_page_gets_the_reason_as_an_rfb_security_failure(
        rfb_server: ServerProcess) -> None:
    async def scenario() -> None:
        async with connect(rfb_server) as ws:
            assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"
            await ws.send(b"RFB 003.008\n")
            assert await asyncio.wait_for(ws.recv(), 10) == (
                b"\x00" + struct.pack("!I", len(REASON)) + REASON.encode())
            assert await closed(ws) == (4404, REASON)
        async with connect(rfb_server) as ws:  # a 3.3 client: security type 0, then why
            await asyncio.wait_for(ws.recv(), 10)
            await ws.send(b"RFB 003.003\n")
            assert await asyncio.wait_for(ws.recv(), 10) == (
                b"\x00\x00\x00\x00" + struct.pack("!I", len(REASON)) + REASON.encode())
            assert await closed(ws) == (4404, REASON)

    before = scrape(rfb_server).get(("websocketserver_http_requests_total",
                                     (("port", "ws"), ("status", "404"))), 0)
    asyncio.run(scenario())
    assert scrape(rfb_server)[("websocketserver_http_requests_total",
                               (("port", "ws"), ("status", "404")))] == before + 2
    assert "websocket refused (404, in the websocket)" in rfb_server.log()


def test_a_page_that_does_not_speak_rfb_gets_the_close_code_after_a_wait(
        rfb_server: ServerProcess) -> None:
    async def scenario() -> None:
        async with connect(rfb_server) as ws:
            assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"
            assert await closed(ws) == (4404, REASON)  # RFB_WAIT later
        async with connect(rfb_server, refusal="close") as ws:  # opted out: at once
            assert await closed(ws) == (4404, REASON)

    asyncio.run(scenario())


def test_without_an_rfb_service_a_browser_gets_the_close_code_at_once(
        plain_server: ServerProcess) -> None:
    async def scenario() -> None:
        async with connect(plain_server) as ws:
            assert await closed(ws) == (4404, REASON)
        async with connect(plain_server, refusal="rfb") as ws:  # opted in
            assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"

    asyncio.run(scenario())


def test_other_clients_and_limits_keep_the_http_answer(rfb_server: ServerProcess,
                                                       plain_server: ServerProcess) -> None:
    async def refused(server: ServerProcess, origin: str | None, **query: str) -> int:
        with pytest.raises(websockets.InvalidStatus) as answer:
            async with connect(server, origin=origin, **query):
                pass
        body = json.loads(answer.value.response.body or b"{}")
        assert body == {"error": REASON} or answer.value.response.status_code != 404
        return answer.value.response.status_code

    async def scenario() -> None:
        assert await refused(rfb_server, None) == 404  # no Origin: not a browser
        assert await refused(plain_server, "http://page.test", refusal="http") == 404
        assert await refused(rfb_server, "http://elsewhere.test") == 403  # never a 101

    asyncio.run(scenario())


def test_a_refusal_holds_a_slot_of_the_limits_while_it_lasts(tmp_path: Path) -> None:
    server = ServerProcess.start("--remote_session_config", str(DESKTOP_CONFIG),
                                 "--max_tunnels_per_client", "1", log_dir=tmp_path)
    try:
        async def scenario() -> None:
            async with connect(server, origin="http://any.test") as ws:
                assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"
                with pytest.raises(websockets.InvalidStatus) as answer:
                    async with connect(server, origin="http://any.test"):
                        pass
                assert answer.value.response.status_code == 429
                await ws.send(b"RFB 003.008\n")
                await asyncio.wait_for(ws.recv(), 10)
                assert await closed(ws) == (4404, REASON)
            await asyncio.sleep(0.2)
            async with connect(server, origin="http://any.test") as ws:  # its slot is free
                assert await asyncio.wait_for(ws.recv(), 10) == b"RFB 003.008\n"

        asyncio.run(scenario())
    finally:
        server.close()
