"""The Slurm jobs of this instance's sessions: submitting, watching, reports, clean-up.

The :class:`~.services.ServiceManager` owns the sessions and their life in the store;
for a Slurm service's session it asks :class:`Jobs` here. A job is submitted when the
websocket arrives (or at ``/v1/reserve`` with ``"start": "reserve"``); the token is
``queued`` while Slurm holds the job back, ``starting`` once it runs and until its
launcher reports the port (:meth:`Jobs.report`), then ``active``. A watcher task per job
follows it in Slurm: its end (time limit, node failure, scancel) ends the session with
the job's state as the reason. A websocket for a queued token attaches to its session
here, not through the store's claim, since the job is this instance's.

Every job of a run is named ``wss-INSTANCE-EPOCH``: the supervisor of a killed server
cancels them by that name, and the next start of the instance cancels any left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from ..core.errors import Refused
from ..scripts import output_log, substitute
from ..settings import Settings, SettingsError
from ..tasks import Tasks
from .job import POLL_RUNNING, POLL_WAITING, Job, JobSpec, verify_report
from .reservations import Reservation, ReservationStore, State, StoreUnavailable, may_use
from .service import Service
from .session import Session
from .slurm import SchedulerError, Slurm

log = logging.getLogger("websocketserver.services")

REPORT_MAX_AGE = 60.0
"""Seconds a job's report is valid after it was signed (it is re-sent every 30 s)."""
REPORT_WAIT = 3.0
"""Seconds a report that comes before the watcher saw its job run waits for it."""
COMPLETING_WAIT = 10.0
"""Seconds a websocket whose job Slurm is ending waits to learn the job's final state."""
REPORT_MAX_SIZE = 65536
"""Largest report body read, in bytes."""


