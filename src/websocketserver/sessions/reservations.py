"""Reservations: who holds which instance slot of which service, and in what state.

The store is an interface (:class:`ReservationStore`) so that several server
instances can later share one (a database, Redis); :class:`MemoryStore` is the
implementation for a single server. Everything outside this module goes through
the interface's methods, all ``async`` and each atomic, never through a store's
internals.

A token reserved by a known user is bound to that user (:func:`may_use`): other
known users may not use it. Its first websocket takes it with :meth:`~ReservationStore.claim`,
one atomic step from reserved to starting, so of simultaneous upgrades one wins.

A token's life is the one table of :mod:`.lifecycle`, which every store enforces::

    reserved --first websocket (claim)--> starting --start() returned--> active
    active   --browser left, grace > 0--> detached --websocket again (claim)--> active
    reserved --timeout / release--------> ended (index free)
    starting, active --failure / release / service ended / shutdown--> stopping
    detached --grace over / release / shutdown--> stopping --stopped--> ended

With ``--reconnect_grace`` (0 by default: no ``detached`` state), a started instance
whose websocket went away is kept ``detached`` for that long; the next websocket with
its token re-attaches it, by the same :meth:`~ReservationStore.claim`. An ended
reservation is readable for five minutes (``get(token, ended=True)``) with its
``end_reason``; everything else treats it as gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from ..core.errors import StoreUnavailable
from ..core.lifecycle import ENDED_KEPT, IllegalTransition, State, check, check_all

__all__ = ["IllegalTransition", "State", "StoreUnavailable"]  # imported from here before

CLAIMS: dict[State, State] = {State.RESERVED: State.STARTING, State.DETACHED: State.ACTIVE}
"""What a claim does per state (claimed, re-attached); in any other state the token is
in use. Both moves are in the lifecycle table."""


class NoSlotFree(Exception):
    """Every one of the service's ``count`` instances is taken."""


class ClaimOutcome(enum.StrEnum):
    """Why :meth:`ReservationStore.claim` did or did not hand a token to its caller."""

    CLAIMED = "claimed"
    REATTACHED = "reattached"
    UNKNOWN = "unknown"
    NOT_OWNER = "not owner"
    IN_USE = "in use"
    ELSEWHERE = "elsewhere"
    """Reserved on another instance (``reservation.node``) and no local slot is free to
    take it over: forward the websocket there. Only a shared store answers this."""


@dataclass(frozen=True)
class Reservation:
    """One token's claim on instance ``index`` of ``service``."""

    token: str
    service: str
    index: int
    options: dict[str, Any]
    owner: str | None = None
    state: State = State.RESERVED
    timestamp: float = field(default_factory=time.time)
    """When the reservation was made (seconds since the epoch)."""
    changed: float = field(default_factory=time.monotonic)
    """When the state last changed (monotonic clock)."""
    node: str | None = None
    """The cluster instance whose slot it holds (None: the single server's own)."""
    end_reason: str | None = None
    """Why it ended (state ``ended`` only)."""
    job: dict[str, Any] | None = None
    """A Slurm service's job, as :meth:`ReservationStore.record_job` last wrote it (its
    id, report secret, node, port, queue reason...): shared, so that any instance of a
    cluster can show it, check its report or cancel it."""
    shares: dict[str, str] = field(default_factory=dict)
    """Its share tokens (:meth:`ReservationStore.add_share`) and their modes (``view``,
    ``control``): secrets like the token, never shown; they end with it."""
    figures: dict[str, Any] | None = None
    """What its session carried, as the instance running it last wrote it
    (:meth:`ReservationStore.record_figures`: bytes each way, client, backend, process):
    how another instance of a cluster shows it. Not a change a page sees."""
    seq: int = 0
    """Counts the changes a page sees (state, instance, the job's queue reason, expected
    start and node): the id of its events (``/v1/events/{token}``), the same on every
    instance of a cluster."""


