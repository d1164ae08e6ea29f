"""The pages a person looks at, in headless Chromium: the demo and the status dashboard."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from e2e.vnc_support import ARTIFACTS
from support import ROOT, StartServer, free_port, wait_port

CONFIG = Path(__file__).parent / "scripts" / "services.json"


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    context = chromium.new_context(viewport={"width": 1100, "height": 800})
    context.set_default_timeout(20_000)
    page = context.new_page()
    yield page
    context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / name, full_page=True)


def test_demo_shows_data_flowing_both_ways(page: Page) -> None:
    """`scripts/demo`'s program: ticker lines arrive, typed lines come back."""
    ws_port, http_port = free_port(), free_port()
    demo = subprocess.Popen([sys.executable, str(ROOT / "demo" / "run.py"), "--ws_port",
                             str(ws_port), "--http_port", str(http_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(ws_port, proc=demo)
        wait_port(http_port, proc=demo)
        page.goto(f"http://127.0.0.1:{http_port}/?port={ws_port}")
        expect(page.locator("#state")).to_have_text("open")
        expect(page.locator("#log")).to_contain_text("tick 2 at")
        page.fill("#text", "hello from the browser")
        page.press("#text", "Enter")
        expect(page.locator("#log")).to_contain_text("you said: HELLO FROM THE BROWSER")
        screenshot(page, "demo.png")
    finally:
        demo.terminate()
        assert demo.wait(15) == 0


def test_dashboard_lists_reserves_and_releases(page: Page, start_server: StartServer) -> None:
    server = start_server("--remote_session_config", str(CONFIG))
    server.get_json("/v1/reserve/echo?target_pathname=/data/a.txt")
    page.goto(server.url("/v1/status_view"))
    echo = page.locator("section", has_text="echo")
    expect(echo.locator("h2")).to_contain_text("1 of 2 in use")
    expect(echo).to_contain_text("/data/a.txt")
    expect(echo.locator(".state").first).to_have_text("reserved")
    echo.locator("button[data-reserve]").click()  # reserve from the page
    expect(echo.locator("h2")).to_contain_text("2 of 2 in use")
    expect(echo).to_contain_text("all in use")
    screenshot(page, "dashboard.png")
    echo.locator("button[data-release]").first.click()
    expect(echo.locator("h2")).to_contain_text("1 of 2 in use")
    status, body = server.get_json("/v1/status")
    assert len(next(s for s in body if s["name"] == "echo")["instances"]) == 1
    assert "secret" not in page.content()  # group-restricted service stays hidden


def test_the_demo_page_follows_its_reserved_session_in_words(
        page: Page, start_server: StartServer) -> None:
    """index.html with ?token=: its session's events, in words, beside the websocket's
    own state; the release ends both."""
    server = start_server("--remote_session_config", str(CONFIG))
    status, body = server.get_json("/v1/reserve/echo")
    assert status == 200, body
    page.goto(server.url(f"/index.html?port={server.ws_port}&token={body['token']}",
                         auth=False))
    expect(page.locator("#state")).to_have_text("open")
    expect(page.locator("#session")).to_have_text("(session: Connected)")
    page.fill("#text", "hello")
    page.press("#text", "Enter")
    expect(page.locator("#log")).to_contain_text("hello")
    assert server.get_json(f"/v1/release/{body['token']}")[0] == 200
    expect(page.locator("#session")).to_have_text("(session: Ended: reservation released)")
    expect(page.locator("#state")).to_contain_text("closed (1001")
