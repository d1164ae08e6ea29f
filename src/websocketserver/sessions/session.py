"""One token's session on this instance: everything that lives as long as it does.

A :class:`Session` is made when a claimed token's websocket activates it
(:meth:`~.services.ServiceManager.activate`) and dropped when its slot is freed. It owns
the service instance (starting it through the service's script, stopping it, asking
whether it is alive: every call bounded, whatever the script does), the websocket
attached to it (how to close it, what it carried, whether the browser left and whether
to keep the instance), the detached instance's grace timer, and an abandoned start. A
session of a Slurm service has a :class:`~.job.Job` instead of script calls: its start
waits for the job's report, its stop cancels the job. The session's *state* is the
store's (:mod:`.lifecycle`: one table, enforced by both stores); this object holds what
only this instance knows. Its :attr:`~Session.id` names it in the log, where tokens
never appear.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from ..core.errors import Refused, StoreUnavailable
from ..metrics import Metrics
from ..scripts import call
from ..settings import Settings
from ..tasks import Tasks
from .job import Job
from .reservations import Reservation, ReservationStore
from .slurm import SchedulerError
from .viewers import Viewers

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("websocketserver.services")

_numbers = itertools.count(1)

FIGURES_INTERVAL = 5.0
"""Seconds between writes of this instance's sessions' figures into the store: how old
the bytes of a tunnel on another instance of a cluster may be on this one's status."""


class Traffic(Protocol):
    """What a websocket carried so far (a tunnel's stats), and for whom (its client's
    address): shown in ``/v1/status``."""

    peer: str
    bytes_up: int
    bytes_down: int


