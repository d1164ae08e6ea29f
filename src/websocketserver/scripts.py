"""Service scripts: the public plugin API, loading scripts, and the command helper.

A service script is a Python file defining one subclass of
:class:`RemoteServiceScript`. The server creates one object per service type and
calls ``start(index, options)`` when a reserved websocket arrives and
``stop(index)`` when it goes. This API is the original server's and user scripts
depend on it, so it stays as it is; what was added since (``alive``) is optional.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import logging
import os
import shlex
import shutil
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Any

import psutil

from . import processes
from .core.vnc_auth import new_password, vncpasswd_file
from .settings import ServiceConfig, SettingsError, command_values

OUTPUT_LINE_LIMIT = 4096
"""Most bytes of one line of a service's output put in the log; the rest is counted."""

output_log = logging.getLogger("websocketserver.output")
output_log.setLevel(logging.INFO)  # what services print is shown at every --verbose


class RemoteServiceScript:
    """Base class of service scripts.

    ``start`` and ``stop`` may be plain or ``async def``; plain ones run in a worker
    thread so that a slow launch does not stall other users' tunnels.
    """

    def __init__(self, common_options: dict[str, Any]) -> None:
        self._common_options = common_options

    def start(self, index: int,
              options: dict[str, Any]) -> tuple[str, int] | tuple[str, int, str]:
        """Start instance ``index``; return (host, port) of a socket that listens, and
        for a VNC server that asks for a password (``"protocol": "rfb"``) that
        password: the proxy logs in with it for every browser."""
        raise NotImplementedError

    def stop(self, index: int) -> None:
        """Stop instance ``index`` and everything it started."""
        raise NotImplementedError

    def alive(self, index: int) -> bool:
        """Whether instance ``index``, detached (reconnect grace), still runs: asked
        before a websocket re-attaches to it, so that a port another process took
        after the instance died is not connected to. Optional: this default trusts
        the address ``start`` returned, as before."""
        return True


async def call(method: Any, *args: Any) -> Any:
    """Call a script method, sync or async, without blocking the event loop.

    A plain method runs in a daemon thread of its own rather than the loop's
    executor: a script that hangs for ever must not keep the server from exiting.
    """
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def work() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (method(*args), None)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop may be gone by now
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name=f"script-{getattr(method, '__name__', 'call')}",
                     daemon=True).start()
    result = await future
    if inspect.isawaitable(result):
        return await result
    return result


