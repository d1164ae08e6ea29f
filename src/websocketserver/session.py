"""One token's session on this instance: everything that lives as long as it does.

A :class:`Session` is made when a claimed token's websocket activates it
(:meth:`~.services.ServiceManager.activate`) and dropped when its slot is freed. It
owns the started instance (its address), the websocket attached to it (how to close
it, what it carried, whether the browser left and whether to keep the instance), the
detached instance's grace timer, and an abandoned start. The session's *state* is the
store's (:mod:`.lifecycle`: one table, enforced by both stores); this object holds what
only this instance knows. Its :attr:`~Session.id` names it in the log, where tokens
never appear.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .services import Service

_numbers = itertools.count(1)


class Traffic(Protocol):
    """What a websocket carried so far (a tunnel's stats): shown in ``/v1/status``."""

    bytes_up: int
    bytes_down: int


class Session:
    """The session of one token on this instance (see the module)."""

    def __init__(self, service: Service, index: int, grace: float) -> None:
        self.service = service
        self.index = index
        self.grace = grace
        """Seconds the instance is kept detached when its browser leaves."""
        self.id = f"{service.name}[{index}]#{next(_numbers)}"
        """A name for the log (tokens are secrets)."""
        self.address: tuple[str, int] | None = None
        """Where the started instance listens; None until it started, and once stopped."""
        self.close_websocket: Callable[[str], None] | None = None
        """Closes the attached websocket with a reason (None: none attached)."""
        self.traffic: Traffic | None = None
        self.keep = False
        """Set by the websocket's owner: the browser left (not a release, shutdown or
        service end), so the instance is kept for a reconnect."""
        self.left = False
        self.settled: asyncio.Future[None] | None = None
        """While a websocket is attached: resolved once the token's next state
        (detached, stopping) is in the store."""
        self.wake: asyncio.Event | None = None
        """While detached: set to end the grace now (a re-attach takes it away first)."""
        self.abandoned: asyncio.Task[None] | None = None
        """A start given up on but still running: it frees the slot when it ends."""

    def attach(self, close: Callable[[str], None]) -> None:
        """A websocket uses the session now; ``close(reason)`` ends it."""
        self.close_websocket = close
        self.keep = self.left = False
        self.settled = asyncio.get_running_loop().create_future()

    def leave(self) -> None:
        """The websocket relays nothing more: a reconnect now waits for :attr:`settled`
        instead of being refused (a reload reconnects at once)."""
        self.left = True

    def unattach(self) -> None:
        """The websocket is gone: a release no longer finds it to close."""
        self.close_websocket = None
        self.traffic = None

    def settle(self) -> None:
        """The store knows the token's next state (detached, stopping): a reconnect that
        waited for it claims again."""
        if self.settled is not None and not self.settled.done():
            self.settled.set_result(None)

    def settling(self) -> bool:
        """Whether a reconnect should wait for :meth:`settle` rather than be refused: the
        browser left and the instance may be kept."""
        return (self.left and self.grace > 0 and self.settled is not None
                and not self.settled.done())

    def end(self, reason: str) -> bool:
        """End the session as a release does: close its websocket (which stops the
        instance) or end its grace now. False if neither is there to end."""
        if self.close_websocket is not None:
            self.close_websocket(reason)
            return True
        if self.wake is not None:
            self.wake.set()
            return True
        return False
