"""The server as a file of an install tree, driven as the PyEnSight launchers drive it.

A fake ``ansys_inc/v261/CEI`` is built the way the launchers expect it:
``nexus261/nexus_launcher/websocketserver.py`` is a copy of this project's launcher
script (it imports the package installed for the interpreter), ``bin/cpython`` runs
that interpreter, ``bin/envision`` is a stand-in serving echo on the VNC port it is
given, and ``nexus261/ansys261/`` holds the web files the launchers' pages load. The
server is started with the launch lines of the contract (section 1 and 7), with no
install option, and stopped in both ways the launchers stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import cast

import psutil
import pytest
import websockets

from support import (
    EXAMPLES,
    LAUNCHER,
    ServerProcess,
    free_port,
    marked_processes,
    recv_bytes,
    wait_until,
)

KEY = "8c1f2e4a-launcher-key"
LOADER = b"// the install's viewer-loader.js\n"
NOVNC = b"<!DOCTYPE html><title>the install's vnc_envision</title>\n"
STAND_IN = f"""#!{sys.executable}
# Stands in for EnVision: serves echo on the VNC port in its -vnc URL.
import re, runpy, sys
port = re.search(r"rfb_port=(\\d+)", " ".join(sys.argv)).group(1)
sys.argv = ["echo_server.py", port]
runpy.run_path({str(EXAMPLES / "echo_server.py")!r}, run_name="__main__")
"""
# The launchers' environment, with nothing naming an install: the location must do.
ENV = {"WEBSOCKETSERVER_SECURITY_TOKEN": KEY, "ENSIGHT_SECURITY_TOKEN": KEY,
       "PYENSIGHT_ANSYS_INSTALLATION": "", "CEI_HOME": "", "WEBSOCKETSERVER_APP_ROOT": "",
       **{name: "" for name in os.environ if name.startswith("AWP_ROOT")}}


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def cei(tmp_path: Path) -> Path:
    """``tmp/ansys_inc/v261/CEI``, laid out as the launchers find it."""
    cei = tmp_path / "ansys_inc" / "v261" / "CEI"
    launcher_dir = cei / "nexus261" / "nexus_launcher"
    launcher_dir.mkdir(parents=True)
    (launcher_dir / "websocketserver.py").write_bytes(LAUNCHER.read_bytes())
    web = cei / "nexus261" / "ansys261"
    (web / "nexus").mkdir(parents=True)
    (web / "nexus" / "viewer-loader.js").write_bytes(LOADER)
    (web / "ensight" / "novnc").mkdir(parents=True)
    (web / "ensight" / "novnc" / "vnc_envision.html").write_bytes(NOVNC)
    (cei / "bin").mkdir()
    _executable(cei / "bin" / "cpython", f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    _executable(cei / "bin" / "envision", STAND_IN)
    return cei


def launch(cei: Path, tmp_path: Path, form: str, ws_port: int) -> ServerProcess:
    """``{CEI}/bin/cpython {CEI}/nexus261/nexus_launcher/websocketserver.py ...`` as the
    local launcher (port last) or the container launcher (port first) builds it."""
    session = tmp_path / "pyensight_session"
    session.mkdir(exist_ok=True)
    http_port = free_port()
    script = cei / "nexus261" / "nexus_launcher" / "websocketserver.py"
    command = [str(cei / "bin" / "cpython"), str(script)]
    common = ["--http_directory", str(session), "--http_port", str(http_port)]
    if form == "local":
        argv = [*command, *common, "--client_port", str(free_port()),
                "--local_session", "envision", "5", "--separate_loops",
                "--security_token", KEY, str(ws_port)]
    else:
        argv = [*command, str(ws_port), *common, "--separate_loops", "--security_token", KEY,
                "--client_port", "1999", "--add_header", "instance_name=N",
                "--local_session", "envision", "5"]
    return ServerProcess(argv, ws_port=ws_port, http_port=http_port, token=KEY,
                         log_dir=tmp_path, env=ENV)


def write_pages(server: ServerProcess, session: Path) -> None:
    """The pages the launchers write: 2024 R1+ (viewer-loader.js) and older (novnc)."""
    query = "?extra=1"
    (session / "remote.html").write_text(
        f"<script src='/ansys261/nexus//viewer-loader.js{query}'></script>\n"
        "<ansys-nexus-viewer renderer=\"envnc\" active=\"true\"></ansys-nexus-viewer>\n")
    (session / "remote_old.html").write_text(
        f"<iframe src='http://127.0.0.1:{server.http_port}/ansys/ensight/novnc/"
        f"vnc_envision.html?autoconnect=true&host=127.0.0.1&port={server.ws_port}'>"
        "</iframe>\n")


async def through_envision(server: ServerProcess, token: str) -> bytes:
    async with websockets.connect(server.ws_url(token=token)) as ws:
        await ws.send(b"RFB 003.008\n")
        return await asyncio.wait_for(recv_bytes(ws), 20)


def tree_of(server: ServerProcess) -> list[psutil.Process]:
    return [psutil.Process(server.pid), *server.descendants()]


def gone(processes: list[psutil.Process]) -> bool:
    """Every one of them has ended (or is a zombie left for its parent to reap)."""
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return False
    return True


@pytest.mark.parametrize("form", ["local", "container"])
def test_launch_lines_pages_and_envision(cei: Path, tmp_path: Path, form: str) -> None:
    server = launch(cei, tmp_path, form, free_port())
    server.serving_pid()  # known while it runs, for marked_processes() after it ends
    try:
        write_pages(server, tmp_path / "pyensight_session")
        for page, expected in (("/remote.html", LOADER), ("/remote_old.html", NOVNC)):
            status, _, body = server.get(page)
            assert status == 200
            urls = re.findall(rb"src='([^']+)'", body)
            assert len(urls) == 1
            url = urls[0].decode().removeprefix(f"http://127.0.0.1:{server.http_port}")
            assert server.get(url)[::2] == (200, expected), url
        status, body = server.get_json("/v1/reserve/local_envision?target_pathname=/d/a.evsn")
        assert status == 200
        assert asyncio.run(through_envision(server, body["token"])) == b"RFB 003.008\n"
        if form == "container":
            assert server.get("/remote.html")[1]["instance_name"] == "N"
    finally:
        server.close()
    assert server.proc.returncode == 0
    wait_until(lambda: marked_processes(server) == [])


def test_port_minus_one_with_separate_loops(cei: Path, tmp_path: Path) -> None:
    server = launch(cei, tmp_path, "container", -1)
    try:
        write_pages(server, tmp_path / "pyensight_session")
        assert server.get("/ansys261/nexus//viewer-loader.js")[::2] == (200, LOADER)
    finally:
        server.close()
    assert server.proc.returncode == 0


def stopped_while_busy(server: ServerProcess, stop: Callable[[ServerProcess], None]
                       ) -> list[psutil.Process]:
    """Stop ``server`` while a local_envision session is active (and, with two CPUs
    or more, a relay process runs); return every process of its tree just before."""
    server.serving_pid()  # known while it runs, for marked_processes() after it ends
    token = server.get_json("/v1/reserve/local_envision")[1]["token"]

    async def hold() -> list[psutil.Process]:
        async with websockets.connect(server.ws_url(token=token)) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(ws.recv(), 20) == b"x"
            processes = tree_of(server)
            assert any("bin/envision" in " ".join(p.cmdline()) for p in processes)
            stop(server)
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                await asyncio.wait_for(ws.recv(), 20)
            return processes

    return asyncio.run(hold())


def _kill_tree_then_rest_stop(server: ServerProcess) -> None:
    """The local launcher's ``close``: ``kill -9`` of the tree, children first, then
    ``GET /v1/stop?security_token=K``, whose failed connection (refused, or reset by a
    dying process) it ignores."""
    for proc in psutil.Process(server.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            subprocess.run(["kill", "-9", str(proc.pid)], check=False,
                           stderr=subprocess.DEVNULL)
    subprocess.run(["kill", "-9", str(server.pid)], check=False)
    with pytest.raises(OSError):  # urllib.error.URLError, ConnectionResetError
        urllib.request.urlopen(server.url("/v1/stop"), timeout=5)


def _sigterm_every_websocketserver_process(server: ServerProcess) -> None:
    """The container launcher's ``pkill -f websocketserver.py``: SIGTERM, at once, to
    every process whose command line names the script. (Done by pid here, limited to
    this test's own script path, so that no other server on this machine is hit.)"""
    script = str(Path(cast(list[str], server.proc.args)[1]))  # started from an argv list
    targets = [p for p in psutil.process_iter(["cmdline"])
               if script in " ".join(p.info["cmdline"] or ())]
    assert len(targets) >= 2  # the supervisor and the server at least
    for proc in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)


@pytest.mark.parametrize("stop", [_kill_tree_then_rest_stop,
                                  _sigterm_every_websocketserver_process])
def test_both_launcher_stops_leave_no_process(cei: Path, tmp_path: Path,
                                              stop: Callable[[ServerProcess], None]) -> None:
    server = launch(cei, tmp_path, "local", free_port())
    try:
        processes = stopped_while_busy(server, stop)
        server.wait_exit(timeout=20)
        wait_until(lambda: gone(processes), timeout=20)
        assert marked_processes(server) == []
        script = str(cei / "nexus261" / "nexus_launcher" / "websocketserver.py")
        assert not [p for p in psutil.process_iter(["cmdline"])
                    if script in " ".join(p.info["cmdline"] or ())]
    finally:
        server.close()
