"""`scripts/demo --desktop` and its embedding page, in headless Chromium (and what the
demo's own page, index.html, says it is connected to).

The demo reserves the example desktop (Xvfb + x11vnc) from ``demo/www/embed.html``
and shows it with noVNC's RFB: the canvas must show the desktop's colour. Leaving the
page must release the reservation at once (checked with a long reconnect grace, so
that only the page's release can free the slot in time), also when a back end
reserved the token and the server has a security token the page never sees.
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect

from e2e.vnc_support import (
    DESKTOP_CONFIG,
    NOVNC,
    TIMEOUT_MS,
    desktop_options,
    expect_canvas_color,
    instance_processes,
    instances,
    new_context,
    require_novnc,
    reserve,
)
from support import ROOT, ServerProcess, free_port, wait_port, wait_until

GRACE = "60"  # a websocket's end alone would keep the desktop this long
DESKTOP = ["Xvfb", "clock", "x11vnc"]  # an instance's processes (sorted)


@pytest.fixture(scope="module")
def browser(chromium: Browser) -> Browser:
    require_novnc()
    return chromium


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = new_context(browser)
    yield context
    context.close()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """demo/www beside noVNC's library, as ``scripts/demo --desktop`` serves it."""
    where = tmp_path / "www"
    shutil.copytree(ROOT / "demo" / "www", where)
    for part in ("core", "vendor"):
        shutil.copytree(NOVNC / part, where / part)
    return where


def shows_desktop(page: Page, url: str, artifact: str, status: bool = True) -> None:
    """Open ``url``; assert noVNC connects and its canvas shows the example's colour."""
    color = desktop_options()["color"]
    page.goto(url)
    if status:
        # in words, from the session's events (/v1/events/{token})
        expect(page.locator("#status")).to_have_text("Connected", timeout=TIMEOUT_MS)
    expect_canvas_color(page, color, artifact)


def corner(page: Page) -> bytes:
    """The lower right corner of noVNC's canvas (a tenth of its width), as pixels."""
    image = Image.open(io.BytesIO(page.locator("#screen canvas").screenshot()))
    width, height = image.size
    return image.crop((width * 9 // 10, height * 9 // 10, width, height)).tobytes()


def expect_clock_ticking(page: Page) -> None:
    """The example desktop's clock changes the corner every second: a live view."""
    first = corner(page)
    deadline = time.monotonic() + 5
    while corner(page) == first:
        assert time.monotonic() < deadline, "the desktop's corner did not change in 5 s"
        time.sleep(0.2)


def test_demo_desktop_shows_a_reserved_desktop(context: BrowserContext) -> None:
    """The demo program: the printed page shows the desktop; Ctrl-C leaves nothing."""
    ws_port, http_port = free_port(), free_port()
    demo = subprocess.Popen([sys.executable, str(ROOT / "demo" / "run.py"), "--desktop",
                             "--ws_port", str(ws_port), "--http_port", str(http_port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert demo.stdout is not None
        line = demo.stdout.readline()
        match = re.search(r"open (http://\S+)", line)
        assert match, f"no URL printed: {line!r}"
        wait_port(ws_port, proc=demo)
        wait_port(http_port, proc=demo)
        page = context.new_page()
        shows_desktop(page, match.group(1), "demo-desktop.png")
        expect_clock_ticking(page)
        below = psutil.Process(demo.pid).children(recursive=True)
        assert set(DESKTOP) <= {p.name() for p in below}
        page.goto("about:blank")  # leaving the page releases the desktop
        wait_until(lambda: not set(DESKTOP) & {p.name() for p in below
                                               if p.is_running()
                                               and p.status() != psutil.STATUS_ZOMBIE},
                   timeout=20)
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        assert demo.wait(20) == 0
    assert not [p for p in below if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("backend_reserves", [False, True], ids=["page", "back end"])
def test_embed_page_releases_when_left(context: BrowserContext, site: Path,
                                       start_server: Callable[..., ServerProcess],
                                       backend_reserves: bool) -> None:
    """Leaving embed.html frees the slot at once, not after the reconnect grace."""
    server = start_server(
        "--remote_session_config", str(DESKTOP_CONFIG), "--reconnect_grace", GRACE,
        http_dir=site, token="K" if backend_reserves else None)
    query = f"port={server.ws_port}"
    if backend_reserves:  # the page gets the token, never the security token
        query += f"&token={reserve(server)}"
    page = context.new_page()
    shows_desktop(page, server.url(f"/embed.html?{query}", auth=False),
                  f"embed-{'backend' if backend_reserves else 'page'}.png")
    assert instance_processes(server) == DESKTOP
    [instance] = instances(server)
    assert instance["state"] == "active"
    page.goto("about:blank")
    wait_until(lambda: instances(server) == [], timeout=10)
    wait_until(lambda: instance_processes(server) == [], timeout=10)


def test_docs_embedding_snippet(context: BrowserContext, site: Path,
                                start_server: Callable[..., ServerProcess]) -> None:
    """The snippet of docs/novnc.md, as a page: it shows the desktop, and leaving the
    page releases it."""
    text = (ROOT / "docs" / "novnc.md").read_text()
    snippet = re.search(r"<!-- embed-snippet -->\n```html\n(.*?)```", text, re.DOTALL)
    assert snippet, "docs/novnc.md lost its marked snippet"
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG), "--reconnect_grace",
                          GRACE, http_dir=site, token=None)
    (site / "snippet.html").write_text(re.sub(r"\b8080\b", str(server.ws_port),
                                              snippet.group(1)))
    page = context.new_page()
    shows_desktop(page, server.url("/snippet.html", auth=False), "embed-snippet.png",
                  status=False)
    assert instance_processes(server) == DESKTOP
    page.goto("about:blank")
    wait_until(lambda: instances(server) == [], timeout=10)


def test_the_demo_page_names_what_it_is_connected_to(
        context: BrowserContext, start_server: Callable[..., ServerProcess]) -> None:
    """index.html: a reserved session's service by name (the echo service here), else
    the basic-mode backend, which is the demo's ticker only when scripts/demo runs it."""
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG))
    status, body = server.get_json("/v1/reserve/echo")
    assert status == 200, body
    page = context.new_page()
    page.goto(server.url(f"/index.html?port={server.ws_port}&token={body['token']}",
                         auth=False))
    expect(page.locator("#backend")).to_have_text("service echo, instance 0")
    page.goto(server.url(f"/index.html?port={server.ws_port}", auth=False))
    expect(page.locator("#backend")).to_contain_text("the server's --client_port (basic "
                                                     "mode; from scripts/demo: the demo's "
                                                     "ticker")
