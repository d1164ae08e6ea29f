"""Reconnect grace in Chromium: a page reload finds the desktop as the user left it.

noVNC views a reserved desktop of the example service (Xvfb + x11vnc); the test then
changes the desktop (its root colour, with ``xsetroot``), reloads the page and sees
the changed desktop again, from the same x11vnc. Without a grace the reload would
find the instance stopped and its token gone.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil
from playwright.sync_api import Browser, expect

from e2e.vnc_support import (
    DESKTOP_CONFIG,
    TIMEOUT_MS,
    expect_canvas_color,
    instance_processes,
    instances,
    new_context,
    novnc_site,
    require_novnc,
    reserve,
    show_desktop,
)
from support import ServerProcess, marked_processes, wait_until

FIRST, CHANGED = "#22aa66", "#cc3311"


def x11vnc(server: ServerProcess) -> psutil.Process:
    """The instance's x11vnc (its command line names the X display)."""
    [proc] = [p for p in marked_processes(server) if p.name() == "x11vnc"]
    return proc


def test_reload_shows_the_changed_desktop_again(
        chromium: Browser, tmp_path: Path, start_server: Callable[..., ServerProcess]) -> None:
    require_novnc()
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG),
                          "--reconnect_grace", "30", http_dir=novnc_site(tmp_path / "www"))
    token = reserve(server, f"?color=%23{FIRST[1:]}")
    context = new_context(chromium)
    try:
        page = context.new_page()
        show_desktop(page, server, f"websockify?token={token}", FIRST, "reconnect-first.png")
        vnc = x11vnc(server)
        display = vnc.cmdline()[vnc.cmdline().index("-display") + 1]
        subprocess.run(["xsetroot", "-display", display, "-solid", CHANGED], check=True,
                       timeout=30)
        expect_canvas_color(page, CHANGED, "reconnect-changed.png")
        page.reload()
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
        expect_canvas_color(page, CHANGED, "reconnect-reloaded.png")
        assert x11vnc(server).pid == vnc.pid  # the same desktop, not a new one
        assert [i["state"] for i in instances(server)] == ["active"]
        _, _, metrics = server.get("/v1/metrics")
        assert b'websocketserver_service_reattaches_total{service="desktop"} 1.0' in metrics
        page.close()
        wait_until(lambda: [i["state"] for i in instances(server)] == ["detached"],
                   timeout=20)
        assert instance_processes(server) == ["Xvfb", "clock", "x11vnc"]
        assert server.get_json(f"/v1/release/{token}")[0] == 200
        wait_until(lambda: instance_processes(server) == [] and instances(server) == [],
                   timeout=20)
    finally:
        context.close()
