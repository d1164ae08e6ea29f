"""The README's quick-starts, run as written: extracted from README.md, so they cannot drift.

The blocks are marked ``<!-- quickstart: NAME KIND -->`` and run by
:mod:`e2e.runbook` (``run``: keeps running, stopped with SIGTERM at the end, nothing
left; ``call``: finishes, its output is what the README shows; ``open``: a URL).

What a test must change, and only that: the ports of :data:`e2e.runbook.PORTS`
(8080, 9090, 5900, and the cluster's 6390, 8081-8083, 9091-9093) become free ports
(each number everywhere in the quick-start), ``TOKEN`` in a URL or a ``call`` block
becomes the token the first ``call`` block printed, and the working directory is a
scratch checkout: ``.venv``, ``examples`` and ``demo`` link to this checkout,
``novnc/`` holds noVNC's library (the npm package, as the other browser tests use)
with a ``vnc.html`` of our own that reads ``host``, ``port`` and ``path`` as noVNC's
``vnc.html`` does, except in the test of the README's ``novnc`` block, which links
Debian's noVNC as the README says. The page is opened in headless Chromium and must
show the desktop's colour (the cluster's: the demo page must echo a line).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster_support import require
from playwright.sync_api import Browser, expect

from e2e.runbook import Runbook, Workspace, demo_page_echoes, runbooks
from e2e.vnc_support import (
    ARTIFACTS,
    MIN_FRACTION,
    TIMEOUT_MS,
    color_fraction,
    desktop_options,
    expect_canvas_color,
    new_context,
    require_novnc,
)
from support import ROOT, wait_until

README = ROOT / "README.md"


def quickstarts() -> dict[str, Runbook]:
    return runbooks(README, "quickstart")


@pytest.fixture(scope="module")
def browser(chromium: Browser) -> Browser:
    require_novnc("bash", "curl")
    return chromium


def shows_color(browser: Browser, url: str, color: str, artifact: str) -> None:
    """Open ``url`` in Chromium; the noVNC canvas must show ``color`` (#rrggbb).

    The window is larger than the desktops (1280x1024), which the URLs do not scale.
    """
    context = new_context(browser, width=1400, height=1200)
    try:
        page = context.new_page()
        page.goto(url)
        expect(page.locator("#status")).to_have_text("connected", timeout=TIMEOUT_MS)
        expect_canvas_color(page, color, artifact)
    finally:
        context.close()


def status(space: Workspace) -> list[dict[str, Any]]:
    services: list[dict[str, Any]] = json.loads(
        space.call("curl -s http://127.0.0.1:9090/v1/status"))
    return services


def test_readme_has_the_quickstarts() -> None:
    """The markers are there: removing one must not make the other tests vacuous."""
    found = {name: sorted(q.blocks) for name, q in quickstarts().items()}
    assert found == {"novnc": ["call"], "basic": ["open", "run"],
                     "reserve": ["call", "open", "run"], "cluster": ["call", "open", "run"]}


def test_quickstart_basic(browser: Browser, workspace: Workspace) -> None:
    """A desktop on 5900, the server in front: the README's URL shows it (orange)."""
    quick = quickstarts()["basic"]
    for script in quick.blocks["run"]:
        workspace.run(script)
    [url] = quick.blocks["open"]
    assert "--color orange" in quick.blocks["run"][0]
    shows_color(browser, workspace.url(url), "#ffa500", "readme-basic.png")


def test_quickstart_basic_with_the_distributions_novnc(chromium: Browser,
                                                       tmp_path: Path) -> None:
    """noVNC as the README installs it first (Debian's package, linked as ``novnc``):
    its own ``vnc.html`` (1.3.0, not the test's page) shows quick-start 1's desktop."""
    require_novnc("bash")
    debian = Path("/usr/share/novnc/vnc.html")
    if not debian.exists():
        if os.geteuid() != 0:
            pytest.skip("Debian's novnc not installed (scripts/install-test-deps)")
        pytest.fail("Debian's novnc missing although root: run scripts/install-test-deps")
    space = Workspace(tmp_path, novnc=False)
    try:
        [link] = quickstarts()["novnc"].blocks["call"]
        space.call(link)
        assert (space.where / "novnc" / "vnc.html").read_bytes() == debian.read_bytes()
        quick = quickstarts()["basic"]
        for script in quick.blocks["run"]:
            space.run(script)
        [url] = quick.blocks["open"]
        context = new_context(chromium, width=1400, height=1200)
        try:
            page = context.new_page()
            page.goto(space.url(url))
            canvas = page.locator("#noVNC_container canvas")
            fraction = 0.0
            deadline = time.monotonic() + TIMEOUT_MS / 1000
            while fraction < MIN_FRACTION and time.monotonic() < deadline:
                png = canvas.screenshot()
                fraction = color_fraction(png, "#ffa500")
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "readme-debian-novnc.png").write_bytes(png)
            assert fraction >= MIN_FRACTION, f"{fraction:.1%} orange, see the artifact"
        finally:
            context.close()
    finally:
        space.stop()


def test_quickstart_reserve(browser: Browser, workspace: Workspace) -> None:
    """The server with the desktop service: reserve with curl, open the URL with the
    token; the desktop shows, and closing the page stops it and frees the slot."""
    quick = quickstarts()["reserve"]
    for script in quick.blocks["run"]:
        workspace.run(script)
    [call] = quick.blocks["call"]
    token = json.loads(workspace.call(call))["token"]
    [url] = quick.blocks["open"]
    shows_color(browser, workspace.url(url, token), desktop_options()["color"],
                "readme-reserve.png")
    desktop = next(s for s in status(workspace) if s["name"] == "desktop")
    wait_until(lambda: not next(s for s in status(workspace)
                                if s["name"] == "desktop")["instances"], timeout=20)
    assert desktop["count"] == 2


def test_quickstart_cluster(browser: Browser, workspace: Workspace) -> None:
    """A Redis and three instances as the README starts them: a token reserved on node1
    echoes a line through node2's websocket in the demo page (node2 took it over), node3
    lists it, and a release through node3 closes the page's websocket with 1001."""
    require("redis-server")
    require("openssl")
    quick = quickstarts()["cluster"]
    [run] = quick.blocks["run"]
    workspace.run(run)
    redis = next(p for p in psutil.Process(workspace.groups[0].pid).children(recursive=True)
                 if p.name() == "redis-server")
    listening = {c.laddr.ip for c in redis.net_connections() if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}  # not every interface: Redis has no password here
    reserve, release = quick.blocks["call"]
    token = json.loads(workspace.call(reserve))["token"]
    [url] = quick.blocks["open"]
    context = new_context(browser)
    try:
        page = demo_page_echoes(context, workspace.url(url, token), "hello, cluster")
        listed = json.loads(workspace.call("curl -s http://127.0.0.1:9093/v1/status"))
        echo = next(s for s in listed if s["name"] == "echo")
        assert [(e["token"], e["node"], e["state"]) for e in echo["instances"]] == [
            (token, "node2", "active")]
        assert echo["count"] == 6  # 2 per instance
        assert json.loads(workspace.call(release, token))["released"] == token
        expect(page.locator("#state")).to_have_text(re.compile(r"^closed \(1001"))
    finally:
        context.close()
