"""Services: reserve an instance, start it when its websocket arrives, stop it after.

:class:`ServiceManager` drives each token through its lifecycle (the table of
:mod:`.lifecycle`, kept by the reservation store); each token activated here has a
:class:`~.session.Session`, which calls its service's script. Whatever a script does
(raise, hang, return a port nobody listens on, die mid-session), the websocket gets a
reason, the slot is freed and the server goes on.

With a reconnect grace (``--reconnect_grace``, or a service's ``"reconnect_grace"``),
an instance whose browser left is kept *detached* by a holder task for that long: a
websocket with its token re-attaches to it (a new TCP connection to the same host and
port, no second ``start()``); else the holder stops it.

A Slurm service's session (:class:`~..scripts.SlurmService`) runs a batch job: it is
submitted when the websocket arrives (or at ``/v1/reserve`` with ``"start":
"reserve"``), the token is ``queued`` while Slurm holds the job back, ``starting`` once
it runs and until its launcher reports the port (:meth:`ServiceManager.job_report`),
then ``active``. A watcher task per job follows it in Slurm: its end (time limit,
node failure, scancel) ends the session with the job's state as the reason. A
websocket for a queued token attaches to its session here, not through the store's
claim, since the job is this instance's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..core.errors import Refused
from ..identity import Identity
from ..metrics import Metrics
from ..scripts import (
    CommandService,
    ConfiguredCommand,
    ConfiguredSlurmCommand,
    RemoteServiceScript,
    SlurmService,
    load_script,
    substitute,
)
from ..settings import ServiceConfig, Settings
from ..tasks import Tasks
from .job import POLL_RUNNING, POLL_WAITING, Job, JobSpec
from .job_launcher import verify_report
from .local_apps import LocalApplication
from .reservations import (
    ClaimOutcome,
    NoSlotFree,
    Reservation,
    ReservationStore,
    State,
    StoreUnavailable,
    may_see,
    may_use,
)
from .session import Session
from .slurm import SchedulerError, Slurm

log = logging.getLogger("websocketserver.services")

RECLAIM_INTERVAL = 1.0
"""How often never-activated reservations are checked against ``--timeout``."""
ENDED_POLL = 0.05
"""Seconds between looks at whether every session has ended (end_all_and_wait)."""
STORE_RETRY = 1.0
"""Seconds between tries to free a slot (or give back a claimed one) while the store (a
cluster's Redis) does not answer."""
REPORT_MAX_AGE = 60.0
"""Seconds a job's report is valid after it was signed (it is re-sent every 30 s)."""
REPORT_WAIT = 3.0
"""Seconds a report that comes before the watcher saw its job run waits for it."""
COMPLETING_WAIT = 10.0
"""Seconds a websocket whose job Slurm is ending waits to learn the job's final state."""
REPORT_MAX_SIZE = 4096
"""Largest report body read, in bytes."""


@dataclass(frozen=True)
class Elsewhere:
    """What a claim answers when the token's reservation runs on another instance of the
    cluster (``node``) and this one has no free slot to take it over: forward its
    websocket there."""

    node: str


@dataclass(frozen=True)
class Service:
    """A service type: its configuration and its one script object."""

    config: ServiceConfig
    script: RemoteServiceScript

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def group(self) -> str | None:
        return self.config.options.get("group")

    @property
    def batch(self) -> SlurmService | None:
        """The script, if the service runs as Slurm jobs."""
        return self.script if isinstance(self.script, SlurmService) else None


class ServiceManager:
    """Reservations, launches and stops for every configured service.

    ``scheduler``: where Slurm services' jobs run (default: Slurm's commands on PATH).
    """

    def __init__(self, settings: Settings, store: ReservationStore, identity: Identity,
                 metrics: Metrics | None = None, scheduler: Slurm | None = None) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self.metrics = metrics or Metrics()
        self.scheduler = scheduler or Slurm()
        self.services: dict[str, Service] = {}
        for config in settings.services:
            if config.builtin_app is not None:
                script: RemoteServiceScript = LocalApplication(
                    config.builtin_app, settings.local_app_root, settings.local_app_command,
                    settings.start_timeout)
            elif config.slurm is not None:
                script = ConfiguredSlurmCommand(config)
            elif config.command is not None:
                script = ConfiguredCommand(config, settings.start_timeout)
            else:
                script = load_script(config)
            if isinstance(script, CommandService):
                script.service_name = config.name  # its output is logged as name[index]
            self.services[config.name] = Service(config, script)
        self._sessions: dict[str, Session] = {}  # by token: activated, slot not yet freed
        self._jobs: dict[str, tuple[str, Session]] = {}  # job id -> its token and session
        instance = settings.node_name or f"{socket.gethostname()}:{settings.ws_port}"
        self.job_marker = f"wss-{instance}-"
        """Every job of this server is named so (its instance, an epoch): found again at
        the next start if the server was killed."""
        self.job_name = f"{self.job_marker}{int(time.time())}"
        self._reclaimer = Tasks(log)
        self._holders = Tasks(log)  # one per detached instance
        self._background = Tasks(log)  # abandoned starts, changes to make once Redis answers
        self._closing = False

    def grace(self, service: Service) -> float:
        """Seconds an instance of ``service`` is kept detached: its own, else the flag's."""
        own = service.config.reconnect_grace
        return self.settings.reconnect_grace if own is None else own

    # -- what a caller may see -----------------------------------------------------

    def visible(self, user: str | None) -> list[Service]:
        """Services ``user`` may see: those without a group, and their groups' ones."""
        return [s for s in self.services.values()
                if s.group is None or self.identity.is_member(user, s.group)]

    def _service_for(self, name: str, user: str | None) -> Service:
        service = self.services.get(name)
        if service is None:
            raise Refused(404, f"unknown service: {name}")
        if service.group is not None and not self.identity.is_member(user, service.group):
            if user is None:
                raise Refused(403, f"service {name} is restricted to group "
                                        f"{service.group}; caller is anonymous")
            raise Refused(403, f"user {user} is not in group {service.group}")
        return service

    async def status(self, user: str | None, admin: bool = False) -> list[dict[str, Any]]:
        """The ``/v1/status`` document: one object per service the caller may see.

        A known user's token is shown to that user and to an ``admin`` (the security
        token's holder) only; to others its instance has ``"token": null``.
        """
        result = []
        for service in self.visible(user):
            instances = [self._instance(r, admin or may_see(r, user))
                         for r in await self.store.list(service.name)]
            result.append({
                "name": service.name,
                "count": await self.store.capacity(service.name, service.config.count),
                "instances": instances,
                "common_options": service.config.options,
                "file_ext": service.config.options.get("file_ext", []),
            })
        return result

    def _instance(self, reservation: Reservation, show_token: bool) -> dict[str, Any]:
        session = self._sessions.get(reservation.token)
        traffic = session.traffic if session is not None else None
        instance: dict[str, Any] = {
            "index": reservation.index, "token": reservation.token if show_token else None,
            "timestamp": reservation.timestamp, "options": reservation.options,
            "state": str(reservation.state), "owner": reservation.owner,
            "bytes_up": traffic.bytes_up if traffic else 0,
            "bytes_down": traffic.bytes_down if traffic else 0}
        if reservation.node is not None:
            instance["node"] = reservation.node
        if session is not None and session.job is not None:
            instance.update(session.job.describe())
        if reservation.state is State.DETACHED:
            grace = self.grace(self.services[reservation.service])
            instance["detached_seconds_left"] = round(
                max(0.0, reservation.changed + grace - time.monotonic()), 1)
        return instance

    # -- lifecycle -------------------------------------------------------------------

    async def reserve(self, name: str, options: dict[str, Any], user: str | None) -> Reservation:
        service = self._service_for(name, user)
        try:
            reservation = await self.store.reserve(name, service.config.count, options, user)
        except NoSlotFree:
            raise Refused(503, f"all {service.config.count} instances of {name} "
                                    "are in use") from None
        log.info("reserved %s index %d for %s", name, reservation.index, user or "anonymous")
        batch = service.batch
        if batch is not None and batch.start_mode == "reserve":
            return await self._submit_at_reserve(reservation, service, user)
        return reservation

    async def _submit_at_reserve(self, reservation: Reservation, service: Service,
                                 user: str | None) -> Reservation:
        """``"start": "reserve"``: submit the job now; the token is queued."""
        token = reservation.token
        session = self._new_session(token, service, reservation.index)
        try:
            session.job = Job(self._scheduler_for(service, user), session.id)
            if await self.store.transition(token, State.RESERVED, State.QUEUED) is None:
                raise Refused(410, "reservation released")
            await self._submit(token, session, reservation)
        except BaseException:
            self._sessions.pop(token, None)
            await self.store.remove(token, "its job could not be submitted")
            raise
        queued = await self.store.get(token)
        return queued or reservation

    async def release(self, token: str, user: str | None = None, admin: bool = False
                      ) -> Reservation:
        """End a reservation: forget it if unused, else close its tunnel (which stops it).

        Refused (403) to a known ``user`` other than its owner, unless ``admin``.
        """
        known = await self.store.get(token)
        if known is None:
            raise Refused(404, "unknown token")
        if not admin and not may_use(known, user):
            raise Refused(403, f"token is reserved by another user than {user}")
        reservation = await self.store.transition(token, State.RESERVED, State.STOPPING)
        if reservation is not None:
            await self.store.remove(token, "released")
            log.info("released %s index %d (never used)", reservation.service,
                     reservation.index)
            return reservation
        reservation = await self.store.get(token)
        if reservation is None:
            raise Refused(404, "unknown token")
        session = self._sessions.get(token)
        if self.end_here(token):
            return reservation
        if session is not None and session.job is not None and not session.claimed:
            await self._end_job(token, session, "reservation released")  # no websocket
        else:
            # claimed by an upgrade not yet activating it (activate or unclaim frees
            # it), or running on another instance of a cluster (the store tells it)
            await self.store.transition(
                token, (State.QUEUED, State.STARTING, State.ACTIVE, State.DETACHED),
                State.STOPPING)
        return reservation

    def end_all(self, reason: str) -> None:
        """End every session of this instance: its tunnel closes (which stops it), a
        detached one's holder stops it now."""
        for token, session in list(self._sessions.items()):
            if (not session.end(reason) and session.job is not None
                    and not session.claimed and session.watcher is not None):
                session.watcher.cancel()  # a job no websocket waits for: cancel it
                session.watcher = None
                self._holders.spawn(self._end_job(token, session, reason),
                                    f"{session.id} ending")

    def end_here(self, token: str) -> bool:
        """End ``token``'s session here as a release does (here, or on another instance
        of the cluster); False if none runs here."""
        session = self._sessions.get(token)
        return session is not None and session.end("reservation released")

    async def claim(self, token: str, user: str | None) -> Reservation | Elsewhere:
        """Take ``token`` for a websocket of ``user`` (reserved -> starting, or detached
        -> active: a re-attach; atomically).

        Raises :class:`~.errors.Refused`: 404 unknown token, 403 another known user's, 409
        already in use, 410 a detached instance that died (its session is ended). The
        winner must then :meth:`activate` it or :meth:`unclaim` it. In a cluster, a
        reservation of another instance that cannot move here is :class:`Elsewhere`.
        """
        session = self._sessions.get(token)
        if session is not None and session.job is not None and session.address is None:
            return await self._claim_job(token, session, user)
        if session is None and self.runs_jobs:
            submitted = await self._claim_to_submit(token, user)
            if submitted is not None:
                return submitted
        claim = await self.store.claim(token, user)
        if (claim.outcome is ClaimOutcome.IN_USE and session is not None
                and session.settled is not None and session.settling()):
            await asyncio.shield(session.settled)  # its websocket is being detached
            claim = await self.store.claim(token, user)
        if claim.outcome is ClaimOutcome.REATTACHED and session is not None:
            wake, session.wake = session.wake, None
            if wake is not None:
                wake.set()  # its holder ends without stopping it
            if session.address is not None and not await session.alive():
                await self._end_dead(token, session)
                raise Refused(410, f"the {session.service.name} instance ended while "
                                   "detached; its session is over")
        if claim.outcome is ClaimOutcome.UNKNOWN:
            raise Refused(404, "unknown or expired token")
        if claim.outcome is ClaimOutcome.NOT_OWNER:
            raise Refused(403, f"token is reserved by another user than {user}")
        if claim.outcome is ClaimOutcome.IN_USE:
            raise Refused(409, "token is already in use")
        assert claim.reservation is not None
        if claim.outcome is ClaimOutcome.ELSEWHERE:
            return Elsewhere(claim.reservation.node or "?")
        return claim.reservation

    async def _claim_job(self, token: str, session: Session, user: str | None
                         ) -> Reservation:
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

    async def _claim_to_submit(self, token: str, user: str | None) -> Reservation | None:
        """The first websocket of a reserved token of a Slurm service: reserved ->
        queued (its job is submitted by :meth:`activate`); None for any other token."""
        known = await self.store.get(token)
        if known is None or known.state is not State.RESERVED or token in self._sessions:
            return None
        service = self.services.get(known.service)
        if service is None or service.batch is None or not may_use(known, user):
            return None
        scheduler = self._scheduler_for(service, user if user is not None else known.owner)
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

    def _scheduler_for(self, service: Service, user: str | None) -> Slurm:
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

    async def unclaim(self, token: str) -> None:
        """Give back a claimed token never activated (its websocket was not opened)."""
        await self._now_or_later(lambda: self._unclaim(token), "giving back a claimed token")

    async def _unclaim(self, token: str) -> None:
        session = self._sessions.get(token)
        if session is not None and session.job is not None and session.address is None:
            session.claimed = False  # its job goes on; the next websocket waits for it
            return
        if session is None or session.address is None:
            if await self.store.transition(token, State.STARTING, State.RESERVED) is None:
                await self.store.remove(token, "released")  # released meanwhile
        elif await self.store.transition(token, State.ACTIVE, State.DETACHED) is not None:
            await self._detach(token, session)
        else:  # a re-attach, released meanwhile
            await self._end(token, session)

    @contextlib.asynccontextmanager
    async def activate(self, token: str, close: Callable[[str], None],
                       claimed: Reservation | None = None) -> AsyncIterator[Session]:
        """Start the service of ``token`` (or re-attach to its detached instance) and
        yield its :class:`~.session.Session`; on exit, stop it, or detach it if the owner
        set :attr:`~.session.Session.keep` and the service has a reconnect grace.

        ``claimed``: what the caller's won :meth:`claim` returned; else it is claimed here
        as by an anonymous caller. ``close(reason)`` is called if the reservation is released
        while in use. Raises :class:`~.errors.Refused` (404 unknown token, 409 already in
        use, 410 released once claimed, 502 the service failed to start) before yielding.
        """
        reservation: Reservation | Elsewhere | None
        if claimed is None:
            reservation = await self.claim(token, None)
            if isinstance(reservation, Elsewhere):
                raise Refused(409, "reservation moved to another instance")
        elif claimed.state is State.STARTING:  # not read again: a release since the claim
            reservation = claimed  # fails the transition to active below (410)
        else:  # a re-attach: only the store tells whether it was released since
            reservation = await self.store.get(token)
        if reservation is None:
            raise Refused(410, "reservation released")
        service = self.services[reservation.service]
        session = self._sessions.get(token)  # set: a re-attach, or a job's session
        if session is None:
            session = self._new_session(token, service, reservation.index)
        started = session.address is not None
        session.attach(close)
        yielded = False
        try:
            expected = ((State.ACTIVE,) if started else
                        (State.QUEUED, State.STARTING) if session.job is not None else
                        (State.STARTING,))
            if reservation.state not in expected:
                raise Refused(410, "reservation released")  # before the closer was set
            if session.job is not None and session.job.job_id is None:
                await self._submit(token, session, reservation)  # "start": "connect"
            if not started:
                session.address = await session.start(reservation)
                if await self.store.transition(token, State.STARTING, State.ACTIVE) is None:
                    raise Refused(410, "reservation released while starting")
            else:
                self.metrics.service_reattached(service.name)
                log.info("%s re-attached", session.id)
            yielded = True
            yield session
        finally:
            session.unattach()
            detached = False
            try:
                detached = (yielded and session.keep and session.grace > 0
                            and not self._closing
                            and await self.store.transition(token, State.ACTIVE,
                                                            State.DETACHED) is not None)
                if not detached:
                    await self.store.transition(
                        token, (State.QUEUED, State.STARTING, State.ACTIVE), State.STOPPING)
            except StoreUnavailable as exc:  # stopped all the same; freed once it answers
                log.debug("%s: not marked stopping: %s", session.id, exc.detail)
            finally:
                session.settle()
                session.claimed = False
            if detached:
                await self._detach(token, session)
            elif session.abandoned is None:  # else the abandoned start frees the slot
                if session.address is not None or session.job is not None:
                    await self._end(token, session)
                else:
                    await self._free(token, session)

    def _new_session(self, token: str, service: Service, index: int) -> Session:
        session = self._sessions[token] = Session(
            service, index, self.grace(service), self.settings, self.metrics,
            self._background, lambda: self._free(token, session))
        return session

    # -- Slurm jobs ------------------------------------------------------------------

    async def _submit(self, token: str, session: Session, reservation: Reservation) -> None:
        """Submit the session's job (its token is queued) and watch it. Raises
        :class:`~.errors.Refused` (502) if Slurm refuses it."""
        job, batch = session.job, session.service.batch
        assert job is not None and batch is not None
        options = dict(reservation.options)
        index = session.index
        directory = batch.working_directory()
        spec = JobSpec(command=batch.command(index, options),
                       sbatch=batch.sbatch(index, options),
                       environment=batch.environment(index, options),
                       directory=str(directory) if directory is not None else None)
        session.queue_timeout = batch.queue_timeout
        try:
            job_id = await job.submit(spec, self.job_name,
                                      f"websocketserver {session.service.name}[{index}]",
                                      self.settings.job_report_url,
                                      self.settings.start_timeout)
        except SchedulerError as exc:
            log.warning("%s: the job was not submitted: %s", session.id, exc)
            session.end_reason = "its job could not be submitted"
            raise Refused(502, f"{session.service.name}: the job was not submitted: "
                               f"{exc}") from None
        self._jobs[job_id] = (token, session)
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
                state = await job.poll()
                if state is not None and state.running and job.node is None:
                    node, address = await job.locate(state)
                    if await self.store.transition(token, State.QUEUED,
                                                   State.STARTING) is None:
                        return  # released meanwhile: its stopping cancels the job
                    job.runs(node, address)
                    log.info("%s: job %s runs on %s", session.id, job.job_id, job.node)
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
        session.end_reason = reason
        if not session.end(reason):  # no websocket attached
            await self._end_job(token, session, reason)

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

    async def _end_job(self, token: str, session: Session, reason: str) -> None:
        """End a job's session no websocket holds: cancel the job, free the slot."""
        session.end_reason = reason
        try:
            await self.store.transition(
                token, (State.QUEUED, State.STARTING, State.ACTIVE, State.DETACHED),
                State.STOPPING)
        except StoreUnavailable as exc:  # cancelled all the same; freed once it answers
            log.debug("%s: not marked stopping: %s", session.id, exc.detail)
        await self._end(token, session)

    async def job_report(self, body: bytes, signature: str) -> tuple[int, str]:
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
            return 410, "no session wants this job"
        _, session = found
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
        if known is None:
            log.info("%s: job %s reported port %s on %s", session.id, job_id, job.port,
                     job.node)
        return 200, "ok"

    @property
    def runs_jobs(self) -> bool:
        """Whether a service runs as Slurm jobs."""
        return any(service.batch is not None for service in self.services.values())

    def scancel_all(self) -> list[str]:
        """The command that cancels every job of this run (the supervisor's, should
        the server be killed)."""
        return [*self.scheduler.prefix, "scancel", f"--name={self.job_name}"]

    async def cancel_left_jobs(self) -> None:
        """Cancel the jobs a killed server of this instance left (named with
        :attr:`job_marker` and an older epoch): called at start, before any submit."""
        if not self.runs_jobs:
            return
        try:
            left = await self.scheduler.jobs_named(self.job_marker)
        except SchedulerError as exc:
            log.warning("cannot look for jobs a previous run left: %s", exc)
            return
        for job_id, owner in left:
            try:
                await self.scheduler.cancel(job_id)
                log.warning("cancelled job %s of %s, left by a previous run", job_id, owner)
            except SchedulerError as exc:
                log.error("cannot cancel job %s left by a previous run: %s", job_id, exc)

    async def _detach(self, token: str, session: Session) -> None:
        """Keep a detached session's instance for its grace, in a holder task."""
        wake = session.wake = asyncio.Event()
        holder = self._holders.spawn(self._hold(token, session, wake),
                                     f"{session.id} detached")
        log.info("%s detached: kept %g s for a reconnect", session.id, session.grace)
        if self._closing:  # shutdown began meanwhile, and awaits the caller: stop it now
            wake.set()
            await holder

    async def _hold(self, token: str, session: Session, wake: asyncio.Event) -> None:
        """Wait for a re-attach (which takes ``wake`` from the session) or for the grace
        to end, a release or shutdown (which leave it): then stop the instance."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), session.grace)
        if session.wake is not wake:
            return  # re-attached
        session.wake = None
        try:
            if await self.store.transition(token, State.DETACHED, State.STOPPING) is None:
                return  # a re-attach claimed it first, or it is gone: not this holder's
        except StoreUnavailable as exc:  # no re-attach can claim it either: stop it
            log.warning("%s: the store is unavailable (%s); stopping it", session.id,
                        exc.detail)
        await self._end(token, session)

    async def _end(self, token: str, session: Session) -> None:
        """Stop a session's started instance and free its slot (its token is stopping)."""
        await session.stop()
        session.address = None
        await self._free(token, session)

    async def _free(self, token: str, session: Session) -> None:
        """Drop the session, whose instance is stopped or never ran, and remove its
        token from the store."""
        self._sessions.pop(token, None)
        if session.job is not None and session.job.job_id is not None:
            self._jobs.pop(session.job.job_id, None)
        name, index = session.service.name, session.index

        async def remove() -> None:
            await self.store.remove(token, session.end_reason)
            log.info("%s index %d is free", name, index)
        await self._now_or_later(remove, f"freeing {name} index {index}")

    async def _now_or_later(self, change: Callable[[], Awaitable[None]], what: str) -> None:
        """Make ``change`` to the store now or, while the store (a cluster's Redis) does
        not answer, in a task that tries every STORE_RETRY seconds until it does: a slot
        is not held for ever. At shutdown the cluster clears this instance's slots
        instead."""
        try:
            await change()
        except StoreUnavailable as exc:
            if self._closing:
                return
            log.warning("%s: the store is unavailable (%s); trying again every %g s", what,
                        exc.detail, STORE_RETRY)
            self._background.spawn(self._retry(change), f"retry: {what}")

    @staticmethod
    async def _retry(change: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(STORE_RETRY)
            with contextlib.suppress(StoreUnavailable):
                await change()
                return

    async def _end_dead(self, token: str, session: Session) -> None:
        """End a detached session whose instance was found dead on a re-attach (the
        claim made it active): stop what is left of it and free its slot."""
        log.warning("%s ended while detached: its session is over", session.id)
        try:
            await self.store.transition(token, State.ACTIVE, State.STOPPING)
        except StoreUnavailable as exc:  # stopped all the same; freed once it answers
            log.debug("%s: not marked stopping: %s", session.id, exc.detail)
        await self._end(token, session)

    # -- housekeeping ----------------------------------------------------------------

    def start_reclaiming(self) -> None:
        """Begin reclaiming reservations unused for ``--timeout`` seconds."""
        self._reclaimer.spawn(self._reclaim_forever(), "reclaimer")

    async def _reclaim_forever(self) -> None:
        while True:
            await asyncio.sleep(min(RECLAIM_INTERVAL, self.settings.timeout / 2))
            try:
                await self._reclaim()
            except StoreUnavailable as exc:  # a cluster's Redis is down: next time
                log.debug("reclaiming skipped: %s", exc.detail)

    async def _reclaim(self) -> None:
        for reservation in await self.store.reclaim(self.settings.timeout):
            log.info("reclaimed unused reservation of %s index %d", reservation.service,
                     reservation.index)

    async def close(self) -> None:
        """Stop reclaiming; end every session (their tunnels stop their services) and
        stop the detached instances."""
        self._closing = True
        await self._reclaimer.cancel()
        self.end_all("server shutting down")
        await self._holders.wait()
        await self._background.cancel()

    async def end_all_and_wait(self, reason: str) -> None:
        """End every session of this instance, as :meth:`end_all`, and return once each
        one's service is stopped (or its abandoned start given up): only then may its
        slot be booked again."""
        self.end_all(reason)
        while self._sessions or self._holders:
            await asyncio.sleep(ENDED_POLL)
            self.end_all(reason)  # one activated meanwhile (claimed before the fencing)
