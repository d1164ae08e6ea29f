"""What the server says as it starts, at the default verbosity: a line per listener,
a warning per option that does nothing as given, and nothing about a shutdown when it
never started."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import EXAMPLES, LAUNCHER, ROOT, EchoBackend, StartServer, free_port, wait_until
from websocketserver.startup import listen_error


def test_one_line_per_listener(start_server: StartServer, echo: EchoBackend,
                               tmp_path: Path) -> None:
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"echo": {"script": str(EXAMPLES / "echo_service.py"),
                                           "count": 2}}))
    server = start_server("--remote_session_config", str(config),
                          "--client_port", str(echo.port))
    www = (ROOT / "demo" / "www").resolve()
    http = (f"INFO websocketserver.server: http port {server.http_port} on 127.0.0.1: files "
            f"from {www}, REST API, dashboard "
            f"http://127.0.0.1:{server.http_port}/v1/status_view (with the security token)")
    ws = (f"INFO websocketserver.server: ws port {server.ws_port} on 127.0.0.1: tunnels to "
          f"localhost:{echo.port} (basic mode); reservations of 1 service: echo (up to 2)")
    log = wait_until(lambda: ws in server.log() and server.log())
    assert http in log
    assert "WARNING" not in log


def test_options_that_do_nothing_are_warned_about(start_server: StartServer,
                                                  tmp_path: Path) -> None:
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"echo": {"script": str(EXAMPLES / "echo_service.py"),
                                           "count": 1}}))
    http_port = free_port()
    server = start_server("--http_port", str(http_port), "--client_hostname", "vnc.example",
                          "--remote_session_config", str(config), http=False,
                          token="s3cret-token")
    wanted = [f"--http_port {http_port} does nothing without --http_directory: there is no "
              "HTTP port (no files, no REST API)",
              "--security_token does nothing without --http_directory: there is no REST API",
              "--remote_session_config: services cannot be reserved without --http_directory",
              "--client_hostname vnc.example does nothing without --client_port",
              "http port: none (no --http_directory: no files, no REST API)"]
    log = wait_until(lambda: all(w in server.log() for w in wanted) and server.log())
    assert log.count("WARNING") == 4
    assert "s3cret-token" not in log


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def test_a_port_in_use_is_worded_alike_for_both_listeners(taken_port: int) -> None:
    """The HTTP port binds plain sockets, the websocket port asyncio's server, whose
    errors word the same errno differently."""
    with socket.socket() as plain, pytest.raises(OSError) as by_socket:
        plain.bind(("127.0.0.1", taken_port))

    async def bind() -> None:
        await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1",
                                                       taken_port)

    with pytest.raises(OSError) as by_asyncio:
        asyncio.run(bind())
    assert str(by_socket.value) != str(by_asyncio.value)
    assert listen_error("http", 9090, by_socket.value) == \
        "HTTP port 9090: address already in use"
    assert listen_error("ws", 8080, by_asyncio.value) == \
        "websocket port 8080: address already in use"
    unresolved = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert listen_error("ws", 8080, unresolved) == "websocket port 8080: name or service not known"


@pytest.mark.parametrize("taken", ["http", "ws"])
def test_a_failed_start_says_only_why(tmp_path: Path, taken_port: int, taken: str) -> None:
    """A port in use: one error line, exit 1, no "shutting down" or "stopped"."""
    http_port, ws_port = ((taken_port, free_port()) if taken == "http"
                          else (free_port(), taken_port))
    result = subprocess.run(
        [sys.executable, str(LAUNCHER), "--listen_address", "127.0.0.1",
         "--http_directory", str(tmp_path), "--http_port", str(http_port), str(ws_port)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    name = "HTTP" if taken == "http" else "websocket"
    assert result.stderr == (f"websocketserver.py: error: {name} port {taken_port}: "
                             "address already in use\n")
