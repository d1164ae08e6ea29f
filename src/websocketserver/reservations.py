"""Reservations: who holds which instance slot of which service, and in what state.

The store is an interface (:class:`ReservationStore`) so that several server
instances can later share one (a database, Redis); :class:`MemoryStore` is the
implementation for a single server. Everything outside this module goes through
the interface's methods, all ``async`` and each atomic, never through a store's
internals.

Lifecycle of a token::

    reserved --first websocket--> starting --port accepts--> active
        \\                              \\                       |
         `--timeout / release------------`--failure / release---`--> stopping --> gone
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any


class State(enum.StrEnum):
    RESERVED = "reserved"
    STARTING = "starting"
    ACTIVE = "active"
    STOPPING = "stopping"


class NoSlotFree(Exception):
    """Every one of the service's ``count`` instances is taken."""


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


class ReservationStore(ABC):
    """The atomic operations the server needs; a shared store implements the same."""

    @abstractmethod
    async def reserve(self, service: str, count: int, options: dict[str, Any],
                      owner: str | None = None) -> Reservation:
        """Take the lowest free index of ``service``, or raise :class:`NoSlotFree`."""

    @abstractmethod
    async def get(self, token: str) -> Reservation | None:
        """The reservation of ``token``, if it exists."""

    @abstractmethod
    async def transition(self, token: str, expected: State | tuple[State, ...],
                         new: State) -> Reservation | None:
        """Move ``token`` to ``new`` if it is in an ``expected`` state; None otherwise."""

    @abstractmethod
    async def remove(self, token: str) -> Reservation | None:
        """Forget ``token`` (its index becomes free); return what it was."""

    @abstractmethod
    async def list(self, service: str | None = None) -> list[Reservation]:
        """All reservations (of one service), by service and index."""


class MemoryStore(ReservationStore):
    """Reservations of this process only, in a dict guarded by one lock."""

    def __init__(self) -> None:
        self._by_token: dict[str, Reservation] = {}
        self._lock = asyncio.Lock()

    async def reserve(self, service: str, count: int, options: dict[str, Any],
                      owner: str | None = None) -> Reservation:
        async with self._lock:
            taken = {r.index for r in self._by_token.values() if r.service == service}
            index = next((i for i in range(count) if i not in taken), None)
            if index is None:
                raise NoSlotFree(service)
            reservation = Reservation(token=str(uuid.uuid4()), service=service, index=index,
                                      options=dict(options), owner=owner)
            self._by_token[reservation.token] = reservation
            return reservation

    async def get(self, token: str) -> Reservation | None:
        return self._by_token.get(token)

    async def transition(self, token: str, expected: State | tuple[State, ...],
                         new: State) -> Reservation | None:
        async with self._lock:
            current = self._by_token.get(token)
            allowed = expected if isinstance(expected, tuple) else (expected,)
            if current is None or current.state not in allowed:
                return None
            updated = replace(current, state=new, changed=time.monotonic())
            self._by_token[token] = updated
            return updated

    async def remove(self, token: str) -> Reservation | None:
        async with self._lock:
            return self._by_token.pop(token, None)

    async def list(self, service: str | None = None) -> list[Reservation]:
        found = [r for r in self._by_token.values() if service is None or r.service == service]
        return sorted(found, key=lambda r: (r.service, r.index))
