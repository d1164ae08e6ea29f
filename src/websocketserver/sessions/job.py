"""One session's batch job: submitted, watched, its report checked, cancelled.

A :class:`Job` knows only the scheduler (:class:`~.slurm.Scheduler`) and the job: the
session's life around it (states in the store, the websocket) is the
:class:`~.services.ServiceManager`'s. What the server tunnels to is decided here and
nowhere else: the address Slurm gives for the node it allocated to the job
(``NodeAddr``), and the port the job's own signed report names, accepted only from
that node and only newer than the last one (a replay is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ..core.errors import Refused
from .job_launcher import ENV, Report
from .job_launcher import mac as report_mac
from .slurm import ENDED, JobState, Scheduler

CLOCK_SKEW = 10.0
"""Seconds a report's time may be ahead of the server's clock (nodes' clocks differ a
little even with NTP); more is refused as from the future."""
_FIELDS = ("job_id", "host", "port", "time")
SHOWN = ("job_id", "queue_reason", "expected_start", "job_node")
"""The fields of a job's :meth:`Job.record` that ``/v1/status`` shows."""
POLL_WAITING = 1.0
"""Seconds between looks at a job that is queued or not yet reported (squeue)."""
POLL_RUNNING = 5.0
"""Seconds between looks at a running job: how soon its end (time limit, node
failure, an administrator's scancel) closes its websocket."""
HEARTBEAT = 30.0
"""Seconds between the in-job launcher's reports (each one tells it the server still
wants the job)."""
ORPHAN_TIMEOUT = 120.0
"""Seconds the in-job launcher waits for any answer before it ends the job itself: the
bound on a job outliving a server that died without cancelling it."""


def verify_report(secret: bytes, body: bytes, header: str, now: float,
                  max_age: float) -> Report | None:
    """The report ``body`` carries, if ``header`` signs it under ``secret`` and it was
    made at most ``max_age`` seconds before ``now`` (and not over :data:`CLOCK_SKEW`
    after); ``None`` otherwise: forged, tampered with, replayed too late, malformed.

    Pure (no clock, no I/O): the server passes its time. A report replayed within
    ``max_age`` is accepted again; it says nothing new (reports are idempotent).
    """
    stamp, _, signature = header.strip().partition(" ")
    if not signature or not hmac.compare_digest(report_mac(secret, body, stamp),
                                                signature.encode("utf-8", "replace")):
        return None
    try:
        data = json.loads(body)
        sent = float(stamp)
    except ValueError:
        return None
    if not isinstance(data, dict) or not (
            set(_FIELDS) <= set(data) <= {*_FIELDS, "output"}):
        return None
    job_id, host, port, made = data["job_id"], data["host"], data["port"], data["time"]
    output = data.get("output", [])
    if not (isinstance(job_id, str) and isinstance(host, str) and 0 < len(host) <= 255
            and isinstance(port, int) and not isinstance(port, bool) and 0 <= port < 65536
            and isinstance(made, float) and made == sent and isinstance(output, list)
            and all(isinstance(line, str) for line in output)):
        return None
    if not now - max_age <= made <= now + CLOCK_SKEW:
        return None
    return Report(job_id=job_id, host=host, port=port, time=made, output=tuple(output))


def batch_script() -> str:
    """The job script: the in-job launcher (one standard-library file) run by the node's
    ``python3`` from a here-document, so the node needs nothing of ours."""
    source = resources.files(__package__).joinpath("job_launcher.py").read_text()
    end = "WEBSOCKETSERVER_JOB_LAUNCHER_END"
    assert end not in source
    return f"#!/bin/sh\nexec python3 -I - <<'{end}'\n{source}\n{end}\n"


@dataclass(frozen=True)
class JobSpec:
    """What to submit: the command (``{port}`` for the node's port), sbatch's extra
    arguments, the command's extra environment, and where the job starts."""

    command: Sequence[str]
    sbatch: Sequence[str]
    environment: Mapping[str, str]
    directory: str | None