class Session:
    """The session of one token on this instance (see the module)."""

    def __init__(self, service: Service, index: int, grace: float, settings: Settings,
                 metrics: Metrics, background: Tasks,
                 free: Callable[[], Awaitable[None]]) -> None:
        self.service = service
        self.index = index
        self.grace = grace
        self._settings = settings
        self._metrics = metrics
        self._background = background
        self._free = free  # frees the slot once an abandoned start has ended
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
        self.job: Job | None = None
        """A Slurm service's job (None: the service's script runs the instance)."""
        self.watcher: asyncio.Task[None] | None = None
        """The task watching :attr:`job` until it ends."""
        self.claimed = False
        """A job's session: a websocket has claimed it (a second one is refused)."""
        self.queue_timeout = 0.0
        self.end_reason: str | None = None
        """Why it ended (the first cause noted), kept with the ended reservation."""
        self.vnc_password: str | None = None
        """The VNC password its start returned: the proxy logs in with it."""
        self.rfb_offered: frozenset[int] | None = None
        """The security types its VNC server offered its owner's browser (RFB only)."""
        self.viewers = Viewers(service.config.max_viewers)
        """The viewers of its shares (``/v1/share/{token}``) here."""
        self.pid: int | None = None
        """The process listening where the instance does, once looked up (None: not
        on this host, another user's, or not yet known)."""

    def describe(self) -> dict[str, object]:
        """This session's fields of ``/v1/status``: the bytes its websocket carried and
        its viewers here; for the administrator, its client's address, the backend
        (``host:port``) and the process there."""
        traffic, address = self.traffic, self.address
        return {"bytes_up": traffic.bytes_up if traffic else 0,
                "bytes_down": traffic.bytes_down if traffic else 0,
                "viewers": self.viewers.describe(),
                "client": traffic.peer if traffic else None,
                "backend": f"{address[0]}:{address[1]}" if address else None,
                "pid": self.pid}

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

    def note_end(self, reason: str) -> None:
        """Why the session ends, unless an earlier cause was noted."""
        self.end_reason = self.end_reason or reason

    def end(self, reason: str) -> bool:
        """End the session as a release does: close its websocket (which stops the
        instance) or end its grace now. False if neither is there to end."""
        if self.close_websocket is not None or self.wake is not None:
            self.note_end(reason)
        if self.close_websocket is not None:
            self.close_websocket(reason)
            return True
        if self.wake is not None:
            self.wake.set()
            return True
        return False

    # -- the instance, through the service's script ---------------------------------

    async def start(self, reservation: Reservation) -> tuple[str, int]:
        """Start the instance; where it listens. Raises :class:`~.errors.Refused` (502
        it failed, 504 not within ``--start_timeout``: then it is abandoned)."""
        service, index, timeout = self.service, self.index, self._settings.start_timeout
        began = time.monotonic()
        if self.job is not None:
            try:
                host, port = await self.job.ready(self.queue_timeout, timeout)
            except Refused as exc:
                self.note_end(exc.reason)
                raise
            log.info("%s: job %s listens on %s:%d", self.id, self.job.job_id, host, port)
            self._find_process(host, port)
            return host, port
        start: asyncio.Future[tuple[Any, ...]] = asyncio.ensure_future(
            call(service.script.start, index, dict(reservation.options)))
        try:
            started = await asyncio.wait_for(asyncio.shield(start), timeout)
            host, port = started[0], started[1]
            self.vnc_password = started[2] if len(started) > 2 else None
        except TimeoutError:
            self._metrics.service_failed(service.name)
            self._abandon(start)
            self.note_end(f"{service.name} did not start within {timeout:g} s")
            raise Refused(504, f"{service.name} did not start within {timeout:g} s"
                          ) from None
        except asyncio.CancelledError:
            self._abandon(start)
            raise
        except Exception as exc:
            self._metrics.service_failed(service.name)
            log.warning("%s index %d failed to start: %s: %s", service.name, index,
                        type(exc).__name__, exc)
            await self.stop()
            self.note_end(f"{service.name} failed to start: {exc}")
            raise Refused(502, f"{service.name} failed to start: {exc}") from None
        seconds = time.monotonic() - began
        self._metrics.service_started(service.name, seconds)
        log.info("%s index %d started on %s:%s in %.2f s", service.name, index, host, port,
                 seconds)
        self._find_process(str(host), int(port))
        return str(host), int(port)

    def _find_process(self, host: str, port: int) -> None:
        """Learn :attr:`pid` in a thread (it reads every process's sockets), not
        delaying the session: only the administrator's view shows it."""
        async def find() -> None:
            self.pid = await asyncio.to_thread(listening_process, host, port)
        self._background.spawn(find(), f"{self.id} process")

    def _abandon(self, start: asyncio.Future[tuple[str, int]]) -> None:
        """Give up on a start() that is still running, without freeing its index yet.

        A plain start() runs in a thread that cannot be interrupted; were its index
        given to the next reservation at once, a late return would mix the two
        instances up. The slot is held until the start ends (and is then stopped) or
        for one more ``--start_timeout`` at most.
        """
        self.abandoned = self._background.spawn(self._finish_abandoned(start),
                                                f"{self.id} abandoned start")

    async def _finish_abandoned(self, start: asyncio.Future[tuple[str, int]]) -> None:
        name, index, timeout = self.service.name, self.index, self._settings.start_timeout
        try:
            await self.stop()  # whatever it launched so far
            try:
                await asyncio.wait_for(asyncio.shield(start), timeout)
            except TimeoutError:
                start.cancel()
                log.error("%s index %d: start() still running %g s after it was abandoned; "
                          "freeing the slot (anything it launches later ends when the "
                          "server exits)", name, index, timeout)
                return
            except Exception as exc:  # failed late: it may still have launched something
                log.debug("%s index %d: abandoned start() failed: %s", name, index, exc)
            await self.stop()  # the start finished late: stop what it made
        finally:
            self.abandoned = None
            await self._free()

    async def stop(self) -> None:
        """Stop the instance (its script's stop(), bounded by ``--stop_timeout``; a
        job's session cancels its job), its viewers first."""
        self.viewers.close(self.end_reason or "the shared session ended")
        if self.job is None:
            await self._ask("stop")
            return
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()
        try:
            await self.job.cancel()
        except SchedulerError as exc:
            log.error("%s: cannot cancel job %s: %s", self.id, self.job.job_id, exc)

    async def alive(self) -> bool:
        """Whether the detached instance still runs, as its script's ``alive()`` says:
        its port may have been taken by another process since it died. A script that
        raises or does not answer within ``--stop_timeout`` counts as dead, so that a
        user's keystrokes never go to a stranger. A job's session: the job has not
        ended."""
        if self.job is not None:
            return self.job.final is None
        return bool(await self._ask("alive"))

    async def _ask(self, method: str) -> object:
        """Call the script's ``method`` for this index, bounded by ``--stop_timeout``;
        a failure or time-out is logged and answers None."""
        name, index, timeout = self.service.name, self.index, self._settings.stop_timeout
        try:
            return await asyncio.wait_for(call(getattr(self.service.script, method), index),
                                          timeout)
        except TimeoutError:
            log.error("%s index %d: %s() did not return within %g s", name, index, method,
                      timeout)
        except Exception as exc:
            log.error("%s index %d: %s() failed: %s: %s", name, index, method,
                      type(exc).__name__, exc)
        return None


def listening_process(host: str, port: int) -> int | None:
    """The id of the process of this host listening on ``host:port``; None if ``host``
    is another host's, or no process this server may inspect listens there."""
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, port,
                                                            type=socket.SOCK_STREAM)}
        local = {a.address for nic in psutil.net_if_addrs().values() for a in nic}
        if not wanted & local:
            return None
        for found in psutil.net_connections("tcp"):
            if (found.status == psutil.CONN_LISTEN and found.pid and found.laddr
                    and found.laddr.port == port
                    and found.laddr.ip in wanted | {"0.0.0.0", "::"}):
                return found.pid
    except (OSError, psutil.Error) as exc:
        log.debug("the process on %s:%d is not known: %s", host, port, exc)
    return None


async def write_figures(store: ReservationStore, sessions: Mapping[str, Session]) -> None:
    """Every FIGURES_INTERVAL s, write what this instance's ``sessions`` (by token)
    carried into their reservations, those that changed: the other instances of a
    cluster show them from there."""
    written: dict[str, dict[str, object]] = {}
    while True:
        await asyncio.sleep(FIGURES_INTERVAL)
        now = {token: session.describe() for token, session in list(sessions.items())}
        changed = {token: figures for token, figures in now.items()
                   if written.get(token) != figures}
        try:
            if changed:
                await store.record_figures(changed)
        except StoreUnavailable as exc:  # written next time
            log.debug("sessions' figures not written: %s", exc.detail)
            continue
        written = now
