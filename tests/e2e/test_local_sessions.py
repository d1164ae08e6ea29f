"""Built-in --local_session ensight/envision: the original command, stand-ins, no install."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from pathlib import Path

import pytest
import websockets

from support import EXAMPLES, StartServer, marked_processes, received_close, recv_bytes, wait_until

FAKE_APP = f"""#!{sys.executable}
# Stands in for EnSight: records its argv, serves echo on the VNC port it was given.
import json, re, runpy, sys
from pathlib import Path
Path(__file__).with_name("argv.json").write_text(json.dumps(sys.argv[1:]))
port = re.search(r"rfb_port=(\\d+)", " ".join(sys.argv)).group(1)
sys.argv = ["echo_server.py", port]
runpy.run_path({str(EXAMPLES / "echo_server.py")!r}, run_name="__main__")
"""


def install(root: Path, app: str) -> Path:
    binary = root / "bin" / app
    binary.parent.mkdir(parents=True)
    binary.write_text(FAKE_APP)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


async def echo_once(url: str) -> bytes:
    async with websockets.connect(url) as ws:
        await ws.send(b"vnc?")
        return await asyncio.wait_for(recv_bytes(ws), 20)


def test_ensight_launched_with_the_original_command(start_server: StartServer,
                                                    tmp_path: Path) -> None:
    binary = install(tmp_path, "ensight")
    server = start_server("--local_session", "ensight", "2", "--local_app_root", str(tmp_path))
    status, body = server.get_json("/v1/reserve/local_ensight?target_pathname=/data/car.case")
    assert status == 200
    assert asyncio.run(echo_once(server.ws_url(token=body["token"]))) == b"vnc?"
    argv = json.loads((binary.parent / "argv.json").read_text())
    assert argv[0] == "-batch" and argv[1] == "-vnc"
    assert argv[2].startswith("vnc://%3Frfb_port=") and argv[2].endswith("%26use_auth=0")
    assert argv[3] == "/data/car.case"
    wait_until(lambda: marked_processes(server) == [])


def test_command_template_replaces_the_application(start_server: StartServer) -> None:
    command = f"{sys.executable} {EXAMPLES / 'echo_server.py'} {{port}}"
    server = start_server("--local_session", "envision", "1", "--local_app_command", command)
    token = server.get_json("/v1/reserve/local_envision")[1]["token"]
    assert asyncio.run(echo_once(server.ws_url(token=token))) == b"vnc?"


@pytest.mark.parametrize("extra", [[], ["--local_app_root", "/nonexistent/ansys"]])
def test_missing_install_is_reported_on_activation(start_server: StartServer,
                                                   extra: list[str]) -> None:
    server = start_server("--local_session", "envision", "5", *extra,
                          env={"WEBSOCKETSERVER_APP_ROOT": "", "PYENSIGHT_ANSYS_INSTALLATION": ""})
    status, body = server.get_json("/v1/reserve/local_envision")  # the server started fine
    assert status == 200

    async def attempt() -> tuple[int, str]:
        async with websockets.connect(server.ws_url(token=body["token"])) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 20)
            return received_close(closed.value).code, received_close(closed.value).reason

    code, reason = asyncio.run(attempt())
    assert code == 1011 and "envision is not installed here" in reason
    assert server.get_json("/v1/status")[1][0]["instances"] == []
