"""Service scripts: loading, sync/async calls, and the command helper."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from support import EXAMPLES, wait_until
from websocketserver.scripts import (
    CommandService,
    RemoteServiceScript,
    call,
    free_port,
    listening,
    load_script,
)
from websocketserver.settings import ServiceConfig, SettingsError


def config(tmp_path: Path, source: str | None,
           options: dict[str, Any] | None = None) -> ServiceConfig:
    script = tmp_path / "svc.py"
    if source is not None:
        script.write_text(source)
    return ServiceConfig(name="svc", script=script, count=1, options=options or {})


def test_loads_the_one_subclass_with_common_options(tmp_path: Path) -> None:
    source = ("from websocketserver import RemoteServiceScript\n"
              "class Mine(RemoteServiceScript):\n    pass\n")
    script = load_script(config(tmp_path, source, {"sizes": ["800x600"]}))
    assert type(script).__name__ == "Mine" and isinstance(script, RemoteServiceScript)
    assert script._common_options == {"sizes": ["800x600"]}


@pytest.mark.parametrize("source, message", [
    (None, "file not found"),
    ("def broken(:\n", "import failed: SyntaxError"),
    ("raise ValueError('nope')\n", "import failed: ValueError: nope"),
    ("x = 1\n", "exactly one RemoteServiceScript subclass (found none)"),
    ("from websocketserver import RemoteServiceScript as R\n"
     "class A(R): pass\nclass B(R): pass\n", "(found A, B)"),
    ("from websocketserver import RemoteServiceScript as R\n"
     "class A(R):\n    def __init__(self, o):\n        raise KeyError('k')\n",
     "A() failed: KeyError"),
])
def test_script_errors_name_service_and_script(tmp_path: Path, source: str | None,
                                               message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_script(config(tmp_path, source))
    text = str(error.value)
    assert text.startswith("service 'svc': script ") and message in text
    assert "\n" not in text


async def test_call_runs_plain_methods_off_the_loop_and_awaits_async_ones() -> None:
    loop_thread = threading.get_ident()

    def plain(x: int) -> tuple[int, int]:
        return x * 2, threading.get_ident()

    async def coroutine(x: int) -> int:
        return x + 1

    def failing() -> None:
        raise OSError("bad")

    result, thread = await call(plain, 21)
    assert result == 42 and thread != loop_thread
    assert await call(coroutine, 1) == 2
    with pytest.raises(OSError, match="bad"):
        await call(failing)


class Echo(CommandService):
    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        return [sys.executable, str(EXAMPLES / "echo_server.py"), str(port)]


class Fails(CommandService):
    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        return [sys.executable, "-c", "import sys; sys.exit(3)"]


async def test_command_service_starts_listening_and_stops_tree() -> None:
    service = Echo({})
    host, port = await call(service.start, 0, {})
    assert host == "127.0.0.1" and listening(port)
    proc, _, _ = service._running[0]
    await call(service.stop, 0)
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"
    assert not listening(port)


async def test_command_that_exits_early_is_a_start_error() -> None:
    with pytest.raises(RuntimeError, match="exited with status 3 before it listened"):
        await call(Fails({}).start, 0, {})


class Silent(CommandService):
    """Runs, never listens: its start() waits for the port until stopped."""

    start_timeout = 30.0

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


class Daemonizes(CommandService):
    """Its launcher exits 0 at once; the child it forked listens half a second later."""

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        return [sys.executable, "-c",
                "import os, sys, time\n"
                "if os.fork(): sys.exit(0)\n"
                "time.sleep(0.5)\n"
                "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n",
                str(EXAMPLES / "echo_server.py"), str(port)]


async def test_stop_during_start_ends_the_start_at_once() -> None:
    """Stopping reaps the launched process through psutil, so Popen reads its status
    as 0: the start took that for a launcher that daemonized and waited its whole
    start_timeout, holding the slot."""
    service = Silent({})
    start = asyncio.ensure_future(call(service.start, 0, {}))
    await asyncio.to_thread(wait_until, lambda: 0 in service._running)
    began = time.monotonic()
    await call(service.stop, 0)
    with pytest.raises(RuntimeError, match="stopped before it listened"):
        await asyncio.wait_for(start, 5)
    assert time.monotonic() - began < 5


class SlowToLaunch(Silent):
    """Its command line takes until ``go`` is set: a stop can come before the launch."""

    def __init__(self, common_options: dict[str, Any]) -> None:
        super().__init__(common_options)
        self.asked, self.go = threading.Event(), threading.Event()

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        self.asked.set()
        self.go.wait(10)
        return super().command(index, options, port)


async def test_a_stop_before_the_launch_ends_the_start_once_launched() -> None:
    """A release that came while the program was being launched found nothing to stop,
    and the start then waited its whole start_timeout (CI saw the slot held)."""
    service = SlowToLaunch({})
    start = asyncio.ensure_future(call(service.start, 0, {}))
    await asyncio.to_thread(service.asked.wait, 10)
    await call(service.stop, 0)  # nothing launched yet
    began = time.monotonic()
    service.go.set()
    with pytest.raises(RuntimeError, match="stopped before it listened"):
        await asyncio.wait_for(start, 5)
    assert time.monotonic() - began < 5 and 0 not in service._running


async def test_a_launcher_that_daemonizes_starts_and_lives_on() -> None:
    """Status 0 before the port listens is still a launcher that daemonized: waited
    for; alive() sees its daemon by the marker, and not once it is stopped."""
    service = Daemonizes({})
    host, port = await call(service.start, 0, {})
    proc, _, _ = service._running[0]
    assert listening(port) and proc.poll() == 0
    assert await call(service.alive, 0) is True
    await call(service.stop, 0)
    assert not listening(port) and await call(service.alive, 0) is False


async def test_alive_is_false_once_the_instance_died() -> None:
    service = Echo({})
    _, port = await call(service.start, 0, {})
    assert await call(service.alive, 0) is True
    proc, _, _ = service._running[0]
    proc.kill()
    await asyncio.to_thread(proc.wait)
    assert await call(service.alive, 0) is False
    await call(service.stop, 0)
    assert await call(service.alive, 1) is False  # never started


def test_free_port_is_free() -> None:
    port = free_port()
    assert not listening(port)


async def test_hung_plain_method_does_not_block_the_loop() -> None:
    release = threading.Event()
    task = asyncio.ensure_future(call(release.wait))
    await asyncio.sleep(0.05)
    assert not task.done()
    release.set()
    assert await asyncio.wait_for(task, 5) is True
