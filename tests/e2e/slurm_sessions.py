"""What the Slurm session tests share: a service config whose command runs as a job of
the real cluster of ``slurm_support``, and a server started against that cluster."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import websockets
from slurm_support import LICENSE, SlurmCluster, marked
from websockets.frames import Close

from support import ServerProcess, StartServer, received_close, recv_bytes, wait_until

# An echo server on the port the launcher gives it; every process of a job carries the
# server's WSTEST_MARK (sbatch passes the server's environment on to the job).
ECHO = """import socket, sys
server = socket.create_server(("", int(sys.argv[1])))
print("echo server on port", sys.argv[1], flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
"""


def write_config(folder: Path, slurm: SlurmCluster, *, start: str = "reserve",
                 count: int = 2, sbatch: tuple[str, ...] = (),
                 user_prefix: tuple[str, ...] = (), **more: Any) -> Path:
    """A service ``viz`` whose every job needs the one ``ensight`` licence."""
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    (folder / "echo.py").write_text(ECHO)
    config = folder / "services.json"
    jobs = slurm.directory / "jobs"
    config.write_text(json.dumps({"viz": {
        "command": ["python3", str(folder / "echo.py"), "{port}"], "count": count,
        "slurm": {"sbatch": [f"--licenses={LICENSE}:1", f"--output={jobs}/%j.out",
                             *sbatch], **({"user_prefix": user_prefix} if user_prefix else {})},
        "start": start, **more}}))
    return config


def start(start_server: StartServer, slurm: SlurmCluster, config: Path,
          *args: str, **kwargs: Any) -> tuple[ServerProcess, str]:
    """A server for ``config`` on the cluster (``kwargs`` for ServerProcess.start); its
    jobs' mark."""
    mark = uuid.uuid4().hex
    server = start_server("--remote_session_config", str(config), *args,
                          env={**slurm.env, "WSTEST_MARK": mark}, **kwargs)
    return server, mark


def instance(server: ServerProcess, token: str) -> dict[str, Any]:
    """The token's instance in /v1/status."""
    status, services = server.get_json("/v1/status")
    assert status == 200
    for service in services:
        for found in service["instances"]:
            if found["token"] == token:
                return dict(found)
    raise AssertionError(f"no instance with the token in {services}")


def wait_state(server: ServerProcess, token: str, state: str,
               timeout: float = 20.0) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(instance(server, token))
        return bool(found["state"] == state)
    wait_until(reached, timeout)
    return found


def reserve(server: ServerProcess) -> str:
    status, body = server.get_json("/v1/reserve/viz")
    assert status == 200, body
    return str(body["token"])


async def echo(server: ServerProcess, token: str, payload: bytes = b"ping") -> bytes:
    async with websockets.connect(server.ws_url(token=token), open_timeout=30) as ws:
        await ws.send(payload)
        return bytes(await asyncio.wait_for(recv_bytes(ws), 30))


async def echo_and_release(server: ServerProcess, token: str, payload: bytes) -> tuple[bytes, int]:
    """``payload``'s echo through the token's websocket, and the status of the token's
    release through ``server`` while that websocket is open (its close would end the
    session by itself, racing with a release after it)."""
    async with websockets.connect(server.ws_url(token=token), open_timeout=30) as ws:
        await ws.send(payload)
        reply = bytes(await asyncio.wait_for(recv_bytes(ws), 30))
        status, _ = await asyncio.to_thread(server.get_json, f"/v1/release/{token}")
        return reply, status


def job_processes(server: ServerProcess, mark: str) -> set[int]:
    """The live processes of the server's jobs (marked, but not the server's own)."""
    own = {server.pid, *(p.pid for p in server.descendants())}
    return {p.pid for p in marked(mark)} - own


def wait_no_job_process(server: ServerProcess, mark: str, timeout: float = 15) -> None:
    wait_until(lambda: not job_processes(server, mark), timeout)



def closed_by_the_job(server: ServerProcess, token: str, act: Callable[[str], object],
                      timeout: float) -> tuple[str, Close, float]:
    """Open ``token``'s websocket, echo through it, ``act(job_id)``, and wait at most
    ``timeout`` seconds for the server to close it: the job's id, the close frame, and
    the seconds from ``act`` to the close."""
    async def scenario() -> tuple[str, Close, float]:
        async with websockets.connect(server.ws_url(token=token), open_timeout=30) as ws:
            await ws.send(b"x")
            assert await asyncio.wait_for(recv_bytes(ws), 30) == b"x"
            job_id = instance(server, token)["job_id"]
            began = time.monotonic()
            act(job_id)
            try:
                await asyncio.wait_for(ws.recv(), timeout)
            except websockets.ConnectionClosed as closed:
                return job_id, received_close(closed), time.monotonic() - began
            raise AssertionError("a message where the close was due")
    return asyncio.run(scenario())
