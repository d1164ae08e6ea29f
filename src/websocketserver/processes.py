"""No orphans: every process the server starts is gone when its owner is done.

Two mechanisms, both Linux-first (elsewhere the server still runs, with the
per-instance tree kill only):

* :func:`run_supervised` forks the server from a small supervisor that is a *child
  subreaper*: whatever a service script starts, even a daemon that double-forks
  away from its parent, is re-parented to the supervisor instead of init. When the
  server process ends (cleanly, by signal or by crash) the supervisor ends every
  descendant that is left and reaps them all, then exits with the server's status.
* :func:`kill_instance` ends one service instance: its process tree, plus any
  process that carries the instance's marker in its environment (daemons inherit
  it even after they have left the tree).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable

import psutil

MARKER = "WEBSOCKETSERVER_INSTANCE"
"""Environment variable set for every process a service instance starts."""

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent exits (Linux)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(processes: Iterable[psutil.Process], grace: float = 3.0) -> None:
    """SIGTERM each process, wait up to ``grace`` seconds, then SIGKILL what is left."""
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
            alive.append(proc)
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def marked(marker: str) -> list[psutil.Process]:
    """Processes of this user whose environment carries ``MARKER=marker``."""
    found = []
    uid = os.getuid()
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_instance(root_pid: int | None, marker: str, grace: float = 3.0) -> None:
    """End a service instance: the tree under ``root_pid`` and every marked process."""
    procs: dict[int, psutil.Process] = {}
    if root_pid is not None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(root_pid)
            procs[root.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
    for proc in marked(marker):
        procs.setdefault(proc.pid, proc)
    procs.pop(os.getpid(), None)
    terminate(procs.values(), grace)


def end_descendants(grace: float = 3.0) -> None:
    """End every process below this one (used at exit, after services are stopped)."""
    with contextlib.suppress(psutil.Error):
        terminate(psutil.Process().children(recursive=True), grace)


def run_supervised(serve: Callable[[], int]) -> int:
    """Run ``serve`` in a child process while this one reaps and cleans up after it.

    Returns the exit status for this process. Off Linux, ``serve`` runs in-process.
    """
    if sys.platform != "linux" or not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
        return serve()
    pid = os.fork()
    if pid == 0:
        die_with_parent()
        code = 1
        try:
            code = serve()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return _supervise(pid)


def _supervise(server_pid: int) -> int:
    """Forward stop signals to the server, reap everything, clean up when it ends."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server_pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status = 1
    while True:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == server_pid:
            status = os.waitstatus_to_exitcode(wait_status)
            status = 128 - status if status < 0 else status
            end_descendants()
            _reap_all()
            break
    return status


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
