"""Run the shell blocks of the README and the how-tos as written, in a scratch checkout.

A fenced block right after ``<!-- TAG: NAME KIND -->`` (TAG ``quickstart`` in
README.md, ``howto`` in docs/howto-*.md) belongs to runbook NAME; KIND says what a
test does with it:

* ``run``: one bash script that keeps running (a server in the foreground, helpers
  with ``&``), in a process group of its own; :meth:`Workspace.run` returns once every
  port of :data:`PORTS` it names listens, and :meth:`Workspace.stop` SIGTERMs the
  group (as Ctrl-C would) and checks that no process it started is left;
* ``call``: a bash script that finishes; a test checks its output;
* ``open``: a URL to open in the browser.

What a test changes, and only that: the port numbers of :data:`PORTS` become free
ports (each number everywhere: in the blocks and in the workspace's copy of
``deploy/``), ``TOKEN`` becomes a token the test has, ``$HOME`` is a scratch
directory, and the working directory is a scratch checkout (:class:`Workspace`).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from playwright.sync_api import BrowserContext, Page, expect

from e2e.vnc_support import novnc_site
from support import ROOT, free_port, wait_port, wait_until

PORTS = ("8080", "9090", "5900", "6390", "8081", "8082", "8083", "9091", "9092", "9093",
         "8443")
"""The ports the README and the how-tos use; a test swaps each for a free one."""


@dataclass
class Runbook:
    """The marked blocks of one runbook, in document order per kind."""

    name: str
    blocks: dict[str, list[str]] = field(default_factory=dict)


def runbooks(document: Path, tag: str) -> dict[str, Runbook]:
    """The runbooks marked ``<!-- tag: NAME KIND -->`` in ``document``."""
    marker = re.compile(rf"<!-- {tag}: ([\w-]+) (run|call|open) -->[ \t]*\n"
                        r"[ \t]*```\w*\n(.*?)```", re.DOTALL)
    found: dict[str, Runbook] = {}
    for name, kind, body in marker.findall(document.read_text()):
        body = textwrap.dedent(body).rstrip(" \t")  # a block indented in a list item
        found.setdefault(name, Runbook(name)).blocks.setdefault(kind, []).append(body)
    return found


def with_ports(text: str, ports: dict[str, int]) -> str:
    return re.sub(r"\b(" + "|".join(PORTS) + r")\b", lambda m: str(ports[m.group(1)]), text)


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Workspace:
    """A scratch checkout to run blocks in, and what they started.

    ``.venv``, ``examples`` and ``demo`` link to this checkout; ``deploy/`` is a copy
    with the ports swapped; ``home/`` is ``$HOME``. With ``novnc``, ``novnc/`` holds
    noVNC's library (the npm package, as the other browser tests use) and a
    ``vnc.html`` of our own that reads ``host``, ``port`` and ``path`` as noVNC's does
    (the README's ways to get noVNC need root or the network).
    """

    def __init__(self, where: Path, novnc: bool = True) -> None:
        self.where = where
        for name in (".venv", "examples", "demo"):
            (where / name).symlink_to(ROOT / name)
        if novnc:
            site = novnc_site(where / "novnc")
            (site / "vnc.html").write_text((site / "vnc_lite.html").read_text())
        self.ports = {port: free_port() for port in PORTS}
        (where / "deploy").mkdir()
        for path in (ROOT / "deploy").iterdir():
            if path.is_file():
                (where / "deploy" / path.name).write_text(with_ports(path.read_text(),
                                                                     self.ports))
        self.home = where / "home"
        self.home.mkdir()
        self.env = {**os.environ, "HOME": str(self.home)}
        self.groups: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def run(self, script: str, wait: tuple[str, ...] | None = None) -> None:
        """Start a ``run`` block; return once the ports ``wait`` listen (by default
        every port of :data:`PORTS` the block names)."""
        script = with_ports(script, self.ports)
        log = self.where / f"run-{len(self.groups)}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            proc = subprocess.Popen(["bash", "-c", script], cwd=self.where, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    env=self.env)
        self.groups.append(proc)
        for original, port in self.ports.items():
            if (original in wait) if wait is not None else re.search(rf"\b{port}\b", script):
                try:
                    wait_port(port, timeout=30, proc=proc)
                except BaseException:
                    raise AssertionError(f"port {original} of\n{script}\ndid not listen:\n"
                                         + log.read_text(errors="replace")) from None

    def call(self, script: str, token: str = "") -> str:
        script = with_ports(script, self.ports).replace("TOKEN", token)
        done = subprocess.run(["bash", "-c", script], cwd=self.where, env=self.env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{script}\nfailed:\n{done.stdout}{done.stderr}"
        return done.stdout

    def url(self, text: str, token: str = "") -> str:
        [line] = [line.strip() for line in text.splitlines() if line.strip()]
        return with_ports(line, self.ports).replace("TOKEN", token)

    def log(self) -> str:
        return "".join(log.read_text(errors="replace") for log in self.logs)

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


def which(binary: str) -> str | None:
    """``binary`` on PATH or in the sbin directories a user's PATH may lack."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin:/sbin")


def demo_page_echoes(context: BrowserContext, url: str, text: str) -> Page:
    """The demo page at ``url`` opens its websocket and echoes ``text`` typed into it
    (the demo's own page: ``#state``, ``#text``, ``#log``), in a page of ``context``,
    which is returned open."""
    page = context.new_page()
    page.goto(url)
    expect(page.locator("#state")).to_have_text("open")
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(page.locator("#log")).to_contain_text(text)
    return page
