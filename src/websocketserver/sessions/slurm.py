"""Slurm, the batch scheduler a session can run on: its own commands, bounded.

Why the commands (``sbatch``, ``squeue``, ``scancel``, ``scontrol``) and not slurmrestd
or a binding: they are on every Slurm site's login and web hosts, found on ``PATH``,
and bring the site's configuration (``SLURM_CONF``) and authentication (munge) with
them, so the server configures nothing of Slurm's; Open OnDemand's Slurm adapter and
JupyterHub's batchspawner call the same commands for the same reason.

The part a scheduler has to provide is small on purpose (:class:`Scheduler`: submit,
state, cancel, a node's address, listing by name) so that another one (PBS, LSF) can
follow with a module of its own. Nothing here knows about sessions or tokens.

Every call is bounded in time (a controller that does not answer makes the commands
retry for minutes) and a command that fails raises :class:`SchedulerError` with its
exit status and its own message. Job scripts go to ``sbatch`` on stdin, never on a
command line (``ps`` shows those to every user); the message of an error is the
tool's, which never repeats the script.

The state of a job comes from ``squeue``, which asks the controller: it knows pending
and running jobs and keeps an ended one for ``MinJobAge`` (300 s by default) with its
final state (``COMPLETED``, ``CANCELLED``, ``TIMEOUT``...). After that, and on sites
without accounting (no ``slurmdbd``, as in the tests), nothing knows the job any more:
``sacct`` is not used, and :meth:`Slurm.state` answers ``None``, which a caller polling
more often than every few minutes reads as "ended, state unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

TIMEOUT = 15.0
"""Seconds a command may take by default (``sbatch`` waits for the controller's answer)."""

_SEP = "\x1f"  # the ASCII unit separator between squeue's fields, as Open OnDemand's
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # squeue's times, with their UTC offset
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")  # a job, or one task of an array
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

ENDED = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                   "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "REVOKED", "SPECIAL_EXIT",
                   "TIMEOUT"})
"""Slurm's states of a job that has ended (its processes are gone or going)."""


class SchedulerError(Exception):
    """A scheduler's command failed, timed out or is missing: the message says which."""


@dataclass(frozen=True)
class JobState:
    """What the scheduler says of one job, at one moment.

    ``state`` is Slurm's name of it (``PENDING``, ``RUNNING``, ``COMPLETING``, one of
    :data:`ENDED`...); ``reason`` why a job waits or ended (``Priority``,
    ``Resources``, ``Licenses``...; ``None`` where Slurm says ``None``), shown to the
    user as the queue reason; ``expected_start`` the start Slurm expects for a pending
    job, when its backfill scheduler has worked one out (``None`` otherwise, and for a
    job that is no longer pending); ``nodes`` the allocated nodes as Slurm writes them
    (``n1`` or ``n[1-3]``; empty while pending) and ``batch_host`` the one the job's
    script runs on, where a session's application listens.
    """

    job_id: str
    state: str
    reason: str | None
    expected_start: datetime | None
    nodes: str
    batch_host: str | None
    name: str
    end_time: datetime | None = None
    """When a running job's time limit ends it (None: no limit, or not running)."""

    @property
    def pending(self) -> bool:
        return self.state in ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD")

    @property
    def running(self) -> bool:
        return self.state == "RUNNING"

    @property
    def ended(self) -> bool:
        """Ended or ending: ``COMPLETING`` counts, its processes are being killed."""
        return self.state in ENDED or self.state == "COMPLETING"


class Scheduler(Protocol):
    """What a batch scheduler gives a session (all calls bounded, failures raise
    :class:`SchedulerError`)."""

    async def submit(self, script: str, args: Sequence[str] = (), *, name: str,
                     comment: str = "", env: Mapping[str, str] | None = None,
                     cwd: str | None = None) -> str: ...

    async def state(self, job_id: str) -> JobState | None: ...

    async def cancel(self, job_id: str) -> None: ...

    async def node_address(self, node: str) -> str: ...

    async def jobs_named(self, prefix: str, *,
                         user: str | None = None) -> list[tuple[str, str]]: ...