def load_script(service: ServiceConfig) -> RemoteServiceScript:
    """Import ``service.script`` and instantiate its one RemoteServiceScript subclass."""
    assert service.script is not None
    where = f"service {service.name!r}: script {str(service.script)!r}"
    if not service.script.is_file():
        raise SettingsError(f"{where}: file not found")
    module_name = f"websocketserver_script_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(module_name, service.script)
    if spec is None or spec.loader is None:
        raise SettingsError(f"{where}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's script may raise anything at import
        sys.modules.pop(module_name, None)
        raise SettingsError(f"{where}: import failed: {type(exc).__name__}: {exc}") from None
    classes = [
        value for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, RemoteServiceScript)
        and value.__module__ == module_name
    ]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise SettingsError(
            f"{where}: must define exactly one RemoteServiceScript subclass (found {found})")
    try:
        return classes[0](dict(service.options))
    except Exception as exc:
        raise SettingsError(
            f"{where}: {classes[0].__name__}() failed: {type(exc).__name__}: {exc}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class CommandService(RemoteServiceScript):
    """Helper for the common case: run a command on a free port and wait until it listens.

    Subclasses implement :meth:`command`. Each instance runs in its own session with
    ``WEBSOCKETSERVER_INSTANCE`` in its environment; :meth:`stop` ends its whole
    process tree, daemons that double-forked away included.
    """

    host = "127.0.0.1"
    start_timeout = 60.0
    service_name = "service"
    """The service's name in the config, set by the server; its output is logged as
    ``service_name[index]: line``."""

    def __init__(self, common_options: dict[str, Any]) -> None:
        super().__init__(common_options)
        self._running: dict[int, tuple[subprocess.Popen[bytes], str, threading.Event]] = {}
        self._readers: dict[int, threading.Thread] = {}
        self._launching: dict[int, threading.Event] = {}  # a start() before its entry
        self._lock = threading.Lock()  # start() and stop() run in threads of their own
        self._passwords: dict[int, tuple[str, Path]] = {}  # index -> password, its folder

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str] | str:
        """The command line of instance ``index``, listening on ``port``."""
        raise NotImplementedError

    def environment(self, index: int, options: dict[str, Any]) -> dict[str, str]:
        """Extra environment variables for instance ``index``."""
        return {}

    def vnc_password(self, index: int) -> str:
        """A new random VNC password of instance ``index`` (for :meth:`command`): the
        server logs in to the VNC server with it for every browser (``"protocol":
        "rfb"``), so no page or URL holds it. On a command line every local user can
        read it: prefer :meth:`vnc_password_file`."""
        with self._lock:
            password, folder = self._passwords.get(index) or (
                new_password(), Path(tempfile.mkdtemp(prefix="websocketserver-vnc-")))
            self._passwords[index] = (password, folder)
        return password

    def vnc_password_file(self, index: int) -> str:
        """A file holding instance ``index``'s :meth:`vnc_password` as ``vncpasswd``
        writes it (``x11vnc -rfbauth FILE``), readable by this user only; removed when
        the instance stops."""
        password = self.vnc_password(index)
        path = self._passwords[index][1] / "passwd"
        path.touch(mode=0o600)
        path.write_bytes(vncpasswd_file(password))
        return str(path)

    def working_directory(self) -> Path | None:
        """Where instances run (None: the server's working directory).

        The folder of the file that defines the subclass, so that a relative path in
        its command line (``[sys.executable, "echo_server.py", ...]``) means a file
        beside the script, wherever the server was started.
        """
        return defining_folder(self)

    def start(self, index: int,
              options: dict[str, Any]) -> tuple[str, int] | tuple[str, int, str]:
        stopped = threading.Event()
        with self._lock:  # a stop() from now on reaches this start
            self._launching[index] = stopped
        try:
            return self._start(index, options, stopped)
        finally:
            with self._lock:
                self._launching.pop(index, None)

    def _start(self, index: int, options: dict[str, Any],
               stopped: threading.Event) -> tuple[str, int] | tuple[str, int, str]:
        port = free_port(self.host)
        argv = self.command(index, options, port)
        if isinstance(argv, str):
            argv = shlex.split(argv)
        marker = f"{os.getpid()}-{uuid.uuid4().hex}"
        env = {**os.environ, **self.environment(index, options), processes.MARKER: marker}
        try:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=self.working_directory(), start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        assert proc.stdout is not None
        reader = self._readers[index] = threading.Thread(
            target=log_output, args=(proc.stdout, f"{self.service_name}[{index}]"),
            name=f"output-{self.service_name}[{index}]", daemon=True)
        reader.start()
        with self._lock:
            self._running[index] = (proc, marker, stopped)
        try:
            wait_listening(port, self.start_timeout, proc, stopped)
        except BaseException:
            self.stop(index)
            raise
        if index in self._passwords:  # the server logs in with it
            return self.host, port, self._passwords[index][0]
        return self.host, port

    def stop(self, index: int) -> None:
        with self._lock:
            entry = self._running.pop(index, None)
            launching = self._launching.get(index)
            secret = self._passwords.pop(index, None)
        if secret is not None:  # its VNC password's file: gone with it, started or not
            shutil.rmtree(secret[1], ignore_errors=True)
        if entry is None:
            if launching is not None:  # not launched yet: the start gives up once it is
                launching.set()
            return
        proc, marker, stopped = entry
        stopped.set()  # a start() still waiting for the port gives up now
        # a pid that poll() reaped may belong to another process by now: the marker
        # finds what the instance left
        processes.kill_instance(proc.pid if proc.poll() is None else None, marker)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        reader = self._readers.pop(index, None)
        if reader is not None:  # its last lines come before the instance is reported free
            reader.join(timeout=1)

    def alive(self, index: int) -> bool:
        """The launched process runs, or a process carrying the instance's marker does
        (a launcher that daemonized). The launched process is the server's child and
        ``poll`` is what reaps it, so its pid cannot have been reused before ``poll``
        sees it end; the marker is the instance's own."""
        entry = self._running.get(index)
        if entry is None:
            return False
        proc, marker, _ = entry
        return proc.poll() is None or bool(processes.marked(marker))


