"""The in-job launcher: runs a session's command inside a batch job and reports it.

Sent to compute nodes as the job script (``python3 -`` reads it); the nodes install
nothing of ours, so this one file uses Python's standard library only (a test checks).
The server imports it for the report's format (:func:`~.job.verify_report` checks it).

Configured by environment variables only, never by its command line (``ps`` and
``squeue`` show command lines to every user; a job's environment is its user's):
``WEBSOCKETSERVER_JOB_COMMAND`` (a JSON list; ``{port}`` becomes the port picked here,
``{{``/``}}`` single braces), ``..._REPORT_URL`` (the server's, no proxy used),
``..._SECRET`` (the job's HMAC key), and in seconds ``..._START_TIMEOUT`` (60: for the
command to listen), ``..._HEARTBEAT`` (30: between reports), ``..._ORPHAN_TIMEOUT``
(120: without any answer before it gives up), ``..._GRACE`` (3: SIGTERM to SIGKILL).

What it does, and why:

1. It becomes a *child subreaper* (Linux ``prctl``): a daemon that double-forks away
   from the command is re-parented to the launcher, not to init, so the launcher can
   find it (its descendants in ``/proc``) and end it with the rest.
2. It picks a free TCP port, substitutes ``{port}``, starts the command (without the
   variables above: the command never sees the secret) and waits until the port
   listens (the kernel's socket table, not a connection: some servers serve only
   their first client), at most the start timeout.
3. It POSTs a report ``{"job_id", "host", "port", "time"}`` (``SLURM_JOB_ID``, the
   node's name in Slurm, ``SLURMD_NODENAME``), signed with HMAC-SHA256 under the secret
   in the :data:`HEADER` header, and again every heartbeat, and with the lines the
   command printed (``"output"``; also copied to the job's output file). The server
   tunnels only to the node Slurm allocated, never to a host a report names. A failed
   post is retried every few seconds. No shared filesystem is needed.
4. It ends the whole tree it started (SIGTERM, the grace, SIGKILL; daemons included)
   and exits when: it gets SIGTERM, SIGINT or SIGHUP (``scancel``, the time limit);
   the command fails (a status other than 0) or it and all it started have exited (a
   command exiting 0 whose daemons still run is a launcher that daemonized: the job
   lives while they do); the server answers 410 Gone (it wants the job no more); or
   no server has answered for the orphan timeout (a server that died without
   cancelling its jobs leaves none running for longer than that).

Its own messages go to stderr (the job's output file) with the prefix :data:`PREFIX`.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import json
import os
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import IO, NoReturn

HEADER = "X-Websocketserver-Report"
"""The report's signature header: ``TIME SIGNATURE`` (the report's time as written in
the body, and the hex HMAC-SHA256 of ``TIME`` + newline + the body)."""
ENV = "WEBSOCKETSERVER_JOB_"
"""The prefix of the launcher's environment variables (removed from the command's)."""
PREFIX = "websocketserver job launcher: "
# The command's output for the reports: lines kept (older ones are counted), the longest
# line sent (the rest cut), characters (as JSON) per report, seconds between reports
# sent for output alone
OUTPUT_KEPT, OUTPUT_LINE, OUTPUT_PER_REPORT, OUTPUT_INTERVAL = 1000, 2000, 16384, 0.5
POST_TIMEOUT = 5.0
RETRY = 2.0
"""Seconds between posts while no server answers (or the heartbeat, if shorter)."""

_PR_SET_CHILD_SUBREAPER = 36
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


@dataclass(frozen=True)
class Report:
    """What a job says about itself: where its command listens (0: not yet), when it
    said so, and the lines its command printed since the last report."""

    job_id: str
    host: str
    port: int
    time: float
    output: tuple[str, ...] = ()


def sign(secret: bytes, body: bytes, stamp: str) -> str:
    """The header value for ``body`` sent at ``stamp`` (the time as in the body)."""
    return f"{stamp} {mac(secret, body, stamp).decode()}"


def mac(secret: bytes, body: bytes, stamp: str) -> bytes:
    """The hex HMAC-SHA256 of ``stamp``, a newline and ``body`` under ``secret``."""
    message = stamp.encode("utf-8", "replace") + b"\n" + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode()


def make_report(secret: bytes, report: Report) -> tuple[bytes, str]:
    """The body and :data:`HEADER` value of ``report``."""
    stamp = repr(float(report.time))
    fields = {"job_id": report.job_id, "host": report.host, "port": report.port,
              "time": float(stamp)}
    if report.output:
        fields["output"] = list(report.output)
    body = json.dumps(fields, sort_keys=True).encode()
    return body, sign(secret, body, stamp)


# -- the launcher, inside the job ---------------------------------------------------


class Stopped(BaseException):
    """A stop signal arrived: unwinds whatever the launcher waits for."""


def say(message: str) -> None:
    print(PREFIX + message, file=sys.stderr, flush=True)


def fail(message: str, status: int = 2) -> NoReturn:
    say(message)
    sys.exit(status)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(ENV + name)
    try:
        value = default if text is None else float(text)
    except ValueError:
        fail(f"{ENV}{name} is not a number of seconds: {text!r}")
    if not value > 0:
        fail(f"{ENV}{name} must be over 0")
    return value


def substitute(argument: str, port: int) -> str:
    """``argument`` with ``{port}`` replaced; ``{{``/``}}`` single braces."""
    out = []
    for literal, name, _, _ in string.Formatter().parse(argument):
        out.append(literal)
        if name is not None:
            if name != "port":
                fail(f"unknown placeholder {{{name}}} in the command")
            out.append(str(port))
    return "".join(out)


def free_port() -> int:
    """A TCP port free on every interface of this node right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    """Whether a socket on this node listens on TCP ``port`` (``/proc/net/tcp*``)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == _LISTEN and \
                            int(fields[1].rpartition(":")[2], 16) == port:
                        return True
        except OSError:
            continue
    return False


def descendants() -> list[int]:
    """The live (not zombie) processes below this one, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Launcher:
    """One job's command, its tree, and its reports."""

    def __init__(self) -> None:
        env = os.environ
        try:
            argv = json.loads(env.get(ENV + "COMMAND", ""))
        except ValueError:
            fail(f"{ENV}COMMAND is not JSON")
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv)):
            fail(f"{ENV}COMMAND is not a non-empty JSON list of strings")
        self.template: list[str] = argv
        self.url = env.get(ENV + "REPORT_URL", "")
        if not self.url.startswith(("http://", "https://")):
            fail(f"{ENV}REPORT_URL is not an http:// URL")
        self.secret = env.get(ENV + "SECRET", "").encode()
        if not self.secret:
            fail(f"{ENV}SECRET is not set")
        self.start_timeout = _seconds("START_TIMEOUT", 60.0)
        self.heartbeat = _seconds("HEARTBEAT", 30.0)
        self.orphan_timeout = _seconds("ORPHAN_TIMEOUT", 120.0)
        self.grace = _seconds("GRACE", 3.0)
        self.job_id = env.get("SLURM_JOB_ID", "")
        # the node's name as Slurm knows it (the server checks it against the job's
        # allocation); the hostname outside a job
        self.host = env.get("SLURMD_NODENAME") or socket.gethostname()
        self.pid = 0
        self.status: int | None = None  # the command's exit status, once reaped
        self.stopping = False
        self.unanswered = False
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.output: deque[str] = deque()
        self.lost = 0  # lines of output dropped since the last report
        self.lock = threading.Lock()
        self.output_sent = 0.0

    def run(self) -> int:
        """Start, report, watch; the exit status. The tree is ended by :meth:`main`."""
        port = free_port()
        argv = [substitute(argument, port) for argument in self.template]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV)}
        try:
            proc = subprocess.Popen(argv, env=child_env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as exc:
            say(f"cannot run {argv[0]}: {exc.strerror or exc}")
            return 127
        self.pid = proc.pid
        proc.returncode = 0  # reaped by waitpid(-1) below, never by Popen
        assert proc.stdout is not None
        threading.Thread(target=self.read_output, args=(proc.stdout,), daemon=True).start()
        say(f"job {self.job_id or '?'}: started {argv[0]} (pid {self.pid}) on "
            f"{self.host} port {port}")
        deadline = time.monotonic() + self.start_timeout
        while not listening(port):
            if (ended := self.ended()) is not None:
                say(f"the command ended before it listened on port {port}")
                self.send_output()
                return ended or 1
            if time.monotonic() > deadline:
                say(f"the command did not listen on port {port} within "
                    f"{self.start_timeout:g} s")
                self.send_output()
                return 1
            if self.post_output(0) == 410:
                say("the server wants this job no more (410 Gone)")
                return 0
            time.sleep(0.05)
        return self.report(port)

    # -- the command's output: to the job's output file, and to the server's log

    def read_output(self, stream: IO[bytes]) -> None:
        """Copy each line the command prints to stderr (the job's output file) and keep
        it for the next report (at most :data:`OUTPUT_KEPT`; older ones are counted)."""
        with stream:
            for raw in iter(lambda: stream.readline(65536), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
                with self.lock:
                    if len(self.output) >= OUTPUT_KEPT:
                        self.output.popleft()
                        self.lost += 1
                    self.output.append(line[:OUTPUT_LINE])

    def take_output(self) -> tuple[str, ...]:
        """The lines for one report (at most :data:`OUTPUT_PER_REPORT` characters)."""
        taken: list[str] = []
        with self.lock:
            if self.lost:
                taken.append(f"[{self.lost} lines of output left out]")
                self.lost = 0
            size = 0
            while self.output and size + len(json.dumps(self.output[0])) < OUTPUT_PER_REPORT:
                size += len(json.dumps(self.output[0]))
                taken.append(self.output.popleft())
        return tuple(taken)

    def post_output(self, port: int) -> int | None:
        """Report the output printed since the last report, if any, at most every
        :data:`OUTPUT_INTERVAL` seconds; the answer's status (None: nothing sent)."""
        now = time.monotonic()
        if not (self.output or self.lost) or now - self.output_sent < OUTPUT_INTERVAL:
            return None
        self.output_sent = now
        return self.post(Report(self.job_id, self.host, port, time.time(),
                                self.take_output()))

    def send_output(self) -> None:
        """The last lines, before the launcher ends (its reader has a moment)."""
        time.sleep(0.1)
        self.output_sent = 0.0
        self.post_output(0)

    def report(self, port: int) -> int:
        """Post the report every heartbeat while the command runs; the exit status."""
        answered = time.monotonic()
        next_post = 0.0
        first = True
        while True:
            if (ended := self.ended()) is not None:
                say(f"the command ended (status {self.status})")
                self.send_output()
                return ended
            now = time.monotonic()
            if now >= next_post or (self.output and now - self.output_sent >= OUTPUT_INTERVAL):
                self.output_sent = now
                answer = self.post(Report(self.job_id, self.host, port, time.time(),
                                          self.take_output()))
                now = time.monotonic()
                if answer == 410:
                    say("the server wants this job no more (410 Gone)")
                    return 0
                if answer is not None and 200 <= answer < 300:
                    if first:
                        say(f"reported port {port} to the server")
                        first = False
                    answered = now
                    next_post = now + self.heartbeat
                else:
                    next_post = now + min(RETRY, self.heartbeat)
            if now - answered > self.orphan_timeout:
                say(f"no server answered for {self.orphan_timeout:g} s: ending the job")
                return 1
            time.sleep(min(0.2, max(0.0, next_post - now)))

    def post(self, report: Report) -> int | None:
        """POST ``report``; the HTTP status, or None when no server answered. Output it
        carried that was not taken goes back, to the next report."""
        status = self.send(report)
        if report.output and not (status is not None and 200 <= status < 300):
            with self.lock:
                self.output.extendleft(reversed(report.output))
                while len(self.output) > OUTPUT_KEPT:
                    self.output.pop()
                    self.lost += 1
        return status

    def send(self, report: Report) -> int | None:
        body, signature = make_report(self.secret, report)
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", HEADER: signature})
        try:
            with self.opener.open(request, timeout=POST_TIMEOUT) as response:
                self.unanswered = False
                return int(response.status)
        except urllib.error.HTTPError as exc:
            self.unanswered = False
            if exc.code not in (410, 503):  # 503: not seen running yet, try again
                say(f"the server refused the report: {exc.code} {exc.reason}")
            return exc.code
        except (OSError, ValueError) as exc:
            if not self.unanswered:  # once per outage, not at every retry
                say(f"no answer from {self.url}: {exc}")
            self.unanswered = True
            return None

    def ended(self) -> int | None:
        """Reap what ended; the status to exit with when the job is over: the command
        failed, or it and everything it started have exited."""
        self.reap()
        if self.status is None:
            return None
        if self.status != 0:
            return self.status if self.status > 0 else 128 - self.status
        return None if descendants() else 0

    def reap(self) -> None:
        """Reap every ended child (daemons re-parented here included)."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                self.status = os.waitstatus_to_exitcode(wait_status)

    def end_tree(self) -> None:
        """SIGTERM every descendant, wait the grace, SIGKILL what is left (again, if
        any process forked meanwhile), reaping them all."""
        self.stopping = True
        pids = descendants()
        if pids:
            say(f"ending {len(pids)} process(es)")
        for signum, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while pids and time.monotonic() < deadline:
                time.sleep(0.02)
                self.reap()
                pids = descendants()
                if signum == signal.SIGKILL:  # anything forked meanwhile
                    for pid in pids:
                        try:
                            os.kill(pid, signum)
                        except OSError:
                            pass
        self.reap()

    def on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            say(f"got {signal.Signals(signum).name}: ending the job")
            raise Stopped(signum)

    def main(self) -> int:
        if sys.platform != "linux":
            fail("runs on Linux only (child subreaper, /proc)")
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            fail(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
        status = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, self.on_signal)
            status = self.run()
        except Stopped as stop:
            status = 128 + int(stop.args[0])
        finally:
            self.stopping = True
            self.end_tree()
        return status


if __name__ == "__main__":
    sys.exit(Launcher().main())