class Jobs:
    """The jobs of the sessions in ``sessions`` (shared with the manager, by token).

    ``new_session`` makes (and registers) a session; ``end`` stops a session and frees
    its slot (its token is stopping); ``background`` runs the watchers.
    """

    def __init__(self, settings: Settings, store: ReservationStore, scheduler: Slurm,
                 services: dict[str, Service], sessions: dict[str, Session],
                 new_session: Callable[[str, Service, int], Session],
                 end: Callable[[str, Session], Awaitable[None]], background: Tasks) -> None:
        self.settings = settings
        self.store = store
        self.scheduler = scheduler
        self.services = services
        self._sessions = sessions
        self._new_session = new_session
        self._end = end
        self._background = background
        self._jobs: dict[str, tuple[str, Session]] = {}  # job id -> its token and session
        instance = settings.node_name or f"{socket.gethostname()}:{settings.ws_port}"
        self.job_marker = f"wss-{instance}-"
        """Every job of this server is named so (its instance, an epoch): found again at
        the next start if the server was killed."""
        self.job_name = f"{self.job_marker}{int(time.time())}"
        self.any = any(service.batch is not None for service in services.values())
        """Whether a service runs as Slurm jobs."""
        if self.any and not settings.job_report_url:
            raise SettingsError("a service runs as Slurm jobs (a SlurmService script): it "
                                "needs the HTTP port (--http_directory), its jobs report there")
        self.shared = settings.redis is not None
        """In a cluster: a job's report may reach another instance."""

    @staticmethod
    def unclaimed(session: Session) -> bool:
        """Whether ``session`` has a watched job that no websocket holds (one reserved
        with ``"start": "reserve"``): a release or shutdown ends it here."""
        return (session.job is not None and session.watcher is not None
                and not session.claimed and session.address is None)

    def forget(self, session: Session) -> None:
        """The session is over: a report for its job is answered 410 from now on."""
        if session.job is not None and session.job.job_id is not None:
            self._jobs.pop(session.job.job_id, None)

    async def submit_at_reserve(self, reservation: Reservation, service: Service,
                                 user: str | None) -> Reservation:
        """``"start": "reserve"``: submit the job now; the token is queued."""
        token = reservation.token
        session = self._new_session(token, service, reservation.index)
        try:
            session.job = Job(self.scheduler_for(service, user), session.id)
            if await self.store.transition(token, State.RESERVED, State.QUEUED) is None:
                raise Refused(410, "reservation released")
            await self.submit(token, session, reservation)
        except BaseException:
            self._sessions.pop(token, None)
            await self.store.remove(token, "its job could not be submitted")
            raise
        queued = await self.store.get(token)
        return queued or reservation

    async def claim(self, token: str, session: Session, user: str | None) -> Reservation:
        """A websocket for a job's session not yet active (queued, or starting): it
        waits for the job in :meth:`activate`. One websocket at a time."""
        reservation = await self.store.get(token)
        if reservation is None:
            raise Refused(404, "unknown or expired token")
        if not may_use(reservation, user):
            raise Refused(403, f"token is reserved by another user than {user}")
        if session.claimed:
            raise Refused(409, "token is already in use")
        session.claimed = True
        return reservation

    def elsewhere(self, known: Reservation, user: str | None) -> bool:
        """Whether a websocket for ``known`` goes to the instance that holds it: a Slurm
        service's token whose job that instance submitted, or will submit."""
        service = self.services.get(known.service)
        return (service is not None and service.batch is not None and may_use(known, user)
                and known.node not in (None, self.settings.node_name)
                and known.state in (State.RESERVED, State.QUEUED, State.STARTING))

    async def claim_to_submit(self, known: Reservation, user: str | None
                              ) -> Reservation | None:
        """The first websocket of a reserved token of a Slurm service: reserved ->
        queued (its job is submitted by :meth:`activate`); None for any other token."""
        token = known.token
        if known.state is not State.RESERVED or token in self._sessions:
            return None
        service = self.services.get(known.service)
        if service is None or service.batch is None or not may_use(known, user):
            return None
        scheduler = self.scheduler_for(service, user if user is not None else known.owner)
        session = self._new_session(token, service, known.index)
        session.claimed = True
        session.job = Job(scheduler, session.id)
        queued = None
        try:
            queued = await self.store.transition(token, State.RESERVED, State.QUEUED)
        finally:
            if queued is None:  # released, or another websocket's meanwhile
                self._sessions.pop(token, None)
        return queued

    def scheduler_for(self, service: Service, user: str | None) -> Slurm:
        """The scheduler that submits ``user``'s jobs of ``service``: through the
        service's user prefix, which a job of an anonymous caller cannot have."""
        batch = service.batch
        assert batch is not None
        if not batch.user_prefix:
            return self.scheduler
        if user is None:
            raise Refused(403, f"service {service.name} runs jobs as the reserving user; "
                               "the caller is anonymous")
        return self.scheduler.as_user([substitute(part, {"user": user})
                                       for part in batch.user_prefix])

    async def submit(self, token: str, session: Session, reservation: Reservation) -> None:
        """Submit the session's job (its token is queued) and watch it. Raises
        :class:`~.errors.Refused` (502) if Slurm refuses it."""
        job, batch = session.job, session.service.batch
        assert job is not None and batch is not None
        options = dict(reservation.options)
        index = session.index
        try:  # a script's methods may raise anything
            directory = batch.working_directory()
            spec = JobSpec(command=batch.command(index, options),
                           sbatch=batch.sbatch(index, options),
                           environment=batch.environment(index, options),
                           directory=str(directory) if directory is not None else None)
        except Exception as exc:
            log.warning("%s: no job to submit: %s: %s", session.id, type(exc).__name__, exc)
            raise Refused(502, f"{session.service.name} failed to start: {exc}") from None
        session.queue_timeout = batch.queue_timeout
        try:
            job_id = await job.submit(spec, self.job_name,
                                      f"websocketserver {session.service.name}[{index}]",
                                      self.settings.job_report_url,
                                      self.settings.start_timeout)
        except SchedulerError as exc:
            log.warning("%s: the job was not submitted: %s", session.id, exc)
            session.note_end("its job could not be submitted")
            raise Refused(502, f"{session.service.name}: the job was not submitted: "
                               f"{exc}") from None
        self._jobs[job_id] = (token, session)
        await self._record(token, session)
        log.info("%s: submitted job %s", session.id, job_id)
        session.watcher = self._background.spawn(self._watch(token, session),
                                                 f"{session.id} job {job_id}")

    async def _watch(self, token: str, session: Session) -> None:
        """Follow the job in Slurm until it ends (or the session is stopped, which
        cancels this task): queued -> starting when it runs; an unused one is cancelled
        ``--timeout`` seconds after its report; its end ends the session."""
        job = session.job
        assert job is not None
        failing = False
        reason = None
        while job.final is None:
            try:
                before = job.record()
                state = await job.poll()
                if state is not None and state.running and job.node is None:
                    node, address = await job.locate(state)
                    job.runs(node, address)  # recorded first: "starting" names its node
                    await self._record(token, session)
                    before = job.record()
                    if await self.store.transition(token, State.QUEUED,
                                                   State.STARTING) is None:
                        return  # released meanwhile: its stopping cancels the job
                    log.info("%s: job %s runs on %s", session.id, job.job_id, job.node)
                elif job.node is not None and job.port is None and self.shared:
                    current = await self.store.get(token)  # reported to another instance?
                    if current is not None and current.job is not None:
                        job.reported(current.job)
                if job.record() != before:
                    await self._record(token, session)
                failing = False
            except SchedulerError as exc:
                if not failing:  # once per outage
                    log.warning("%s: cannot follow job %s: %s", session.id, job.job_id, exc)
                failing = True
            except StoreUnavailable as exc:
                log.debug("%s: %s", session.id, exc.detail)
            unused = (job.reported_at is not None and not session.claimed
                      and session.address is None
                      and time.monotonic() - job.reported_at > self.settings.timeout)
            if unused:
                reason = f"unused for {self.settings.timeout:g} s after its job started"
                break
            job.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.changed.wait(), POLL_RUNNING
                                       if job.port and not job.ending else POLL_WAITING)
        reason = reason or f"job {job.job_id} ended: {job.final}"
        session.watcher = None
        log.info("%s: %s", session.id, reason)
        session.note_end(reason)
        if not session.end(reason):  # no websocket attached
            await self.end_job(token, session, reason)

    async def adopt(self, token: str) -> Session | None:
        """Take over the job of ``token``'s session (its instance died, the cluster
        moved it here): its session, watched from now on (None: nothing to adopt)."""
        reservation = await self.store.get(token)
        service = self.services.get(reservation.service) if reservation else None
        if (reservation is None or reservation.job is None or service is None
                or service.batch is None or token in self._sessions):
            return None
        try:
            scheduler = self.scheduler_for(service, reservation.owner)
        except Refused as exc:
            log.error("cannot adopt job %s: %s", reservation.job.get("job_id"), exc.reason)
            return None
        session = self._new_session(token, service, reservation.index)
        job = session.job = Job.restore(scheduler, session.id, reservation.job)
        session.queue_timeout = service.batch.queue_timeout
        if reservation.state is State.DETACHED and job.address and job.port:
            session.address = (job.address, job.port)
        assert job.job_id is not None
        self._jobs[job.job_id] = (token, session)
        session.watcher = self._background.spawn(self._watch(token, session),
                                                 f"{session.id} job {job.job_id}")
        log.warning("%s: adopted job %s of instance that is gone (%s)", session.id,
                    job.job_id, reservation.state)
        return session

    async def job_ended(self, session: Session) -> str | None:
        """Why the session's job ended (``job N ended: STATE``), asked when its
        application's connection closed; None if it runs on after :data:`REPORT_WAIT`
        seconds (the application closed the connection itself)."""
        job = session.job
        assert job is not None
        began = time.monotonic()
        while job.final is None:
            waited = time.monotonic() - began
            if waited > (COMPLETING_WAIT if job.ending else REPORT_WAIT):
                return f"job {job.job_id} is ending" if job.ending else None
            job.changed.set()  # its watcher looks now
            await asyncio.sleep(0.5)
        return f"job {job.job_id} ended: {job.final}"

    async def end_job(self, token: str, session: Session, reason: str) -> None:
        """End a job's session no websocket holds: cancel the job, free the slot."""
        session.note_end(reason)
        if session.watcher is not None and session.watcher is not asyncio.current_task():
            session.watcher.cancel()
            session.watcher = None
        try:
            await self.store.transition(
                token, (State.QUEUED, State.STARTING, State.ACTIVE, State.DETACHED),
                State.STOPPING)
        except StoreUnavailable as exc:  # cancelled all the same; freed once it answers
            log.debug("%s: not marked stopping: %s", session.id, exc.detail)
        await self._end(token, session)

    async def report(self, body: bytes, signature: str) -> tuple[int, str]:
        """A job's report (``POST /v1/job_report``): its status and a message.

        200 accepted; 410 no session wants that job (the launcher then ends it); 400
        not a report; 403 forged, tampered with, too old, replayed, from another node
        than the job's, or for another job: refused and logged, never trusted.
        """
        try:
            data = json.loads(body)
            job_id = data["job_id"]
        except (ValueError, TypeError, KeyError):
            return 400, "not a job report"
        if not isinstance(job_id, str):
            return 400, "not a job report"
        found = self._jobs.get(job_id)
        if found is None:
            return await self._report_elsewhere(job_id, body, signature)
        token, session = found
        job = session.job
        assert job is not None
        if job.node is None and job.final is None:  # it runs, but no poll saw it yet
            job.changed.set()  # its watcher looks now
            deadline = time.monotonic() + REPORT_WAIT
            while job.node is None and job.final is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if job.node is None:
                return 503, "job not seen running yet"  # the launcher tries again
        report = verify_report(job.secret.encode(), body, signature, time.time(),
                               REPORT_MAX_AGE)
        known = job.port
        refusal = ("bad signature, or signed too long ago" if report is None
                   else job.accept(report))
        if refusal is not None:
            log.warning("%s: refused a report for job %s: %s", session.id, job_id[:20],
                        refusal)
            return 403, "report refused"
        if known is None and job.port is not None:
            log.info("%s: job %s reported port %s on %s", session.id, job_id, job.port,
                     job.node)
        await self._record(token, session)
        assert report is not None
        for line in report.output:  # what the command printed, as a CommandService's
            output_log.info("%s[%d]: %s", session.service.name, session.index, line)
        return 200, "ok"

    async def _report_elsewhere(self, job_id: str, body: bytes,
                                signature: str) -> tuple[int, str]:
        """A report for a job of another instance of the cluster: checked against the
        job's record in the shared reservation, which its instance then reads."""
        reservation = await self.store.find_job(job_id)
        if reservation is None or reservation.job is None:
            return 410, "no session wants this job"
        label = f"{reservation.service}[{reservation.index}]"
        job = Job.restore(self.scheduler, label, reservation.job)
        if job.node is None:
            return 503, "job not seen running yet"  # its instance has not seen it run
        report = verify_report(job.secret.encode(), body, signature, time.time(),
                               REPORT_MAX_AGE)
        refusal = ("bad signature, or signed too long ago" if report is None
                   else job.accept(report))
        if refusal is not None:
            log.warning("%s: refused a report for job %s: %s", label, job_id[:20], refusal)
            return 403, "report refused"
        assert report is not None
        await self.store.record_job(reservation.token, {**reservation.job, **{
            key: value for key, value in job.record().items()
            if key in ("port", "last_report")}})
        for line in report.output:
            output_log.info("%s: %s", label, line)
        return 200, "ok"

    async def _record(self, token: str, session: Session) -> None:
        """Write the session's job into its reservation (status, other instances)."""
        assert session.job is not None
        try:
            await self.store.record_job(token, session.job.record())
        except StoreUnavailable as exc:  # written again at its next change
            log.debug("%s: job not recorded: %s", session.id, exc.detail)

    def scancel_all(self) -> list[str]:
        """The command that cancels every job of this run (the supervisor's, should
        the server be killed)."""
        return [*self.scheduler.prefix, "scancel", f"--name={self.job_name}"]

    async def cancel_left_jobs(self) -> None:
        """Cancel the jobs a killed server of this instance left (named with
        :attr:`job_marker` and an older epoch): called at start, before any submit."""
        if not self.any:
            return
        try:
            left = await self.scheduler.jobs_named(self.job_marker)
        except SchedulerError as exc:
            log.warning("cannot look for jobs a previous run left: %s", exc)
            return
        for job_id, owner in left:
            if self.shared and await self.store.find_job(job_id) is not None:
                continue  # a live reservation holds it: it ends with that reservation
            try:
                await self.scheduler.cancel(job_id)
                log.warning("cancelled job %s of %s, left by a previous run", job_id, owner)
            except SchedulerError as exc:
                log.error("cannot cancel job %s left by a previous run: %s", job_id, exc)
