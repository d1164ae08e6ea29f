"""The how-tos in docs/, run as written: their marked blocks (``<!-- howto: NAME KIND -->``).

:mod:`e2e.runbook` runs them in a scratch checkout, and changes only this: the ports
of :data:`e2e.runbook.PORTS` become free ports (in the blocks and in the scratch
checkout's copy of ``deploy/``), ``$HOME`` is a scratch directory (the TLS how-to's
NSS database), and ``novnc/`` is the test's own noVNC page (as in
test_readme_quickstart.py). Each test checks what the how-to promises: the page
trusted through the NSS database, the websocket through nginx or HAProxy, no token in
a front end's access log.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Error, expect

from e2e.conftest import CHROMIUM_ARGS
from e2e.runbook import Runbook, Workspace, demo_page_echoes, runbooks
from e2e.vnc_support import (
    CHROMIUM,
    TIMEOUT_MS,
    expect_canvas_color,
    new_context,
    require,
    require_novnc,
)
from support import EXAMPLES, ROOT, free_port, wait_port, wait_until

DOCS = ROOT / "docs"


def howto(name: str) -> Runbook:
    return runbooks(DOCS / f"howto-{name}.md", "howto")[name]


def test_the_howtos_have_their_blocks() -> None:
    """The markers are there: removing one must not make the other tests vacuous."""
    found = {name: {kind: len(blocks) for kind, blocks in howto(name).blocks.items()}
             for name in ("tls", "haproxy")}
    assert found == {"tls": {"call": 4, "run": 1, "open": 1},
                     "haproxy": {"run": 2, "call": 1, "open": 1}}


def test_tls_trusted_through_a_new_nss_database(chromium: Browser,
                                                workspace: Workspace) -> None:
    """docs/howto-tls.md on a machine where Chromium never ran: the certificate, the
    server with it, the NSS database created and the certificate trusted in it; a
    Chromium started afterwards shows the desktop over https and wss (no error
    ignored), one started before the trust refuses the page, and the last block takes
    the trust away again."""
    require_novnc("openssl", "certutil", "curl")
    tls = howto("tls")
    make_cert, trust, check, untrust = tls.blocks["call"]
    [run] = tls.blocks["run"]
    [url] = tls.blocks["open"]
    workspace.call(make_cert)
    workspace.run(run)
    url = workspace.url(url)
    assert not (workspace.home / ".pki").exists()  # as if Chromium never ran here

    def chromium_of_home() -> Browser:
        return chromium.browser_type.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS,
            env={**workspace.env, "HOME": str(workspace.home)})

    untrusted = chromium_of_home()
    try:
        with pytest.raises(Error, match="ERR_CERT_AUTHORITY_INVALID"):
            untrusted.new_page().goto(url)
    finally:
        untrusted.close()
    workspace.call(trust)
    assert workspace.call(check) == "200\n"
    trusted = chromium_of_home()
    try:
        page = trusted.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        expect(page.locator("#status")).to_have_text("connected")
        expect_canvas_color(page, "#ffa500", "howto-tls.png")
    finally:
        trusted.close()
    workspace.call(untrust)
    listed = workspace.call('certutil -L -d "sql:$HOME/.pki/nssdb"')
    assert "websocketserver" not in listed




def test_haproxy_on_one_machine(chromium: Browser, workspace: Workspace) -> None:
    """docs/howto-haproxy.md's one machine: Redis, two instances and HAProxy with
    deploy/haproxy-local.cfg; the demo page through HAProxy echoes a line, HAProxy
    sent requests to both loopback instances, and its log holds no token."""
    require("redis-server", "openssl", "curl", paths=(Path("/usr/sbin/haproxy"),))
    steps = howto("haproxy")
    instances, proxy = steps.blocks["run"]
    [reserve] = steps.blocks["call"]
    [url] = steps.blocks["open"]
    workspace.run(instances)
    workspace.run(proxy, wait=("8080", "9090"))
    token = json.loads(workspace.call(reserve))["token"]
    context = new_context(chromium)
    try:
        demo_page_echoes(context, workspace.url(url, token), "hello, haproxy")
    finally:
        context.close()
    expected = ("GET /websockify", '"GET /v1/events/- HTTP/1.1"',  # the page's event stream
                "websocketserver_http/node1 ", "websocketserver_http/node2 ")
    # HAProxy logs a websocket or an event stream when it ends, which the page's close
    # has only begun
    wait_until(lambda: all(e in workspace.logs[1].read_text() for e in expected))
    log = workspace.logs[1].read_text()
    assert all(e in log for e in expected), log  # both loopback instances answered
    assert token not in log and "token=" not in log, log


def test_haproxy_local_is_the_recipe_on_loopback() -> None:
    """deploy/haproxy-local.cfg may differ from deploy/haproxy.cfg only in what makes it
    local (global, bind and server lines, comments): the rest must not drift."""

    def recipe(path: Path) -> list[str]:
        kept, section = [], ""
        for line in path.read_text().splitlines():
            if line and not line[0].isspace() and not line.startswith("#"):
                section = line
            words = line.split()
            if (section != "global" and words and not words[0].startswith("#")
                    and words[0] not in ("bind", "server")):
                kept.append(line)
        return kept

    local = recipe(ROOT / "deploy" / "haproxy-local.cfg")
    assert local == recipe(ROOT / "deploy" / "haproxy.cfg")
    assert len(local) > 20


def test_the_systemd_unit_verifies_and_its_command_runs(tmp_path: Path) -> None:
    """deploy/websocketserver.service: ``systemd-analyze verify`` finds nothing to say
    (an unknown key is only a warning, so any output fails), with its ExecStart at this
    checkout's venv; and that command, its production paths and ports swapped for
    scratch ones, starts on loopback, answers /v1/health and stops cleanly on
    SIGTERM, as systemd would stop it."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze missing (Debian package systemd)")
    unit = (ROOT / "deploy" / "websocketserver.service").read_text()
    venv_binary = "/opt/websocketserver/.venv/bin/websocketserver"
    assert venv_binary in unit
    local = tmp_path / "websocketserver.service"
    local.write_text(unit.replace(venv_binary, str(ROOT / ".venv" / "bin" / "websocketserver")))
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                            timeout=30)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")

    command = re.search(r"^ExecStart=((?:.*\\\n)*.*)$", unit, re.MULTILINE)
    assert command is not None
    argv = shlex.split(command.group(1).replace("\\\n", " "))
    http_port, ws_port = free_port(), free_port()
    www = tmp_path / "www"
    www.mkdir()
    swaps = {venv_binary: str(ROOT / ".venv" / "bin" / "websocketserver"),
             "/srv/websocketserver/www": str(www),
             "/etc/websocketserver/services.json": str(EXAMPLES / "desktop_services.json"),
             "9090": str(http_port), "8080": str(ws_port)}
    assert set(swaps) <= set(argv), argv
    env = {**os.environ, "WEBSOCKETSERVER_SECURITY_TOKEN": "unit-secret"}
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([swaps.get(arg, arg) for arg in argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_port(ws_port, proc=proc)
        wait_port(http_port, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/health",
                                    timeout=10) as answer:
            assert answer.status == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
