"""sessions/job_launcher.py: its reports' signatures, and the launcher in a real Slurm job.

The launcher runs where nothing of ours is installed, so it imports the standard
library only. In a job (tests/slurm_support.py's cluster) it runs a command on a port
it picks, reports that port signed to an HTTP receiver here, and ends everything it
started (a daemon that double-forked away included) when the job is cancelled or no
server answers. Every wait is a bounded poll.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import hmac
import http.server
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("slurm_support")  # before it is imported: its asserts too
from slurm_support import SlurmCluster, marked, wait_gone  # noqa: E402

from websocketserver.sessions import job_launcher  # noqa: E402
from websocketserver.sessions.job import verify_report  # noqa: E402
from websocketserver.sessions.job_launcher import HEADER, Report, make_report  # noqa: E402
from websocketserver.sessions.slurm import Slurm  # noqa: E402

pytest_plugins = ["slurm_support"]

LAUNCHER = Path(job_launcher.__file__)
SECRET = b"the job's secret"
NOW = 1_800_000_000.0
WAIT = 10.0

# The command the launcher runs: an echo server on the port it is given. "daemon"
# forks a daemon (double fork, new session) that sleeps; "daemonize" makes the echo
# server itself the daemon, and the command exits 0 at once.
COMMAND = r'''
import os, socket, sys, time

def daemon():
    if os.fork():
        return False
    os.setsid()
    if os.fork():
        os._exit(0)
    return True

def echo(port):
    server = socket.create_server(("", port))
    while True:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

port, mode = int(sys.argv[1]), sys.argv[2]
if mode == "daemon":
    if daemon():
        time.sleep(600)
        os._exit(0)
    os.wait()
    echo(port)
elif mode == "daemonize":
    if daemon():
        echo(port)
    os.wait()
elif mode == "fail":
    sys.exit(3)
'''


# -- signatures ------------------------------------------------------------------------


def test_the_launcher_imports_the_standard_library_only() -> None:
    tree = ast.parse(LAUNCHER.read_text())
    imported = {alias.name.partition(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").partition(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


def test_a_signed_report_verifies() -> None:
    report = Report(job_id="42", host="node1", port=5901, time=NOW)
    body, header = make_report(SECRET, report)
    assert verify_report(SECRET, body, header, NOW + 5, max_age=30) == report
    assert verify_report(SECRET, body, header, NOW + 30, max_age=30) == report  # a replay
    assert verify_report(SECRET, body, header, NOW - 9, max_age=30) == report  # clock skew


def test_forged_tampered_and_replayed_reports_are_refused() -> None:
    report = Report(job_id="42", host="node1", port=5901, time=NOW)
    body, header = make_report(SECRET, report)
    stamp, mac = header.split()
    assert verify_report(b"another job's secret", body, header, NOW, 30) is None
    forged = make_report(b"guess", Report("42", "node1", 22, NOW))
    assert verify_report(SECRET, *forged, NOW, 30) is None
    tampered = body.replace(b"5901", b"22")
    assert verify_report(SECRET, tampered, header, NOW, 30) is None
    assert verify_report(SECRET, body, f"{NOW + 1!r} {mac}", NOW, 30) is None  # new time
    assert verify_report(SECRET, body, stamp, NOW, 30) is None  # no signature
    assert verify_report(SECRET, body, "", NOW, 30) is None
    assert verify_report(SECRET, body, f"{stamp} {mac[:-1]}\u00e9", NOW, 30) is None
    assert verify_report(SECRET, body, f"{stamp}\udcff {mac}", NOW, 30) is None
    assert verify_report(SECRET, body, header, NOW + 30.5, 30) is None  # too old
    assert verify_report(SECRET, body, header, NOW - 11, 30) is None  # from the future


def test_a_signed_body_that_is_no_report_is_refused() -> None:
    def signed(data: object, stamp: str = repr(NOW)) -> tuple[bytes, str]:
        body = json.dumps(data).encode()
        mac = hmac.new(SECRET, stamp.encode() + b"\n" + body, hashlib.sha256).hexdigest()
        return body, f"{stamp} {mac}"
    good = {"job_id": "1", "host": "n", "port": 80, "time": NOW}
    assert verify_report(SECRET, *signed(good), NOW, 30) is not None
    with_output = {**good, "port": 0, "output": ["a line", ""]}
    assert verify_report(SECRET, *signed(with_output), NOW, 30) == Report(
        "1", "n", 0, NOW, ("a line", ""))
    for bad_output in ("a line", [1], {"a": "b"}, None):
        assert verify_report(SECRET, *signed({**good, "output": bad_output}), NOW, 30) is None
    for bad in ([good], {**good, "port": "80"}, {**good, "port": -1}, {**good, "port": True},
                {**good, "host": ""}, {**good, "extra": 1}, {**good, "time": NOW - 1},
                {k: v for k, v in good.items() if k != "job_id"}):
        assert verify_report(SECRET, *signed(bad), NOW, 30) is None, bad
    assert verify_report(SECRET, *signed(good, "soon"), NOW, 30) is None
    assert verify_report(SECRET, b"{", signed(good)[1], NOW, 30) is None


# -- the launcher, run -----------------------------------------------------------------


class Receiver:
    """The server's report channel, as far as a job sees it: verified reports queued."""

    def __init__(self, status: int = 200) -> None:
        self.reports: queue.Queue[Report] = queue.Queue()
        self.refused = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                report = verify_report(SECRET, body, self.headers.get(HEADER, ""),
                                       time.time(), 30)
                if report is None:
                    receiver.refused += 1
                else:
                    receiver.reports.put(report)
                self.send_response(status if report else 403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/job-report"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def report(self, timeout: float = WAIT) -> Report:
        return self.reports.get(timeout=timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.close()


def launcher_env(tmp_path: Path, receiver: Receiver, mark: str, mode: str,
                 **seconds: float) -> dict[str, str]:
    helper = tmp_path / "echo_command.py"
    helper.write_text(COMMAND)
    env = {"WEBSOCKETSERVER_JOB_COMMAND": json.dumps([sys.executable, str(helper),
                                                     "{port}", mode]),
           "WEBSOCKETSERVER_JOB_REPORT_URL": receiver.url,
           "WEBSOCKETSERVER_JOB_SECRET": SECRET.decode(),
           "WEBSOCKETSERVER_JOB_GRACE": "1", "WSTEST_MARK": mark}
    env.update({f"WEBSOCKETSERVER_JOB_{k.upper()}": str(v) for k, v in seconds.items()})
    return env




def echoes(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"ping")
        return conn.recv(4) == b"ping"


def assert_running(mark: str, mode: str) -> None:
    """The launcher, the echo server and (mode "daemon") the sleeping daemon run, the
    daemons re-parented to the launcher (its subreaper), not to init."""
    procs = marked(mark)
    launcher = [p for p in procs if str(LAUNCHER) in p.cmdline()]
    assert len(launcher) == 1, procs
    assert all(p.ppid() != 1 for p in procs), [(p, p.ppid()) for p in procs]
    assert len(procs) == {"daemon": 3, "daemonize": 2}[mode], procs
    # the command never sees the launcher's settings, the secret least of all
    assert all(not any(k.startswith("WEBSOCKETSERVER_JOB_") for k in p.environ())
               for p in procs if p not in launcher)


@pytest.mark.parametrize("mode", ["daemon", "daemonize"])
def test_sigterm_ends_the_whole_tree_daemons_included(
        tmp_path: Path, receiver: Receiver, mode: str) -> None:
    """Without Slurm (which would also kill what the job left): the launcher alone."""
    mark = uuid.uuid4().hex
    env = {**os.environ, **launcher_env(tmp_path, receiver, mark, mode)}
    proc = subprocess.Popen([sys.executable, str(LAUNCHER)], env=env, stderr=subprocess.PIPE)
    try:
        report = receiver.report()
        assert (report.job_id, report.host) == ("", socket.gethostname())
        assert echoes(report.port)
        assert_running(mark, mode)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
        wait_gone(mark, timeout=1)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    assert b"websocketserver job launcher: got SIGTERM: ending the job" in err, err


def test_a_server_that_wants_the_job_no_more_ends_it(tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    gone = Receiver(status=410)
    try:
        env = {**os.environ, **launcher_env(tmp_path, gone, mark, "daemon")}
        done = subprocess.run([sys.executable, str(LAUNCHER)], env=env, capture_output=True,
                              timeout=10)
    finally:
        gone.close()
    assert done.returncode == 0 and b"(410 Gone)" in done.stderr, done.stderr
    assert gone.reports.qsize() == 1
    wait_gone(mark, timeout=1)


def test_a_command_that_fails_ends_the_launcher_with_its_status(
        tmp_path: Path, receiver: Receiver) -> None:
    env = {**os.environ, **launcher_env(tmp_path, receiver, "-", "fail")}
    done = subprocess.run([sys.executable, str(LAUNCHER)], env=env, capture_output=True,
                          timeout=10)
    assert done.returncode == 3 and b"ended before it listened" in done.stderr
    assert receiver.reports.empty()


# -- in a Slurm job ----------------------------------------------------------------------


@pytest.fixture
def scheduler(slurm: SlurmCluster) -> Iterator[Slurm]:
    yield Slurm(env=slurm.env, timeout=10)
    slurm.cancel_all(timeout=WAIT)


async def submit(slurm: SlurmCluster, scheduler: Slurm, env: dict[str, str]) -> str:
    """A job whose script runs the launcher; its settings go through the environment."""
    jobs = slurm.directory / "jobs"
    return await scheduler.submit(f"#!/bin/sh\nexec {sys.executable} {LAUNCHER}\n",
                                  [f"--chdir={jobs}", f"--output={jobs}/%j.out"],
                                  name="wstest-launcher", env=env)


async def report_of(receiver: Receiver) -> Report:
    deadline = time.monotonic() + WAIT
    while True:
        with contextlib.suppress(queue.Empty):
            return receiver.reports.get_nowait()
        assert time.monotonic() < deadline, "no report"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["daemon", "daemonize"])
async def test_a_job_reports_its_port_and_cancel_ends_all_it_started(
        slurm: SlurmCluster, scheduler: Slurm, receiver: Receiver, tmp_path: Path,
        mode: str) -> None:
    mark = uuid.uuid4().hex
    job_id = await submit(slurm, scheduler, launcher_env(tmp_path, receiver, mark, mode))
    report = await report_of(receiver)
    assert (report.job_id, report.host) == (job_id, "node1")  # Slurm's name of the node
    assert abs(report.time - time.time()) < 5
    assert echoes(report.port)
    assert_running(mark, mode)
    output = slurm.directory / "jobs" / f"{job_id}.out"
    assert f"reported port {report.port}" in output.read_text()
    assert SECRET.decode() not in output.read_text()

    await scheduler.cancel(job_id)
    wait_gone(mark)
    assert receiver.refused == 0
    # the launcher heard scancel's SIGTERM itself (Slurm then kills what is left)
    text = output.read_text()
    assert "websocketserver job launcher: got SIGTERM: ending the job" in text, text


async def test_a_job_no_server_answers_ends_itself_and_all_it_started(
        slurm: SlurmCluster, scheduler: Slurm, receiver: Receiver, tmp_path: Path) -> None:
    mark = uuid.uuid4().hex
    job_id = await submit(slurm, scheduler, launcher_env(
        tmp_path, receiver, mark, "daemon", heartbeat=0.2, orphan_timeout=1.5))
    report = await report_of(receiver)
    assert echoes(report.port)
    receiver.close()  # the server is gone: heartbeats meet a closed port
    started = time.monotonic()
    wait_gone(mark, timeout=6)
    assert time.monotonic() - started > 1.0  # not before the orphan timeout
    output = slurm.directory / "jobs" / f"{job_id}.out"
    text = output.read_text()
    assert "no server answered for 1.5 s: ending the job" in text, text
    assert text.count("no answer from") == 1, text  # once per outage, not every retry
    state = await scheduler.state(job_id)
    assert state is not None and state.ended, state