class Slurm:
    """Slurm through its commands, run with ``env`` (``None``: this process's).

    ``env`` is where ``PATH`` finds the commands and ``SLURM_CONF`` names the
    cluster; ``timeout`` bounds each command. ``prefix`` runs every command through
    another one (``sudo -n -u alice``: the jobs are that user's).
    """

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float = TIMEOUT,
                 prefix: Sequence[str] = ()) -> None:
        self.env = dict(os.environ if env is None else env)
        self.timeout = timeout
        self.prefix = tuple(prefix)

    def as_user(self, prefix: Sequence[str]) -> Slurm:
        """The same Slurm, every command run through ``prefix``."""
        return Slurm(self.env, self.timeout, prefix)

    async def submit(self, script: str, args: Sequence[str] = (), *, name: str,
                     comment: str = "", env: Mapping[str, str] | None = None,
                     cwd: str | None = None) -> str:
        """Submit ``script`` (its text, ``#!`` first) with ``sbatch``; its job id.

        ``args`` are more ``sbatch`` options (a partition, licences, ``--time``,
        ``--output``...). ``name`` and ``comment`` mark the job, so that
        :meth:`jobs_named` finds it again after a crash. ``env`` is added to sbatch's
        environment, which the job gets (unless ``args`` say ``--export``
        otherwise): values that must stay off every command line go there. ``cwd`` is
        where the job starts (sbatch's own folder by default).
        """
        argv = ["--parsable", f"--job-name={name}", *args]
        if comment:
            argv.insert(2, f"--comment={comment}")
        out = await self._run("sbatch", argv, stdin=script, env=env, cwd=cwd)
        job_id = out.strip().split(";")[0]  # "id" or "id;cluster"
        if not _JOB_ID.fullmatch(job_id):
            raise SchedulerError(f"sbatch answered no job id: {out.strip()[:200]!r}")
        return job_id

    async def state(self, job_id: str) -> JobState | None:
        """The job's state now, or ``None`` when Slurm no longer knows it (see the
        module: ended more than ``MinJobAge`` ago, or never was)."""
        _check(_JOB_ID, job_id, "job id")
        fields = _SEP.join(("%i", "%T", "%r", "%S", "%N", "%B", "%j", "%e"))
        try:
            out = await self._run("squeue", ["--noheader", "--states=all", f"--jobs={job_id}",
                                             f"--format={fields}"])
        except SchedulerError as exc:
            if "Invalid job id" in str(exc):  # squeue's word for a job it has forgotten
                return None
            raise
        for line in out.splitlines():
            values = line.split(_SEP, 7)
            if len(values) == 8 and values[0] == job_id:
                return _job_state(values)
        return None

    async def cancel(self, job_id: str) -> None:
        """Cancel the job (``scancel``): Slurm signals its processes, and kills what is
        left ``KillWait`` seconds later. A job that has ended already is no error."""
        _check(_JOB_ID, job_id, "job id")
        await self._run("scancel", [job_id])

    async def node_address(self, node: str) -> str:
        """The address Slurm reaches ``node`` at (its ``NodeAddr``): where the server
        connects, whatever a job reports about itself."""
        _check(_NODE, node, "node name")
        out = await self._run("scontrol", ["--oneliner", "show", "node", node])
        for line in out.splitlines():
            if line.startswith(f"NodeName={node} ") and (
                    found := re.search(r"\bNodeAddr=(\S+)", line)):
                return found.group(1)
        raise SchedulerError(f"scontrol: no NodeAddr for node {node}")

    async def jobs_named(self, prefix: str, *,
                         user: str | None = None) -> list[tuple[str, str]]:
        """The jobs not yet ended whose name starts with ``prefix`` (of ``user`` only,
        when given), as (id, user) pairs: jobs a crashed server left, found by the
        marker it put in their names."""
        args = ["--noheader", f"--format=%i{_SEP}%T{_SEP}%u{_SEP}%j"]
        if user is not None:
            args.append(f"--user={user}")
        out = await self._run("squeue", args)
        found = []
        for line in out.splitlines():
            job_id, state, owner, name = (line.split(_SEP, 3) + ["", "", ""])[:4]
            if name.startswith(prefix) and state not in ENDED and state != "COMPLETING":
                found.append((job_id, owner))
        return found

    async def _run(self, tool: str, args: list[str], *, stdin: str | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
        """Run ``tool`` bounded by :attr:`timeout`; its stdout, or SchedulerError."""
        # times with their UTC offset, whatever the site's format is
        environ = {**self.env, **(env or {}), "SLURM_TIME_FORMAT": _TIME_FORMAT}
        argv = [*self.prefix, tool, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=environ, stdin=asyncio.subprocess.PIPE, cwd=cwd,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise SchedulerError(f"{argv[0]}: cannot run it: {exc.strerror or exc}") from None
        try:
            out, err = await asyncio.wait_for(
                proc.communicate(None if stdin is None else stdin.encode()), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise SchedulerError(f"{tool}: no answer within {self.timeout:g} s") from None
        finally:
            if proc.returncode is None:  # cancelled: the command must not outlive us
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if proc.returncode != 0:
            message = (err or out).decode(errors="replace").strip()[:500]
            raise SchedulerError(f"{tool} failed (exit {proc.returncode}): {message}")
        return out.decode(errors="replace")


def _check(pattern: re.Pattern[str], value: str, what: str) -> None:
    """Refuse a value a command could read as an option (``-u root``)."""
    if not pattern.fullmatch(value):
        raise SchedulerError(f"not a {what}: {value[:100]!r}")


def _job_state(values: list[str]) -> JobState:
    job_id, state, reason, start, nodes, batch_host, name, end = values
    return JobState(job_id=job_id, state=state, reason=None if reason == "None" else reason,
                    expected_start=_time(start) if state == "PENDING" else None, nodes=nodes,
                    batch_host=None if batch_host in ("n/a", "") else batch_host, name=name,
                    end_time=_time(end) if state == "RUNNING" else None)


def _time(text: str) -> datetime | None:
    """One of squeue's times (None: ``N/A``, ``Unknown``, a limit of ``INFINITE``)."""
    with contextlib.suppress(ValueError):
        return datetime.strptime(text, _TIME_FORMAT)
    return None
