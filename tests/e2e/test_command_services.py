"""``"command"`` services (a command line in the config, no Python) and what a
service prints: each line in the server's log as ``name[index]: line``."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import websockets

from support import StartServer, marked_processes, received_close, recv_bytes, wait_until

# A service as a newcomer writes one: says what it was given, prints on stdout and
# stderr, one over-long line and a lot of output before it listens (a reader that
# stalled would leave it blocked on a full pipe), then echoes on the port.
CHATTY = f"""#!{sys.executable}
import socket, sys
print("args", sys.argv[1:], flush=True)
print("to stderr", file=sys.stderr, flush=True)
print("x" * 10000, flush=True)
for n in range(20000):
    print("filler line", n)
print("filled", flush=True)
port = int(sys.argv[1].partition("=")[2])
with socket.create_server(("127.0.0.1", port)) as server:
    while True:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
"""


def write_service(folder: Path, command: list[str]) -> Path:
    """``chatty.py`` (executable) and a config naming it by a relative path."""
    folder.mkdir()
    program = folder / "chatty.py"
    program.write_text(CHATTY)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    config = folder / "services.json"
    config.write_text(json.dumps({"chatty": {"command": command, "count": 2,
                                             "options": {"color": "blue", "title": "t",
                                                         "sizes": [1, 2]}}}))
    return config


async def echo_once(url: str) -> bytes:
    async with websockets.connect(url, open_timeout=30) as ws:
        await ws.send(b"ping")
        return bytes(await asyncio.wait_for(recv_bytes(ws), 30))


def test_command_service_substitutes_and_logs_its_output(start_server: StartServer,
                                                         tmp_path: Path) -> None:
    """Relative paths are the config folder's (the server runs elsewhere); a
    reservation's option overrides the config's; the output is prefixed and cut."""
    config = write_service(tmp_path / "conf", [
        "./chatty.py", "--port={port}", "--index={index}", "--color={color}",
        "--title={title}", "{{literal}}"])
    assert Path.cwd() != config.parent
    server = start_server("--remote_session_config", str(config), "--start_timeout", "20")
    status, body = server.get_json("/v1/reserve/chatty?color=red&title=%7Bport%7D&x=1")
    assert status == 200, body
    url = server.ws_url(token=body["token"])
    assert asyncio.run(echo_once(url)) == b"ping"
    log = wait_until(lambda: "chatty[0]: filled" in server.log() and server.log())
    assert "chatty[0]: args ['--port=" in log
    assert "', '--index=0', '--color=red', '--title={port}', '{literal}']" in log
    assert "chatty[0]: to stderr" in log
    assert f"chatty[0]: {'x' * 4096} [5904 more bytes]" in log
    assert "x" * 4097 not in log
    assert "chatty[0]: filler line 19999" in log
    for line in log.splitlines():  # never two services' lines in one
        if "filler line" in line:
            assert line.count("filler line") == 1, line


def test_command_service_runs_a_program_by_name(start_server: StartServer, tmp_path: Path) -> None:
    """A program found on PATH, with a script beside the config as its argument."""
    config = write_service(tmp_path / "conf", [
        os.path.basename(sys.executable), "chatty.py", "--port={port}"])
    server = start_server("--remote_session_config", str(config), "--start_timeout", "20",
                          env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    token = server.get_json("/v1/reserve/chatty")[1]["token"]
    assert asyncio.run(echo_once(server.ws_url(token=token))) == b"ping"
    wait_until(lambda: "chatty[0]: args ['--port=" in server.log())


ECHO_SCRIPT = """import sys
from websocketserver import CommandService


class Echo(CommandService):
    def command(self, index, options, port):
        return [sys.executable, "echo_server.py", str(port)]
"""


def test_command_service_script_runs_beside_its_file(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    """The README's ``CommandService`` snippet, a relative ``echo_server.py`` included,
    works wherever the server is started."""
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "echo.py").write_text(ECHO_SCRIPT)
    (folder / "echo_server.py").write_text(
        (Path(__file__).parents[2] / "examples" / "echo_server.py").read_text())
    config = folder / "services.json"
    config.write_text(json.dumps({"echo": {"script": "echo.py", "count": 1}}))
    server = start_server("--remote_session_config", str(config), "--start_timeout", "20")
    token = server.get_json("/v1/reserve/echo")[1]["token"]
    assert asyncio.run(echo_once(server.ws_url(token=token))) == b"ping"


def test_builtin_session_output_is_prefixed(start_server: StartServer, tmp_path: Path) -> None:
    config = write_service(tmp_path / "conf", ["unused"])
    command = f"{config.parent / 'chatty.py'} --port={{port}}"
    server = start_server("--local_session", "ensight", "1", "--local_app_command", command,
                          "--start_timeout", "20")
    token = server.get_json("/v1/reserve/local_ensight")[1]["token"]
    assert asyncio.run(echo_once(server.ws_url(token=token))) == b"ping"
    wait_until(lambda: "local_ensight[0]: args ['--port=" in server.log())


def test_release_during_start_frees_the_slot_at_once(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    """A program that never listens, released while the server waits for its port: the
    websocket closes and the slot is free within seconds, not after --start_timeout."""
    config = tmp_path / "services.json"
    config.write_text(json.dumps({"mute": {"count": 1, "command": [
        sys.executable, "-c", "import time; time.sleep(120)", "{port}"]}}))
    server = start_server("--remote_session_config", str(config), "--start_timeout", "60")
    token = server.get_json("/v1/reserve/mute")[1]["token"]

    async def session() -> tuple[int, str]:
        async with websockets.connect(server.ws_url(token=token), open_timeout=30) as ws:
            await asyncio.to_thread(wait_until, lambda: marked_processes(server))
            assert server.get_json(f"/v1/release/{token}")[0] == 200
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
            return received_close(closed.value).code, received_close(closed.value).reason

    assert asyncio.run(session()) == (1001, "reservation released")
    wait_until(lambda: server.get_json("/v1/status")[1][0]["instances"] == [], timeout=10)
    assert marked_processes(server) == []
    assert server.get_json("/v1/reserve/mute")[0] == 200
