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

In a cluster the server also renews a *lease* with its supervisor (:func:`renew_lease`,
over a pipe, several times a second). An instance whose event loop stalls (paused,
stuck) cannot end its own sessions before the cluster clears it and books its slots
again; so when the lease lapses the supervisor ends every process of those sessions
(every descendant but the server and its relays, :func:`spare`), once per lapse.

Slurm jobs are no descendants: a single server tells its supervisor how to cancel them
(:func:`on_death`), which it runs if the server dies by a signal or a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import psutil

MARKER = "WEBSOCKETSERVER_INSTANCE"
"""Environment variable set for every process a service instance starts."""

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_to_supervisor: int | None = None
"""In the supervised server process: the write end of the pipe to its supervisor."""


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


def renew_lease(seconds: float) -> None:
    """Tell the supervisor this server is alive: if it hears nothing more for ``seconds``,
    it ends the processes of the server's sessions. A no-op when not supervised."""
    _tell(f"L{seconds:g}\n")


def on_death(argv: list[str]) -> None:
    """Have the supervisor run ``argv`` if the server dies (a signal, a failure): the
    ``scancel`` of its Slurm jobs, which a killed server cannot run itself."""
    _tell("C" + json.dumps(argv) + "\n")


def spare(pids: Iterable[int]) -> None:
    """Processes of the server itself (relays) that a lapsed lease must not end."""
    _tell("".join(f"R{pid}\n" for pid in pids))


def _tell(message: str) -> None:
    if _to_supervisor is not None and message:
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(_to_supervisor, message.encode())


def run_supervised(serve: Callable[[], int]) -> int:
    """Run ``serve`` in a child process while this one reaps and cleans up after it.

    Returns the exit status for this process. Off Linux, ``serve`` runs in-process.
    """
    global _to_supervisor
    if sys.platform != "linux" or not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
        return serve()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        os.set_blocking(writer, False)
        _to_supervisor = writer
        die_with_parent()
        code = 1
        try:
            code = serve()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(writer)
    return _supervise(pid, reader)


class _Lease:
    """The server's lease as its supervisor hears it over the pipe."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.seconds: float | None = None  # None: no lease (not a cluster)
        self.renewed = time.monotonic()
        self.spared: set[int] = set()
        self.cleanup: list[str] | None = None  # run if the server dies (on_death)
        self.acted = False
        self._partial = b""

    def heard(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.startswith(b"L"):
                self.seconds, self.renewed, self.acted = float(line[1:]), time.monotonic(), False
            elif line.startswith(b"R"):
                self.spared.add(int(line[1:]))
            elif line.startswith(b"C"):
                self.cleanup = json.loads(line[1:])

    def timeout(self) -> float | None:
        """Seconds until the lease lapses (None: no lease, or it was acted on)."""
        if self.seconds is None or self.acted:
            return None
        return max(0.0, self.renewed + self.seconds - time.monotonic())

    def lapsed(self) -> None:
        """End every session's processes (all but the server and its relays)."""
        self.acted = True
        print(f"websocketserver supervisor: the server (pid {self.server_pid}) did not "
              f"renew its cluster lease for {self.seconds:g} s; ending its sessions' "
              "processes", file=sys.stderr, flush=True)
        with contextlib.suppress(psutil.Error):
            sessions = [p for p in psutil.Process().children(recursive=True)
                        if p.pid != self.server_pid and p.pid not in self.spared]
            # a sixth of the lease (a quarter TTL) to stop: the cluster may clear the
            # instance from 2 x TTL on
            terminate(sessions, grace=(self.seconds or 0) / 6)


def _supervise(server_pid: int, reader: int) -> int:
    """Forward stop signals to the server, reap everything, clean up when it ends; end
    the sessions' processes if the server's lease lapses."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server_pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    woken, wake = os.pipe()  # SIGCHLD wakes the select() below
    os.set_blocking(woken, False)
    os.set_blocking(wake, False)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    signal.set_wakeup_fd(wake)
    lease = _Lease(server_pid)
    watched = [woken, reader]
    while True:
        status = _reap(server_pid)  # after the SIGCHLD handler is set: none is missed
        if status is not None:
            if reader in watched:  # what the server said last
                os.set_blocking(reader, False)
                with contextlib.suppress(OSError):
                    while data := os.read(reader, 4096):
                        lease.heard(data)
            if status != 0 and lease.cleanup:
                _clean_up(lease.cleanup)
            return status
        ready, _, _ = select.select(watched, [], [], lease.timeout())
        if woken in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(woken, 4096)
        if reader in ready:
            data = os.read(reader, 4096)
            if data:
                lease.heard(data)
            else:  # the server and its relays closed it: only reaping is left
                watched.remove(reader)
        timeout = lease.timeout()
        if timeout is not None and timeout <= 0:
            lease.lapsed()


def _clean_up(argv: list[str]) -> None:
    print(f"websocketserver supervisor: the server died; running {argv[0]}",
          file=sys.stderr, flush=True)
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"websocketserver supervisor: {argv[0]} failed: {exc}", file=sys.stderr,
              flush=True)


def _reap(server_pid: int) -> int | None:
    """Reap the children that ended; once the server has, end what is left and return
    its exit status."""
    while True:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 1
        if pid == 0:
            return None
        if pid == server_pid:
            status = os.waitstatus_to_exitcode(wait_status)
            end_descendants()
            _reap_all()
            return 128 - status if status < 0 else status
def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
