"""Install-root discovery: where /ansys... URLs and the built-in applications come from."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest
import websockets

from support import EXAMPLES, StartServer, recv_bytes, wait_until
from websocketserver.cli import parse_settings
from websocketserver.install import Install, discover, log_install, version_folder

LOADER = b"// viewer-loader.js of the install\n"
NOVNC = b"<!DOCTYPE html><title>vnc_envision of the install</title>\n"
STAND_IN = f"""#!{sys.executable}
# Stands in for EnVision: serves echo on the VNC port it was given.
import re, runpy, sys
port = re.search(r"rfb_port=(\\d+)", " ".join(sys.argv)).group(1)
sys.argv = ["echo_server.py", port]
runpy.run_path({str(EXAMPLES / "echo_server.py")!r}, run_name="__main__")
"""
NO_INSTALL = {"PYENSIGHT_ANSYS_INSTALLATION": "", "CEI_HOME": "", "WEBSOCKETSERVER_APP_ROOT": "",
              **{name: "" for name in os.environ if name.startswith("AWP_ROOT")}}


def make_tree(version_dir: Path, *, app: bool = True) -> Path:
    """``version_dir/CEI`` as installed: nexusNNN/ansysNNN web files, bin/envision."""
    cei = version_dir / "CEI"
    web = cei / "nexus261" / "ansys261"
    (web / "nexus").mkdir(parents=True)
    (web / "nexus" / "viewer-loader.js").write_bytes(LOADER)
    (web / "ensight" / "novnc").mkdir(parents=True)
    (web / "ensight" / "novnc" / "vnc_envision.html").write_bytes(NOVNC)
    (web / ".secret").write_text("never served")
    (cei / "nexus261" / "nexus_launcher").mkdir()
    if app:
        (cei / "bin").mkdir()
        (cei / "bin" / "envision").write_text(STAND_IN)
        (cei / "bin" / "envision").chmod(0o755)
    return cei


def test_found_from_the_servers_own_location(tmp_path: Path) -> None:
    cei = make_tree(tmp_path / "v261")
    script = cei / "nexus261" / "nexus_launcher" / "websocketserver.py"
    found = discover(script, {"PYENSIGHT_ANSYS_INSTALLATION": str(tmp_path / "elsewhere")})
    assert found == Install(cei, cei / "nexus261", f"the server's location {script}")
    assert discover(tmp_path / "websocketserver.py", {}) is None


def test_a_symlinked_launcher_counts_where_it_is_placed_or_points(tmp_path: Path) -> None:
    cei = make_tree(tmp_path / "v261")
    real = cei / "nexus261" / "nexus_launcher" / "websocketserver.py"
    real.write_text("")
    placed = tmp_path / "websocketserver.py"
    placed.symlink_to(real)
    assert discover(placed, {}).app_root == cei  # type: ignore[union-attr]


@pytest.mark.parametrize("name, level", [
    ("PYENSIGHT_ANSYS_INSTALLATION", ""),  # the documented form: a version directory
    ("PYENSIGHT_ANSYS_INSTALLATION", "CEI"),
    ("CEI_HOME", "CEI"),
    ("AWP_ROOT261", ""),
])
def test_found_from_the_environment(tmp_path: Path, name: str, level: str) -> None:
    cei = make_tree(tmp_path / "v261")
    value = str(tmp_path / "v261" / level) if level else str(tmp_path / "v261")
    found = discover(None, {name: value})
    assert found == Install(Path(value), cei / "nexus261", f"${name}={value}")


def test_environment_order_and_values_that_hold_no_install(tmp_path: Path) -> None:
    old, new = make_tree(tmp_path / "v252"), make_tree(tmp_path / "v261")
    newest = discover(None, {"AWP_ROOT252": str(old.parent), "AWP_ROOT261": str(new.parent)})
    assert newest is not None and newest.web_root == new / "nexus261"
    second = discover(None, {"PYENSIGHT_ANSYS_INSTALLATION": str(tmp_path / "nothing"),
                             "CEI_HOME": str(old)})
    assert second is not None and second.app_root == old
    assert discover(None, {"PYENSIGHT_ANSYS_INSTALLATION": str(tmp_path)}) is None


def test_the_version_folder_of_unversioned_ansys_urls(tmp_path: Path) -> None:
    nexus = tmp_path / "nexus261"
    for name in ("ansys252", "ansys261", "ansys9", ".ansys", "ansysx"):
        (nexus / name).mkdir(parents=True)
    assert version_folder(nexus) == "ansys261"  # the nexus folder's own version
    other = tmp_path / "web"
    for name in ("ansys252", "ansys261"):
        (other / name).mkdir(parents=True)
    assert version_folder(other) == "ansys261"  # else the newest
    (other / "ansys").mkdir()
    assert version_folder(other) == "ansys"  # an older install's own folder
    assert version_folder(tmp_path / "missing") is None


def test_settings_from_the_location_and_options_first(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in NO_INSTALL.items():
        monkeypatch.setenv(name, value)
    cei = make_tree(tmp_path / "v261")
    script = cei / "nexus261" / "nexus_launcher" / "websocketserver.py"
    argv = ["--http_directory", str(tmp_path), "--local_session", "envision", "5", "1"]
    settings = parse_settings(argv, script)
    assert settings.ansys_install_root == cei / "nexus261"
    assert settings.local_app_root == cei
    assert settings.install_notes == (
        f"/ansys... URLs are served from {cei / 'nexus261'} (the server's location {script})",
        f"built-in applications run from {cei}/bin or {cei}/CEI/bin "
        f"(the server's location {script})")
    given = parse_settings(["--ansys_install_root", str(tmp_path), "--local_app_root", "/opt",
                            *argv], script)
    assert given.ansys_install_root == tmp_path and given.local_app_root == Path("/opt")
    monkeypatch.setenv("WEBSOCKETSERVER_APP_ROOT", "/srv/apps")
    assert parse_settings(argv, script).local_app_root == Path("/srv/apps")
    nothing = parse_settings(argv, tmp_path / "websocketserver.py")
    assert nothing.ansys_install_root is None
    assert "served from --http_directory: no install found" in nothing.install_notes[0]


@pytest.mark.parametrize(("argv", "level"), [
    ([], logging.DEBUG),  # a plain server: "no install found" is no news
    (["--local_session", "envision", "5"], logging.INFO),  # it needs an install
    (["--ansys_install_root", "."], logging.INFO),  # /ansys... is not --http_directory's
    ("found", logging.INFO),
])
def test_the_install_is_logged_at_verbose_1_when_it_matters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        argv: list[str] | str, level: int) -> None:
    for name, value in NO_INSTALL.items():
        monkeypatch.setenv(name, value)
    if argv == "found":
        monkeypatch.setenv("CEI_HOME", str(make_tree(tmp_path / "v261")))
        argv = []
    settings = parse_settings(["--http_directory", str(tmp_path), *argv, "1"],
                              tmp_path / "websocketserver.py")
    with caplog.at_level(logging.DEBUG, "websocketserver.install"):
        log_install(settings)
    assert [record.getMessage() for record in caplog.records] == list(settings.install_notes)
    assert {record.levelno for record in caplog.records} == {level}


@pytest.mark.parametrize("level", ["", "CEI"])
def test_install_urls_from_the_environment(start_server: StartServer, tmp_path: Path,
                                           level: str) -> None:
    cei = make_tree(tmp_path / "ansys_inc" / "v261")
    value = str(cei if level else cei.parent)
    (tmp_path / "www").mkdir()
    server = start_server("--verbose", "1", http_dir=tmp_path / "www",
                          env={**NO_INSTALL, "PYENSIGHT_ANSYS_INSTALLATION": value})
    assert server.get("/ansys261/nexus//viewer-loader.js?x=1")[::2] == (200, LOADER)
    status, headers, body = server.get(
        "/ansys/ensight/novnc/vnc_envision.html?autoconnect=true&host=127.0.0.1&port=1")
    assert (status, body) == (200, NOVNC) and headers["Content-Type"].startswith("text/html")
    status, _, listing = server.get("/ansys")  # redirected to /ansys/, as any folder
    assert status == 200 and b"nexus/" in listing and b"secret" not in listing
    for refused in ("/ansys261/.secret", "/ansys/.secret", "/ansys261/%2e%2e/nexus261/",
                    "/ansys261/../../bin/envision", "/ansys262/nexus/viewer-loader.js"):
        assert server.get(refused)[0] == 404, refused
    wait_until(lambda: f"/ansys... URLs are served from {cei / 'nexus261'} "
                       f"($PYENSIGHT_ANSYS_INSTALLATION={value})" in server.log())


def test_without_an_install_ansys_urls_come_from_http_directory(start_server: StartServer,
                                                                tmp_path: Path) -> None:
    www = tmp_path / "www"
    (www / "ansys261" / "nexus").mkdir(parents=True)
    (www / "ansys261" / "nexus" / "viewer-loader.js").write_text("from www")
    server = start_server("--verbose", "1", http_dir=www, env=NO_INSTALL)
    assert server.get("/ansys261/nexus/viewer-loader.js")[::2] == (200, b"from www")
    assert server.get("/ansys/nexus/viewer-loader.js")[0] == 404
    log = wait_until(lambda: " ws port " in server.log() and server.log())
    assert "websocketserver.install" not in log  # no install: no news at --verbose 1


async def _echo_or_close(url: str) -> tuple[bytes | None, str]:
    """What a session answers, or the reason its websocket was closed with."""
    async with websockets.connect(url) as ws:
        try:
            await ws.send(b"RFB?")
            return await asyncio.wait_for(recv_bytes(ws), 20), ""
        except websockets.ConnectionClosed as closed:
            return None, closed.rcvd.reason if closed.rcvd else ""


@pytest.mark.parametrize("level", ["", "CEI"])
def test_local_envision_under_root_or_root_cei(start_server: StartServer, tmp_path: Path,
                                               level: str) -> None:
    cei = make_tree(tmp_path / "v261")
    root = cei if level else cei.parent
    server = start_server("--local_session", "envision", "5",
                          env={**NO_INSTALL, "PYENSIGHT_ANSYS_INSTALLATION": str(root)})
    token = server.get_json("/v1/reserve/local_envision")[1]["token"]
    assert asyncio.run(_echo_or_close(server.ws_url(token=token))) == (b"RFB?", "")


def test_missing_application_names_both_paths_tried(start_server: StartServer,
                                                    tmp_path: Path) -> None:
    root = tmp_path / "v261"
    make_tree(root, app=False)
    server = start_server("--local_session", "envision", "5",
                          env={**NO_INSTALL, "PYENSIGHT_ANSYS_INSTALLATION": str(root)})
    token = server.get_json("/v1/reserve/local_envision")[1]["token"]
    data, reason = asyncio.run(_echo_or_close(server.ws_url(token=token)))
    assert data is None and "envision is not installed here: neither" in reason
    wait_until(lambda: f"neither {root}/bin/envision nor {root}/CEI/bin/envision exists"
               in server.log())
