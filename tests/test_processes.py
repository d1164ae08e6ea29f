"""No orphans: instance kills by tree and marker, and the supervisor's final sweep."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil

from support import ROOT, wait_until
from websocketserver import processes

DAEMONIZE = textwrap.dedent("""
    import os, sys, time
    if os.fork(): sys.exit(0)
    os.setsid()
    if os.fork(): sys.exit(0)
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(600)
""")


def test_kill_instance_finds_a_daemon_by_its_marker(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    marker = f"test-marker-{uuid.uuid4().hex}"  # no other run's leftover shares it
    launcher = subprocess.Popen([sys.executable, "-c", DAEMONIZE, str(pidfile)],
                                env={processes.MARKER: marker}, start_new_session=True)
    launcher.wait(10)
    daemon_pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    try:
        # the middle process of the double fork may still be exiting (a busy machine)
        wait_until(lambda: [p.pid for p in processes.marked(marker)] == [daemon_pid])
        processes.kill_instance(launcher.pid, marker)
        wait_until(lambda: not psutil.pid_exists(daemon_pid)
                   or psutil.Process(daemon_pid).status() == psutil.STATUS_ZOMBIE)
        assert processes.marked(marker) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon_pid, signal.SIGKILL)  # a failed test leaves no daemon either


def test_terminate_escalates_to_kill() -> None:
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time\n"
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                 "print('ready', flush=True)\ntime.sleep(600)"],
                                stdout=subprocess.PIPE)
    assert stubborn.stdout is not None
    assert stubborn.stdout.readline() == b"ready\n"
    began = time.monotonic()
    processes.terminate([psutil.Process(stubborn.pid)], grace=0.5)
    assert not psutil.pid_exists(stubborn.pid)  # killed (and reaped) despite ignoring TERM
    assert time.monotonic() - began < 5


def test_supervisor_ends_daemons_and_returns_the_status(tmp_path: Path) -> None:
    """A served function that leaves a daemon behind: the supervisor ends it."""
    pidfile = tmp_path / "pid"
    program = textwrap.dedent(f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(ROOT / 'src')!r})
        from websocketserver import processes
        def serve():
            subprocess.run([sys.executable, "-c", {DAEMONIZE!r}, {str(pidfile)!r}])
            while True:
                try:
                    open({str(pidfile)!r}).read()
                    return 7
                except FileNotFoundError:
                    time.sleep(0.05)
        sys.exit(processes.run_supervised(serve))
    """)
    result = subprocess.run([sys.executable, "-c", program], timeout=30)
    assert result.returncode == 7
    daemon_pid = int(pidfile.read_text())
    wait_until(lambda: not psutil.pid_exists(daemon_pid)
               or psutil.Process(daemon_pid).status() == psutil.STATUS_ZOMBIE)
