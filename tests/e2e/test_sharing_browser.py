"""A shared desktop in Chromium: the owner's noVNC page and a view-only viewer's page
show the same desktop (Xvfb + x11vnc); the viewer's mouse and keys change nothing on
the X display, read by an X client (xdotool), while the owner's do; the session's end
closes the viewer's page. (The proxy's VNC login itself: test_sharing.py.)"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import Browser, BrowserContext, expect

from e2e.vnc_support import (
    DESKTOP_CONFIG,
    TIMEOUT_MS,
    new_context,
    novnc_site,
    require,
    require_novnc,
    reserve,
    show_desktop,
)
from support import ServerProcess, StartServer, marked_processes, wait_until

COLOR = "#aa7711"


@pytest.fixture
def contexts(chromium: Browser) -> Iterator[tuple[BrowserContext, BrowserContext]]:
    require_novnc()
    require("xdotool")
    owner, viewer = new_context(chromium), new_context(chromium)
    yield owner, viewer
    owner.close()
    viewer.close()


def pointer(display: str) -> str:
    """Where the X pointer is (an X client's view, not the proxy's)."""
    return subprocess.run(["xdotool", "getmouselocation"], env={"DISPLAY": display},
                          capture_output=True, text=True, check=True, timeout=10).stdout


def display_of_instance(server: ServerProcess) -> str:
    """The X display ``server``'s desktop instance serves (x11vnc's -display)."""
    for proc in marked_processes(server):
        try:
            argv = proc.cmdline()
        except psutil.Error:
            continue
        if argv and argv[0].endswith("x11vnc"):
            return argv[argv.index("-display") + 1]
    raise AssertionError("no x11vnc of the instance")


def test_a_view_only_viewer_sees_the_desktop_and_cannot_touch_it(
        contexts: tuple[BrowserContext, BrowserContext], start_server: StartServer,
        tmp_path: Path) -> None:
    owner_context, viewer_context = contexts
    server = start_server("--remote_session_config", str(DESKTOP_CONFIG),
                          http_dir=novnc_site(tmp_path / "www"))
    token = reserve(server, f"?color=%23{COLOR[1:]}")
    owner = owner_context.new_page()
    show_desktop(owner, server, f"websockify?token={token}", COLOR, "share-owner.png")
    status, share = server.get_json(f"/v1/share/{token}?mode=view", auth=False)
    assert status == 200, share
    viewer = viewer_context.new_page()
    show_desktop(viewer, server, f"websockify?token={share['token']}", COLOR,
                 "share-viewer.png")
    display = display_of_instance(server)
    before = pointer(display)
    keys = tmp_path / "keys.txt"  # the key presses the X server delivers (no window
    with keys.open("w") as out:   # manager: the focus is the root window)
        xev = subprocess.Popen(["xev", "-root", "-event", "keyboard"], stdout=out,
                               env={"DISPLAY": display})
    try:
        canvas = viewer.locator("#screen canvas")
        box = canvas.bounding_box()
        assert box is not None
        viewer.mouse.move(box["x"] + 40, box["y"] + 30)
        viewer.mouse.click(box["x"] + 60, box["y"] + 50)
        viewer.keyboard.type("no")
        viewer.wait_for_timeout(1000)
        assert pointer(display) == before  # nothing of the viewer reached the display
        assert "KeyPress" not in keys.read_text()
        owner_box = owner.locator("#screen canvas").bounding_box()
        assert owner_box is not None
        owner.mouse.click(owner_box["x"] + 100, owner_box["y"] + 80)  # and focus
        owner.keyboard.type("yes")
        wait_until(lambda: pointer(display) != before, 10)  # the owner's does
        wait_until(lambda: "KeyPress" in keys.read_text(), 10)
    finally:
        xev.kill()
        xev.wait()
    assert 'message="PointerEvent"' in server.get("/v1/metrics")[2].decode()
    owner.close()  # the session ends with its owner's page: so does the viewer's
    expect(viewer.locator("#status")).not_to_have_text("connected", timeout=TIMEOUT_MS)

