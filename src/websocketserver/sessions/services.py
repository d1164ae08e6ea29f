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

A Slurm service's session runs a batch job: see :mod:`.jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..core.errors import Refused
from ..identity import Identity
from ..metrics import Metrics
from ..settings import Settings
from ..tasks import Tasks
from .jobs import Jobs
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
from .service import Elsewhere, Service
from .session import Session, write_figures
from .shares import Shares, Viewing
from .slurm import Slurm
from .token_status import instance

log = logging.getLogger("websocketserver.services")

RECLAIM_INTERVAL = 1.0
"""How often never-activated reservations are checked against ``--timeout``."""
ENDED_POLL = 0.05
"""Seconds between looks at whether every session has ended (end_all_and_wait)."""
STORE_RETRY = 1.0
"""Seconds between tries to free a slot (or give back a claimed one) while the store (a
cluster's Redis) does not answer."""


class ServiceManager:
    """Reservations, launches and stops for every configured service; ``scheduler``:
    where Slurm services' jobs run (default: Slurm's commands on PATH)."""

    def __init__(self, settings: Settings, store: ReservationStore, identity: Identity,
                 metrics: Metrics | None = None, scheduler: Slurm | None = None) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self.metrics = metrics or Metrics()
        self.services = {config.name: Service.configured(config, settings)
                         for config in settings.services}
        self._sessions: dict[str, Session] = {}  # by token: activated, slot not yet freed
        self._reclaimer = Tasks(log)
        self._holders = Tasks(log)  # one per detached instance
        self._background = Tasks(log)  # abandoned starts, store retries, job watchers
        self._closing = False
        self.jobs = Jobs(settings, store, scheduler or Slurm(), self.services, self._sessions,
                         self._new_session, self._end, self._background)
        self.shares = Shares(settings, store, self.services, self._sessions)

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
            instances = [self._instance(r, admin or may_see(r, user), admin)
                         for r in await self.store.list(service.name)]
            result.append({
                "name": service.name,
                "count": await self.store.capacity(service.name, service.config.count),
                "instances": instances,
                "common_options": service.config.options,
                "file_ext": service.config.options.get("file_ext", []),
            })
        return result

    def _instance(self, reservation: Reservation, show_token: bool, admin: bool
                  ) -> dict[str, Any]:
        session = self._sessions.get(reservation.token)
        return instance(reservation, show_token, admin, self.grace(self.services[
            reservation.service]), session.describe() if session else None)

    # -- lifecycle -------------------------------------------------------------------

    async def reserve(self, name: str, options: dict[str, Any], user: str | None) -> Reservation:
        service = self._service_for(name, user)
        try:
            reservation = await self.store.reserve(name, service.config.count, options, user)
        except NoSlotFree:
            raise Refused(503, f"all {service.config.count} instances of {name} "
                                    "are in use") from None
        log.info("reserved %s index %d for %s", name, reservation.index, user or "anonymous")
        if service.batch is not None and service.batch.start_mode == "reserve":
            return await self.jobs.submit_at_reserve(reservation, service, user)
        return reservation

    async def release(self, token: str, user: str | None = None, admin: bool = False
                      ) -> Reservation:
        """End a reservation: forget it if unused, else close its tunnel (which stops it).

        Refused (403) to a known ``user`` other than its owner, unless ``admin``.
        """
        known = await self.store.get(token)
        if known is None and (revoked := await self.shares.revoke(token, user, admin)):
            return revoked  # a share token: revoked, its viewers closed
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
        if not self.end_here(token):
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
            if not session.end(reason):
                self._end_job(token, session, reason)

    def _end_job(self, token: str, session: Session, reason: str) -> bool:
        """End a session's job that no websocket holds; False if it has none such."""
        if not self.jobs.unclaimed(session):
            return False
        self._holders.spawn(self.jobs.end_job(token, session, reason), f"{session.id} ending")
        return True

    def end_here(self, token: str) -> bool:
        """End ``token``'s session here as a release does (here, or on another instance
        of the cluster); False if none runs here."""
        session = self._sessions.get(token)
        reason = "reservation released"
        if session is None:  # or a share token that another instance revoked
            return self.shares.close(token)
        return session.end(reason) or self._end_job(token, session, reason)

    async def claim(self, token: str, user: str | None
                    ) -> Reservation | Elsewhere | Viewing:
        """Take ``token`` for a websocket of ``user`` (reserved -> starting, or detached
        -> active: a re-attach; atomically).

        Raises :class:`~.errors.Refused`: 404 unknown token, 403 another known user's, 409
        already in use, 410 a detached instance that died (its session is ended). The
        winner must then :meth:`activate` it or :meth:`unclaim` it. In a cluster, a
        reservation of another instance that cannot move here is :class:`Elsewhere`.
        """
        session = self._sessions.get(token)
        if session is not None and session.job is not None and session.address is None:
            return await self.jobs.claim(token, session, user)
        if session is None and self.jobs.any and (known := await self.store.get(token)):
            if self.jobs.elsewhere(known, user):
                return Elsewhere(known.node or "?")
            if submitted := await self.jobs.claim_to_submit(known, user):
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
        if claim.outcome is ClaimOutcome.UNKNOWN and (
                viewing := await self.shares.claim(token, user)) is not None:
            return viewing  # a share token: a viewer joins
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
        reservation: Reservation | Elsewhere | Viewing | None
        if claimed is None:
            reservation = await self.claim(token, None)
            if not isinstance(reservation, Reservation):
                raise Refused(409, "not a reservation of this instance")
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
                await self.jobs.submit(token, session, reservation)  # "start": "connect"
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
                if not detached:
                    session.note_end("its websocket closed")
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

    async def adopt(self, token: str) -> None:
        """Follow the job of a dead instance's session that the cluster moved here; a
        session that had started waits detached for its page to reconnect."""
        session = await self.jobs.adopt(token)
        if session is not None and session.address is not None:
            await self._detach(token, session)

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
        session.note_end("reconnect grace over")  # unless a release said otherwise
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
        self.jobs.forget(session)
        name, index = session.service.name, session.index

        async def remove() -> None:
            await self.store.remove(token, session.end_reason or "ended")
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
            self._background.retry(change, f"retry: {what}", STORE_RETRY, StoreUnavailable)

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
        """Begin reclaiming reservations unused for ``--timeout`` seconds, and writing
        what the sessions carried into the store (for a cluster's other instances)."""
        self._reclaimer.spawn(self._reclaim_forever(), "reclaimer")
        self._reclaimer.spawn(write_figures(self.store, self._sessions), "figures")

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
