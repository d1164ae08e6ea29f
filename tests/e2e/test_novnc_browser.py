"""noVNC in a real headless Chromium, through the real server: the page shows the desktop.

Each test paints an X desktop a distinctive colour, opens a noVNC page served by
the server's HTTP listener, waits until noVNC is connected and checks that the
canvas shows that colour (screenshots go to test-artifacts/). Modes: basic
(``--client_port``), a reservation (the example desktop service), and wss.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from playwright.sync_api import Browser

from e2e.vnc_support import (
    DESKTOP_CONFIG,
    XDesktop,
    instance_processes,
    instances,
    new_context,
    novnc_site,
    require_novnc,
    reserve,
    show_desktop,
)
from support import ServerProcess, StartServer, wait_until


@pytest.fixture(scope="module")
def browser(chromium: Browser) -> Browser:
    require_novnc()
    return chromium


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A web root with noVNC and its page, for --http_directory."""
    return novnc_site(tmp_path / "www")


def check_reserved_desktop(browser: Browser, server: ServerProcess, color: str,
                           artifact: str, trust: ssl.SSLContext | None = None) -> None:
    """Reserve a desktop in ``color``, view it, close the page: service stopped, slot free."""
    token = reserve(server, f"?color=%23{color[1:]}", context=trust)
    context = new_context(browser, ignore_https_errors=server.tls is not None)
    try:
        page = context.new_page()
        show_desktop(page, server, f"websockify?token={token}", color, artifact)
        assert instance_processes(server) == ["Xvfb", "clock", "x11vnc"]
        page.close()
        wait_until(lambda: instance_processes(server) == [], timeout=20)
        wait_until(lambda: instances(server, context=trust) == [], timeout=20)
    finally:
        context.close()


def test_novnc_basic_mode(browser: Browser, site: Path, start_server: StartServer) -> None:
    """--client_port to a desktop of our own: noVNC shows it."""
    with XDesktop(size="800x600", color="#ff8800") as desktop:
        server = start_server("--client_port", str(desktop.port), http_dir=site)
        context = new_context(browser)
        try:
            page = context.new_page()
            show_desktop(page, server, "websockify", "#ff8800", "novnc-basic.png")
            page.close()
        finally:
            context.close()
        assert len(desktop.pids) == 2, "basic mode must leave the desktop running"


def test_novnc_reserved_desktop(browser: Browser, site: Path, start_server: StartServer) -> None:
    """A reservation with ?color=: noVNC shows that desktop; closing the page stops it."""
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG), http_dir=site)
    check_reserved_desktop(browser, server, "#22aa66", "novnc-reserved.png")


def test_novnc_reserved_desktop_over_wss(browser: Browser, site: Path, start_server: StartServer,
                                         tmp_path: Path) -> None:
    """The same over https + wss with a self-signed certificate."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG), http_dir=site,
                          tls=(cert, key))
    check_reserved_desktop(browser, server, "#aa22cc", "novnc-wss.png", trust)