class ConfiguredCommand(CommandService):
    """A ``"command"`` service of ``--remote_session_config``: its command line with
    ``{port}``, ``{index}`` and option values substituted, no Python needed.

    ``{NAME}`` is the service's option NAME, or the reservation's value for it
    (``/v1/reserve/SERVICE?NAME=value``); a reservation's other options are not used,
    and ``{port}`` and ``{index}`` are always the server's. Each value goes into one
    argument, never through a shell. Instances run in the config file's folder.
    """

    def __init__(self, service: ServiceConfig, start_timeout: float) -> None:
        super().__init__(dict(service.options))
        assert service.command is not None
        self._template = service.command
        self._directory = service.directory
        self.start_timeout = start_timeout

    def command(self, index: int, options: dict[str, Any], port: int) -> list[str]:
        values = command_values(self._common_options)
        values.update({key: str(value) for key, value in options.items() if key in values})
        values.update(port=str(port), index=str(index))
        text = " ".join(self._template)
        if "{vnc_password}" in text:
            values["vnc_password"] = self.vnc_password(index)
        if "{vnc_password_file}" in text:
            values["vnc_password_file"] = self.vnc_password_file(index)
        return [substitute(argument, values) for argument in self._template]

    def working_directory(self) -> Path | None:
        return self._directory


def defining_folder(script: object) -> Path | None:
    """The folder of the file that defines ``script``'s class (None: no such file)."""
    try:
        return Path(inspect.getfile(type(script))).resolve().parent
    except (TypeError, OSError):  # defined where no file is (an interactive session)
        return None


def substitute(argument: str, values: dict[str, str]) -> str:
    """``argument`` with each ``{name}`` replaced by ``values[name]`` (checked at start-up
    by :func:`~.settings.placeholders`) and ``{{``/``}}`` made single braces."""
    return "".join(literal + (values[name] if name is not None else "")
                   for literal, name, _, _ in string.Formatter().parse(argument))


def log_output(stream: IO[bytes], label: str) -> None:
    """Log each line a service prints as ``label: line`` until its output closes.

    Runs in a thread of its own, so the service never blocks on a full pipe for long
    and the event loop never waits; a line over OUTPUT_LINE_LIMIT bytes is logged cut,
    with the number of bytes left out.
    """
    with stream:
        for line in iter(lambda: stream.readline(OUTPUT_LINE_LIMIT), b""):
            cut = 0
            rest = line
            while not rest.endswith(b"\n") and len(rest) == OUTPUT_LINE_LIMIT:
                rest = stream.readline(OUTPUT_LINE_LIMIT)
                cut += len(rest.rstrip(b"\r\n"))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            output_log.info("%s: %s%s", label, text, f" [{cut} more bytes]" if cut else "")


def listening(port: int) -> bool:
    """Whether some socket on this machine listens on TCP ``port``.

    Read from the kernel's socket table rather than by connecting, because some
    servers (``x11vnc -once``, for one) serve only their first client.
    """
    return any(
        conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
        for conn in psutil.net_connections(kind="tcp")
    )


def wait_listening(port: int, timeout: float,
                   proc: subprocess.Popen[bytes] | None = None,
                   stopped: threading.Event | None = None) -> None:
    """Block until TCP ``port`` listens; raise if ``proc`` exits first, ``stopped`` is
    set or time runs out.

    ``stopped`` is what tells a stop during the start: stopping reaps ``proc``
    through psutil, and ``Popen`` then reads the vanished child as status 0.
    """
    deadline = time.monotonic() + timeout
    while not listening(port):
        if stopped is not None and stopped.is_set():
            raise RuntimeError("service stopped before it listened")
        # Status 0 may be a launcher that daemonized: keep waiting for the port.
        if proc is not None and proc.poll() not in (None, 0):
            raise RuntimeError(f"service process exited with status {proc.returncode} "
                               "before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"service did not listen on port {port} within {timeout:g} s")
        time.sleep(0.1)