SEEN_JOB_FIELDS = ("queue_reason", "expected_start", "job_node")
"""The fields of a job's record whose change is an event (:attr:`Reservation.seq`)."""


def seen(reservation: Reservation) -> tuple[object, ...]:
    """What a page is shown of ``reservation``: its seq moves when this does."""
    job = reservation.job or {}
    return (reservation.state, reservation.node,
            *(job.get(key) for key in SEEN_JOB_FIELDS))


class ChangeWaiters:
    """Tasks waiting for a token's next change (:meth:`ReservationStore.wait_change`),
    woken by :meth:`notify` (memory: at once; Redis: its ``changes`` channel)."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    def add(self, token: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiting.setdefault(token, set()).add(event)
        return event

    def discard(self, token: str, event: asyncio.Event) -> None:
        waiting = self._waiting.get(token)
        if waiting is not None:
            waiting.discard(event)
            if not waiting:
                del self._waiting[token]

    def notify(self, token: str) -> None:
        for event in self._waiting.get(token, ()):
            event.set()


def may_use(reservation: Reservation, user: str | None) -> bool:
    """Whether a caller known as ``user`` (None: anonymous) may use or release the token.

    An anonymous reservation is anyone's who holds its token. A known user's one is
    refused to other known users; an anonymous caller holding it may use it, since the
    token is the capability (a launcher hands it to a page that carries no identity).
    """
    return reservation.owner is None or user is None or user == reservation.owner


def may_see(reservation: Reservation, user: str | None) -> bool:
    """Whether ``user`` may be shown the token: an anonymous one's, or their own."""
    return reservation.owner is None or user == reservation.owner


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`ReservationStore.claim`."""

    outcome: ClaimOutcome
    reservation: Reservation | None
    """The token's reservation after the claim (starting when claimed, active when
    re-attached); None if unknown."""


class ReservationStore(ABC):
    """The atomic operations the server needs; a shared store implements the same."""

    @abstractmethod
    async def reserve(self, service: str, count: int, options: dict[str, Any],
                      owner: str | None = None) -> Reservation:
        """Take the lowest free index of ``service``, or raise :class:`NoSlotFree`."""

    @abstractmethod
    async def get(self, token: str, ended: bool = False) -> Reservation | None:
        """The reservation of ``token``, if it exists (and, with ``ended``, if it ended
        less than :data:`~.lifecycle.ENDED_KEPT` seconds ago)."""

    @abstractmethod
    async def transition(self, token: str, expected: State | tuple[State, ...],
                         new: State) -> Reservation | None:
        """Move ``token`` to ``new`` if it is in an ``expected`` state; None otherwise.

        Raises :class:`IllegalTransition` if the table forbids a move from an
        ``expected`` state to ``new`` (ending is :meth:`remove`'s).
        """

    @abstractmethod
    async def claim(self, token: str, user: str | None) -> Claim:
        """Take ``token`` for a websocket of ``user``, in one atomic step.

        It moves from reserved to starting (claimed), or from detached to active
        (re-attached), if it exists, :func:`may_use` allows ``user`` and it is in one
        of those states; checked in that order, and whichever fails first is the
        outcome. Of any number of simultaneous claims at most one succeeds.
        """

    @abstractmethod
    async def remove(self, token: str, reason: str = "ended") -> Reservation | None:
        """End ``token``: its index becomes free, it stays readable as ended with
        ``reason`` for a while; return what it was (None: not live)."""

    @abstractmethod
    async def reclaim(self, unused_for: float, limit: int = 100) -> list[Reservation]:
        """End up to ``limit`` reservations still reserved ``unused_for`` seconds after
        their last change; return them. Reads only those (a cluster's store must not
        read every reservation each second); also forgets ended ones kept long enough."""

    @abstractmethod
    async def list(self, service: str | None = None) -> list[Reservation]:
        """All live reservations (of one service), by service and index."""

    @abstractmethod
    async def record_job(self, token: str, job: dict[str, Any]) -> Reservation | None:
        """Write ``job`` (JSON-able, with its ``"job_id"``) into the live reservation of
        ``token``, which :meth:`find_job` then finds by that id; None if not live."""

    @abstractmethod
    async def find_job(self, job_id: str) -> Reservation | None:
        """The live reservation whose job is ``job_id``, if any."""

    @abstractmethod
    async def add_share(self, token: str, mode: str) -> str | None:
        """A new share token of ``token``'s live reservation for viewers in ``mode``
        (None: not live)."""

    @abstractmethod
    async def find_share(self, share: str) -> Reservation | None:
        """The live reservation that share token ``share`` belongs to, if any (its mode:
        ``reservation.shares[share]``)."""

    @abstractmethod
    async def remove_share(self, share: str) -> Reservation | None:
        """Revoke share token ``share``; the reservation it belonged to (None: none)."""

    @abstractmethod
    async def record_figures(self, figures: dict[str, dict[str, Any]]) -> None:
        """Write each token's figures (JSON-able) into its live reservation, if that is
        this instance's (a cluster's other instances show them from there); other
        tokens are skipped. Changes no :attr:`~Reservation.seq`."""

    @property
    def available(self) -> bool:
        """Whether the store answered its last request (``/v1/health``); memory always."""
        return True

    changes: ChangeWaiters

    async def wait_change(self, token: str, seq: int, timeout: float) -> Reservation | None:
        """``token``'s reservation (ended ones too) once its :attr:`~Reservation.seq`
        differs from ``seq``, or as it is after ``timeout`` seconds (None: gone)."""
        event = self.changes.add(token)
        try:
            await self._listening()
            current = await self.get(token, ended=True)
            if current is None or current.seq != seq:
                return current
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            return await self.get(token, ended=True)
        finally:
            self.changes.discard(token, event)

    async def _listening(self) -> None:
        """Make sure changes reach :attr:`changes` (a shared store subscribes)."""
        return None  # the memory store notes them as it makes them

    async def capacity(self, service: str, count: int) -> int:
        """How many slots of ``service`` (configured ``count`` here) exist in all.

        One server has ``count``; a cluster store sums its live instances' counts.
        """
        return count


class MemoryStore(ReservationStore):
    """Reservations of this process only, in a dict guarded by one lock."""

    def __init__(self) -> None:
        self._by_token: dict[str, Reservation] = {}
        self._ended: dict[str, Reservation] = {}  # in the order they ended
        self._jobs: dict[str, str] = {}  # job id -> token
        self._shares: dict[str, str] = {}  # share token -> token
        self.changes = ChangeWaiters()
        self._lock = asyncio.Lock()

    async def reserve(self, service: str, count: int, options: dict[str, Any],
                      owner: str | None = None) -> Reservation:
        async with self._lock:
            taken = {r.index for r in self._by_token.values() if r.service == service}
            index = next((i for i in range(count) if i not in taken), None)
            if index is None:
                raise NoSlotFree(service)
            reservation = Reservation(token=str(uuid.uuid4()), service=service, index=index,
                                      options=dict(options), owner=owner, seq=1)
            self._by_token[reservation.token] = reservation
            return reservation

    async def get(self, token: str, ended: bool = False) -> Reservation | None:
        found = self._by_token.get(token)
        if found is None and ended:
            self._forget_ended()
            found = self._ended.get(token)
        return found

    async def transition(self, token: str, expected: State | tuple[State, ...],
                         new: State) -> Reservation | None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        check_all(allowed, new)
        async with self._lock:
            current = self._by_token.get(token)
            if current is None or current.state not in allowed:
                return None
            return self._put(current, replace(current, state=new, changed=time.monotonic()))

    async def claim(self, token: str, user: str | None) -> Claim:
        async with self._lock:
            current = self._by_token.get(token)
            if current is None:
                return Claim(ClaimOutcome.UNKNOWN, None)
            if not may_use(current, user):
                return Claim(ClaimOutcome.NOT_OWNER, current)
            state = CLAIMS.get(current.state)
            if state is None:
                return Claim(ClaimOutcome.IN_USE, current)
            outcome = (ClaimOutcome.CLAIMED if state is State.STARTING
                       else ClaimOutcome.REATTACHED)
            claimed = self._put(current, replace(current, state=state,
                                                 changed=time.monotonic()))
            return Claim(outcome, claimed)

    async def remove(self, token: str, reason: str = "ended") -> Reservation | None:
        async with self._lock:
            return self._end(token, reason)

    async def reclaim(self, unused_for: float, limit: int = 100) -> list[Reservation]:
        limit_time = time.monotonic() - unused_for
        async with self._lock:
            expired = [r for r in self._by_token.values()
                       if r.state is State.RESERVED and r.changed < limit_time][:limit]
            for reservation in expired:
                self._end(reservation.token, f"unused for {unused_for:g} s")
            return expired

    async def record_job(self, token: str, job: dict[str, Any]) -> Reservation | None:
        async with self._lock:
            current = self._by_token.get(token)
            if current is None:
                return None
            self._jobs[str(job["job_id"])] = token
            return self._put(current, replace(current, job=dict(job)))

    async def find_job(self, job_id: str) -> Reservation | None:
        token = self._jobs.get(job_id)
        return self._by_token.get(token) if token is not None else None

    async def add_share(self, token: str, mode: str) -> str | None:
        async with self._lock:
            current = self._by_token.get(token)
            if current is None:
                return None
            share = str(uuid.uuid4())
            self._shares[share] = token
            self._by_token[token] = replace(current, shares={**current.shares, share: mode})
            return share

    async def find_share(self, share: str) -> Reservation | None:
        token = self._shares.get(share)
        return self._by_token.get(token) if token is not None else None

    async def remove_share(self, share: str) -> Reservation | None:
        async with self._lock:
            current = self._by_token.get(self._shares.pop(share, ""))
            if current is None:
                return None
            shares = {key: mode for key, mode in current.shares.items() if key != share}
            self._by_token[current.token] = replace(current, shares=shares)
            return current

    async def record_figures(self, figures: dict[str, dict[str, Any]]) -> None:
        async with self._lock:
            for token, carried in figures.items():
                current = self._by_token.get(token)
                if current is not None:
                    self._by_token[token] = replace(current, figures=dict(carried))

    def _put(self, old: Reservation, new: Reservation) -> Reservation:
        """Store ``new`` in place of ``old``: one more seq, and its waiters woken, if a
        page would see the change."""
        if seen(new) != seen(old):
            new = replace(new, seq=old.seq + 1)
            self.changes.notify(new.token)
        self._by_token[new.token] = new
        return new

    def _end(self, token: str, reason: str) -> Reservation | None:
        current = self._by_token.pop(token, None)
        if current is not None and current.job is not None:
            self._jobs.pop(str(current.job["job_id"]), None)
        for share in current.shares if current is not None else ():
            self._shares.pop(share, None)
        if current is not None:
            check(current.state, State.ENDED)
            self._ended[token] = replace(current, state=State.ENDED, seq=current.seq + 1,
                                         changed=time.monotonic(), end_reason=reason)
            self.changes.notify(token)
        self._forget_ended()
        return current

    def _forget_ended(self) -> None:
        limit = time.monotonic() - ENDED_KEPT
        while self._ended:
            oldest = next(iter(self._ended.values()))
            if oldest.changed >= limit:
                return
            del self._ended[oldest.token]

    async def list(self, service: str | None = None) -> list[Reservation]:
        found = [r for r in self._by_token.values() if service is None or r.service == service]
        return sorted(found, key=lambda r: (r.service, r.index))
