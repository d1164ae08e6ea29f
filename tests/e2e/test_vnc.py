"""Real VNC desktops (Xvfb + x11vnc) through the real server: RFB over the tunnel.

Reservation mode runs examples/desktop_session.py from examples/desktop_services.json;
basic mode tunnels to a desktop the test starts itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import psutil
import pytest
import websockets
from websockets.typing import Subprotocol

from e2e.vnc_support import (
    DESKTOP_CONFIG,
    X_BINARIES,
    ServerInit,
    XDesktop,
    configured_size,
    desktop_options,
    instance_processes,
    instances,
    require,
    reserve,
    rfb_handshake,
)
from support import ServerProcess, StartServer, wait_until

DESKTOP_PROCESSES = ["Xvfb", "clock", "x11vnc"]


@pytest.fixture(autouse=True)
def _x_binaries() -> None:
    require(*X_BINARIES)


@pytest.fixture
def desktop_server(start_server: StartServer) -> ServerProcess:
    """The real command line with the example desktop/echo config."""
    return start_server("--remote_session_config", str(DESKTOP_CONFIG))


async def handshake(url: str) -> ServerInit:
    """Open ``url``, complete the RFB handshake, close; bounded in time."""
    async with asyncio.timeout(60):
        async with websockets.connect(url, subprotocols=[Subprotocol("binary")]) as ws:
            assert ws.subprotocol == "binary"
            return await rfb_handshake(ws)


def test_example_config_loads(desktop_server: ServerProcess) -> None:
    """Both example services are there, with the config's common options."""
    status, body = desktop_server.get_json("/v1/status")
    assert status == 200, body
    assert {s["name"]: s["count"] for s in body} == {"desktop": 2, "echo": 2}
    desktop = next(s for s in body if s["name"] == "desktop")
    assert desktop["common_options"] == desktop_options()


def test_reserved_desktop_speaks_rfb_and_stops(desktop_server: ServerProcess) -> None:
    """Token → Xvfb + x11vnc start, RFB with the configured size, close → both gone."""
    server = desktop_server
    token = reserve(server)
    assert [i["index"] for i in instances(server)] == [0]
    assert instance_processes(server) == []  # nothing starts before the websocket

    async def session() -> ServerInit:
        async with asyncio.timeout(60):
            async with websockets.connect(server.ws_url(token=token),
                                          subprotocols=[Subprotocol("binary")]) as ws:
                init = await rfb_handshake(ws)
                assert instance_processes(server) == DESKTOP_PROCESSES
                assert [i["state"] for i in instances(server)] == ["active"]
                return init

    init = asyncio.run(session())
    assert (init.width, init.height) == configured_size(0)
    assert init.name == "desktop 0"
    wait_until(lambda: instance_processes(server) == [], timeout=20)
    wait_until(lambda: instances(server) == [], timeout=20)

    again = reserve(server)
    assert [(i["token"], i["index"]) for i in instances(server)] == [(again, 0)]
    assert server.get_json(f"/v1/release/{again}")[0] == 200
    assert instances(server) == []


def test_two_desktops_at_once(desktop_server: ServerProcess) -> None:
    """Both instances run side by side, each with its size; a third is refused."""
    server = desktop_server
    tokens = [reserve(server), reserve(server)]
    status, body = server.get_json("/v1/reserve/desktop")
    assert status == 503, body

    async def both() -> list[ServerInit]:
        async with asyncio.timeout(90):
            async with websockets.connect(server.ws_url(token=tokens[0]),
                                          subprotocols=[Subprotocol("binary")]) as first, \
                    websockets.connect(server.ws_url(token=tokens[1]),
                                       subprotocols=[Subprotocol("binary")]) as second:
                inits = await asyncio.gather(rfb_handshake(first), rfb_handshake(second))
                assert instance_processes(server) == sorted(DESKTOP_PROCESSES * 2)
                return list(inits)

    inits = asyncio.run(both())
    assert [(i.width, i.height) for i in inits] == [configured_size(0), configured_size(1)]
    assert [i.name for i in inits] == ["desktop 0", "desktop 1"]
    wait_until(lambda: instance_processes(server) == [], timeout=20)
    wait_until(lambda: instances(server) == [], timeout=20)


def test_server_stop_with_an_active_desktop_leaves_nothing(desktop_server: ServerProcess) -> None:
    """/v1/stop during a session: the websocket closes, Xvfb and x11vnc end, exit 0."""
    server = desktop_server
    token = reserve(server)

    async def session() -> list[psutil.Process]:
        async with asyncio.timeout(60):
            async with websockets.connect(server.ws_url(token=token),
                                          subprotocols=[Subprotocol("binary")]) as ws:
                await rfb_handshake(ws)
                desktop = [p for p in server.descendants() if p.name() in DESKTOP_PROCESSES]
                assert sorted(p.name() for p in desktop) == DESKTOP_PROCESSES
                status, body = await asyncio.to_thread(server.get_json, "/v1/stop")
                assert status == 200, body
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await ws.recv()
                return desktop

    desktop = asyncio.run(session())
    assert server.wait_exit(30) == 0
    _, alive = psutil.wait_procs(desktop, timeout=5)
    assert alive == []


def test_desktop_starts_when_its_display_is_taken(start_server: StartServer,
                                                  tmp_path: Path) -> None:
    """Instance 0 prefers :display_base; with that display in use it takes another."""
    base = desktop_options()["display_base"]
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"desktop": {
        "script": str(DESKTOP_CONFIG.parent / "desktop_session.py"), "count": 1,
        "options": {"sizes": ["640x480"], "display_base": base}}}))
    server = start_server("--remote_session_config", str(config))
    with contextlib.ExitStack() as stack:
        try:
            occupant = stack.enter_context(XDesktop(display=base, vnc=False))
        except RuntimeError:  # someone else holds that display already: just as good
            occupant = None
        init = asyncio.run(handshake(server.ws_url(token=reserve(server))))
        assert (init.width, init.height) == (640, 480)
        assert occupant is None or occupant.pids, "the occupying Xvfb died"
    wait_until(lambda: instance_processes(server) == [], timeout=20)


def test_basic_mode_tunnels_to_a_running_desktop(start_server: StartServer) -> None:
    """--client_port: no token, the tunnel goes to our own x11vnc, which stays up."""
    with XDesktop(size="800x600") as desktop:
        server = start_server("--client_port", str(desktop.port))
        for _ in range(2):  # x11vnc -forever serves one connection after another
            init = asyncio.run(handshake(server.ws_url()))
            assert (init.width, init.height) == (800, 600)
        assert len(desktop.pids) == 2
