"""The README's quick-starts, run as written: extracted from README.md, so they cannot drift.

A fenced block right after ``<!-- quickstart: NAME KIND -->`` belongs to quick-start
NAME; KIND says what the test does with it:

* ``run``: the block is one bash script that keeps running (the server in the
  foreground, helpers with ``&``); it runs in a process group of its own, the test
  waits until every port the block names listens, and at the end SIGTERMs the group
  (as Ctrl-C would) and checks that no process it started is left;
* ``call``: a bash script that finishes; its output is the JSON the README shows
  (``{"token": ...}``);
* ``open``: a URL to open in the browser.

What a test must change, and only that: the ports of :data:`PORTS` (8080, 9090, 5900,
and the cluster's 6390, 8081-8083, 9091-9093) become free ports (each number everywhere
in the quick-start), ``TOKEN`` in a URL or a ``call`` block becomes the token the first
``call`` block printed, and the working directory is a scratch checkout: ``.venv``,
``examples`` and ``demo`` link to this checkout, ``novnc/`` holds noVNC's library
(the npm package, as the other browser tests use) with a ``vnc.html`` of our own
that reads ``host``, ``port`` and ``path`` as noVNC's ``vnc.html`` does (the README's
``git clone`` of noVNC needs the network). The page is opened in headless Chromium
and must show the desktop's colour (the cluster's: the demo page must echo a line).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from cluster_support import require
from playwright.sync_api import Browser, expect

from e2e.vnc_support import (
    TIMEOUT_MS,
    desktop_options,
    expect_canvas_color,
    new_context,
    novnc_site,
    require_novnc,
)
from support import ROOT, free_port, wait_port, wait_until

README = ROOT / "README.md"
PORTS = ("8080", "9090", "5900", "6390", "8081", "8082", "8083", "9091", "9092", "9093")
MARKER = re.compile(r"<!-- quickstart: (\w+) (run|call|open) -->\s*\n```\w*\n(.*?)```",
                    re.DOTALL)


@dataclass
class QuickStart:
    """The marked blocks of one quick-start, in README order per kind."""

    name: str
    blocks: dict[str, list[str]] = field(default_factory=dict)


def quickstarts() -> dict[str, QuickStart]:
    found: dict[str, QuickStart] = {}
    for name, kind, body in MARKER.findall(README.read_text()):
        found.setdefault(name, QuickStart(name)).blocks.setdefault(kind, []).append(body)
    return found


def with_ports(text: str, ports: dict[str, int]) -> str:
    return re.sub(r"\b(" + "|".join(PORTS) + r")\b", lambda m: str(ports[m.group(1)]), text)


class Workspace:
    """A scratch checkout to run quick-start blocks in, and what they started."""

    def __init__(self, where: Path) -> None:
        self.where = where
        for name in (".venv", "examples", "demo"):
            (where / name).symlink_to(ROOT / name)
        site = novnc_site(where / "novnc")
        (site / "vnc.html").write_text((site / "vnc_lite.html").read_text())
        self.ports = {port: free_port() for port in PORTS}
        self.groups: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def run(self, script: str) -> None:
        """Start a ``run`` block; return once every port it names listens."""
        script = with_ports(script, self.ports)
        log = self.where / f"run-{len(self.groups)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.where, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.append(proc)
        for original, port in self.ports.items():
            if re.search(rf"\b{port}\b", script):
                try:
                    wait_port(port, timeout=30, proc=proc)
                except BaseException:
                    raise AssertionError(f"port {original} of\n{script}\ndid not listen:\n"
                                         + log.read_text(errors="replace")) from None

    def call(self, script: str, token: str = "") -> str:
        script = with_ports(script, self.ports).replace("TOKEN", token)
        done = subprocess.run(["bash", "-c", script], cwd=self.where,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def url(self, text: str, token: str = "") -> str:
        [line] = [line.strip() for line in text.splitlines() if line.strip()]
        return with_ports(line, self.ports).replace("TOKEN", token)

    def stop(self) -> None:
        """SIGTERM every group (Ctrl-C for each terminal); nothing they started stays."""
        started: list[psutil.Process] = []
        for proc in self.groups:
            try:
                started += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.groups:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        left = wait_until(lambda: not [p for p in started if alive(p)], timeout=20)
        assert left


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def browser(chromium: Browser) -> Browser:
    require_novnc("bash", "curl")
    return chromium


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    space = Workspace(tmp_path)
    try:
        yield space
    finally:
        space.stop()


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
    assert found == {"basic": ["open", "run"], "reserve": ["call", "open", "run"],
                     "cluster": ["call", "open", "run"]}


def test_quickstart_basic(browser: Browser, workspace: Workspace) -> None:
    """A desktop on 5900, the server in front: the README's URL shows it (orange)."""
    quick = quickstarts()["basic"]
    for script in quick.blocks["run"]:
        workspace.run(script)
    [url] = quick.blocks["open"]
    assert "--color orange" in quick.blocks["run"][0]
    shows_color(browser, workspace.url(url), "#ffa500", "readme-basic.png")


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
    reserve, release = quick.blocks["call"]
    token = json.loads(workspace.call(reserve))["token"]
    [url] = quick.blocks["open"]
    context = new_context(browser)
    try:
        page = context.new_page()
        page.goto(workspace.url(url, token))
        expect(page.locator("#state")).to_have_text("open")
        page.fill("#text", "hello, cluster")
        page.press("#text", "Enter")
        expect(page.locator("#log")).to_contain_text("hello, cluster")
        listed = json.loads(workspace.call("curl -s http://127.0.0.1:9093/v1/status"))
        echo = next(s for s in listed if s["name"] == "echo")
        assert [(e["token"], e["node"], e["state"]) for e in echo["instances"]] == [
            (token, "node2", "active")]
        assert echo["count"] == 6  # 2 per instance
        assert json.loads(workspace.call(release, token))["released"] == token
        expect(page.locator("#state")).to_have_text(re.compile(r"^closed \(1001"))
    finally:
        context.close()