class Job:
    """A session's job on ``scheduler`` (see the module); ``label`` names it in errors."""

    def __init__(self, scheduler: Scheduler, label: str) -> None:
        self.scheduler = scheduler
        self.label = label
        self.secret = secrets.token_urlsafe(32)
        """The job's report key: in its environment, never on a command line."""
        self.job_id: str | None = None
        self.status: JobState | None = None
        """What Slurm said last (None: nothing yet, or Slurm forgot the job)."""
        self.node: str | None = None
        """The node the job's script runs on (Slurm's name), once it runs."""
        self.address: str | None = None
        """That node's address as Slurm knows it: where the server connects."""
        self.port: int | None = None
        """The port the job reported."""
        self.final: str | None = None
        """The job's final state once it ended (``TIMEOUT``, ``CANCELLED``...)."""
        self.ending = False
        """Slurm is ending the job (``COMPLETING``: it names the final state only once
        the job's processes are gone, ``KillWait`` seconds at most)."""
        self.running_since: float | None = None
        self.reported_at: float | None = None  # monotonic, the first accepted report
        self._last_report = 0.0  # the time written in the newest accepted report
        self.changed = asyncio.Event()
        """Set at every change (a report, a state, the end); cleared by waiters, and
        set by whoever wants the job looked at now."""

    # -- submission and cancelling ----------------------------------------------------

    async def submit(self, spec: JobSpec, name: str, comment: str, report_url: str,
                     start_timeout: float) -> str:
        """Submit the job; its id. Raises :class:`~.slurm.SchedulerError`."""
        env = {**spec.environment,
               ENV + "COMMAND": json.dumps(list(spec.command)),
               ENV + "REPORT_URL": report_url, ENV + "SECRET": self.secret,
               ENV + "START_TIMEOUT": f"{start_timeout:g}",
               ENV + "HEARTBEAT": f"{HEARTBEAT:g}",
               ENV + "ORPHAN_TIMEOUT": f"{ORPHAN_TIMEOUT:g}"}
        self.job_id = await self.scheduler.submit(
            batch_script(), spec.sbatch, name=name, comment=comment, env=env,
            cwd=spec.directory)
        self._changed()
        return self.job_id

    async def cancel(self) -> None:
        """Cancel the job (a job that ended already is no error)."""
        if self.job_id is not None and self.final is None:
            await self.scheduler.cancel(self.job_id)

    # -- watching ---------------------------------------------------------------------

    async def poll(self) -> JobState | None:
        """Ask the scheduler once; the job's state (None: Slurm no longer knows it,
        which counts as ended). A failing scheduler raises SchedulerError."""
        assert self.job_id is not None
        state = await self.scheduler.state(self.job_id)
        if state != self.status:
            self.status = state
            self._changed()
        if state is None or state.state in ENDED:
            self.ended(state.state if state is not None else "ENDED")
        elif state.ended:
            self.ending = True
        return state

    async def locate(self, state: JobState) -> tuple[str, str]:
        """The node a running job's script runs on, and its address as Slurm knows it
        (where the server connects, whatever a report says)."""
        node = state.batch_host or state.nodes
        return node, await self.scheduler.node_address(node)

    def runs(self, node: str, address: str) -> None:
        """The job runs on ``node`` (:meth:`locate`): its report is awaited now."""
        self.node, self.address = node, address
        self.running_since = time.monotonic()
        self._changed()

    def ended(self, final: str) -> None:
        if self.final is None:
            self.final = final
            self._changed()

    def _changed(self) -> None:
        self.changed.set()

    # -- the job's report -------------------------------------------------------------

    def accept(self, report: Report) -> str | None:
        """Take the job's report (its port; 0 while the command does not listen yet);
        None if accepted, else why it is refused."""
        if report.job_id != self.job_id:
            return f"report for job {report.job_id}, not {self.job_id}"
        if self.final is not None:
            return f"job {self.job_id} ended"
        if self.node is None:
            return f"job {self.job_id} is not known to run yet"
        if report.host != self.node:
            return f"report names host {report.host[:100]!r}, job {self.job_id} runs on {self.node}"
        if report.time <= self._last_report:
            return "report replayed (not newer than the last one)"
        if report.port and self.port is not None and report.port != self.port:
            return f"report changes the port ({self.port} -> {report.port})"
        self._last_report = report.time
        if report.port and self.port is None:  # 0: output only, not listening yet
            self.port = report.port
            self.reported_at = time.monotonic()
            self._changed()
        return None

    # -- waiting for the application --------------------------------------------------

    async def ready(self, queue_timeout: float, start_timeout: float) -> tuple[str, int]:
        """Wait until the job reported; where the server connects.

        Raises :class:`~.errors.Refused`: 504 still queued after ``queue_timeout``
        seconds (from now) or no report ``start_timeout`` seconds after it began to
        run, 502 the job ended.
        """
        queued_until = time.monotonic() + queue_timeout
        while True:
            self.changed.clear()
            if self.final is not None:
                raise Refused(502, f"job {self.job_id} ended: {self.final}")
            if self.address is not None and self.port is not None:
                return self.address, self.port
            now = time.monotonic()
            if self.running_since is None:
                if now >= queued_until:
                    reason = self.status.reason if self.status is not None else None
                    raise Refused(504, f"job {self.job_id} still queued after "
                                       f"{queue_timeout:g} s" + (f" ({reason})" if reason else ""))
                wait = queued_until - now
            else:
                wait = self.running_since + start_timeout - now
                if wait <= 0:
                    raise Refused(504, f"job {self.job_id} runs but did not report its port "
                                       f"within {start_timeout:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), wait)

    def record(self) -> dict[str, Any]:
        """The job as the reservation keeps it (:meth:`restore` reads it back): what
        ``/v1/status`` shows of it (``job_id``, ``queue_reason``, ``expected_start`` in
        ISO 8601, ``job_node``), when its time limit ends it (``ends_at``, epoch
        seconds) and what checks its reports on any instance."""
        status = self.status
        pending = status is not None and status.pending
        expected = status.expected_start if status is not None and pending else None
        ends = status.end_time if status is not None and status.running else None
        return {"job_id": self.job_id,
                "queue_reason": status.reason if pending and status is not None else None,
                "expected_start": expected.isoformat() if expected is not None else None,
                "job_node": self.node, "address": self.address, "port": self.port,
                "secret": self.secret, "last_report": self._last_report,
                "ends_at": ends.timestamp() if ends is not None else None}

    @classmethod
    def restore(cls, scheduler: Scheduler, label: str, record: dict[str, Any]) -> Job:
        """The job a reservation's record describes (another instance's, whose report
        reached this one, or a dead instance's that this one adopts)."""
        job = cls(scheduler, label)
        job.job_id, job.secret = str(record["job_id"]), str(record["secret"])
        job.node, job.address, job.port = record["job_node"], record["address"], record["port"]
        job._last_report = float(record["last_report"])
        now = time.monotonic()  # its timeouts count from here
        job.running_since = now if job.node is not None else None
        job.reported_at = now if job.port is not None else None
        return job

    def reported(self, record: dict[str, Any]) -> None:
        """Take the port from a report that another instance accepted (``record``)."""
        if self.port is None and record.get("port") and self.node is not None:
            self.port = int(record["port"])
            self._last_report = max(self._last_report, float(record["last_report"]))
            self.reported_at = time.monotonic()
            self._changed()

