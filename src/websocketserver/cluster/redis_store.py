"""Reservations shared by a cluster of instances through Redis.

Every change is one Lua script run by Redis (atomic: Redis runs one script at a time)
and every time in it is Redis's ``TIME``, so no decision depends on an instance's
clock. The data and the scripts that keep it are :mod:`.redis_scripts`'s.

An instance registers (a new epoch), beats every ``min(ttl / 4, 0.5)`` s, and every
write carries its epoch: once its registration is cleared or replaced, all its writes
are refused (:class:`StaleNode`), so a stale instance never books a slot. An instance
silent for ``ttl`` is suspected (no new reservations go to it); after ``2 * ttl`` a
heartbeat of another instance clears it: its sessions are deleted (they died with it)
and its never-used reservations move to live instances with room. When no instance
reached Redis for more than ``ttl / 2`` (Redis was down or unreachable for all), that
time is not counted as anyone's silence: a Redis restart clears nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Collection, Mapping
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..core import lifecycle
from ..core.lifecycle import IllegalTransition, State
from ..sessions.reservations import (
    ChangeWaiters,
    Claim,
    ClaimOutcome,
    NoSlotFree,
    Reservation,
    ReservationStore,
    StoreUnavailable,
)
from ..tasks import Tasks
from .redis_link import RedisLink
from .redis_scripts import RUNNING, array, load_scripts, node_signature

log = logging.getLogger("websocketserver.cluster")

OPERATION_TIMEOUT = 1.25
"""Seconds one store operation may take before it fails with :class:`StoreUnavailable`."""
SOCKET_TIMEOUT = 1.0
"""Seconds to connect to Redis, or to wait for one answer."""
FORWARD_MAX_AGE = 60.0
"""Seconds a signed forward stays valid (its time is Redis's, read by the forwarding
instance); its nonce is remembered that long, so a replay is refused either way."""
FORWARD_MAX_AHEAD = 2.0
"""Seconds a forward's time may be ahead of Redis's now (two reads of one clock)."""

class DuplicateNode(Exception):
    """A live instance is registered under the same name."""


class WrongSecret(Exception):
    """A live instance of the cluster was registered with another cluster secret."""


class StaleNode(StoreUnavailable):
    """This instance's registration was cleared or replaced; it may book nothing more.

    Its sessions are no longer in the store (their slots may be booked again): it must
    end them before it registers afresh.
    """


class RedisStore(ReservationStore):
    """The reservations of every instance of a cluster, in Redis at ``url``.

    ``counts``: this instance's services and their ``count``; ``cluster_scope``: the
    services with ``count`` slots for the whole cluster instead of per instance.
    ``address`` is how other instances reach this one's websocket port. Call
    :meth:`start` (register, then beat) before use and :meth:`close` at the end.
    """

    def __init__(self, url: str, name: str, address: str, counts: Mapping[str, int],
                 cluster_scope: Collection[str] = (), heartbeat_ttl: float = 6.0,
                 prefix: str = "websocketserver:", secret: bytes = b"") -> None:
        self.name = name
        self.node_address = address
        self.counts = dict(counts)
        self.cluster_scope = frozenset(cluster_scope)
        self.heartbeat_ttl = heartbeat_ttl
        self.fenced = asyncio.Event()
        """Set once a heartbeat finds this instance's registration cleared or replaced,
        or Redis's data lost (then :attr:`lost` is true too)."""
        self.lost = False
        """Whether Redis lost its data (then this instance's sessions are registered
        again by ``register(restore=True)``, not ended)."""
        self._secret = secret
        self._check = hmac.new(secret, b"websocketserver cluster secret check",
                               hashlib.sha256).hexdigest()
        self._ttl_ms = str(round(heartbeat_ttl * 1000))
        self._keys = [prefix + "nodes", prefix + "res", prefix + "meta", prefix + "nonces",
                      prefix + "used", prefix + "idle"]
        self._generation = ""
        self._mine: dict[str, dict[str, Any]] = {}
        """The records of this instance's sessions as last seen (claimed here, not yet
        removed): what is registered again if Redis loses its data."""
        self._channel = prefix + "stop:"
        self._changes_channel = prefix + "changes"
        self._epoch = 0
        self._available = False
        self._beating = Tasks(log)
        self.changes = ChangeWaiters()
        self._subscribed = Tasks(log)  # the changes channel, once a page watches a token
        self._changes_heard = asyncio.Event()  # subscribed to it now
        # The script calls share one pipelined connection (redis_link.py); the
        # subscription to stop requests has a connection of its own, through redis-py.
        self._link = RedisLink(url, OPERATION_TIMEOUT, SOCKET_TIMEOUT)
        self._redis = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT, socket_keepalive=True)
        self._scripts = load_scripts()

    # -- membership --------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the last operation or heartbeat reached Redis (for ``/v1/health``)."""
        return self._available

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between beats: several per TTL, and at most 0.5 so that a dead
        instance is cleared within 2 x TTL + 0.5 s."""
        return min(self.heartbeat_ttl / 4, 0.5)

    async def start(self) -> None:
        """Register this instance (a new epoch) and begin beating; raises
        :class:`DuplicateNode` (a live instance has this name) or :class:`StoreUnavailable`."""
        await self.register()

    async def register(self, restore: bool = False) -> list[str]:
        """Register afresh under a new epoch and beat: at start-up, and after
        :attr:`fenced` once this instance's sessions are ended or, if :attr:`lost`, with
        ``restore``: its sessions are registered again. Returns the tokens of the
        sessions that could not be (their slot was taken meanwhile): end them.

        Raises :class:`DuplicateNode`, :class:`WrongSecret` (a live instance has this
        name, or another secret) or :class:`StoreUnavailable`.
        """
        sessions = list(self._mine.values()) if restore else []
        reply = await self._run(self._scripts.register, self.node_address,
                                json.dumps(self.counts), uuid.uuid4().hex, self._check,
                                node_signature(self._secret, self.name, self.node_address),
                                json.dumps(sessions), check_stale=False)
        if reply.get("error") == "duplicate":
            raise DuplicateNode(f"a live instance named {self.name} is already registered "
                                f"(at {reply.get('address')})")
        if reply.get("error") == "secret":
            raise WrongSecret(f"live instance {reply.get('node')} of this cluster has "
                              "another cluster secret")
        self._epoch = int(reply["epoch"])
        self._generation = str(reply["generation"])
        refused = [str(token) for token in array(reply.get("refused"))]
        if not restore:
            self._mine.clear()
        for token in refused:
            self._mine.pop(token, None)
        self.lost = False
        self.fenced.clear()
        if not self._beating:
            self._beating.spawn(self._beat_forever(), "heartbeat")
        log.info("registered in the cluster as %s (epoch %d%s)", self.name, self._epoch,
                 f", {len(sessions) - len(refused)} sessions registered again"
                 if restore else "")
        return refused

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            was_available = self._available
            try:
                reply = await self._run(self._scripts.heartbeat, self._generation,
                                        check_stale=False)
            except StoreUnavailable as exc:
                if was_available:
                    log.warning("Redis unavailable: %s", exc.detail)
                continue
            if not was_available:
                log.info("Redis available again")
            if reply.get("error") == "lost":
                log.error("Redis lost the cluster's data; this instance (%s) registers "
                          "again with its sessions", self.name)
                self.lost = True
                self.fenced.set()
                return
            if reply.get("error") == "stale":
                log.error("this instance (%s) was cleared from the cluster; it books "
                          "nothing until its sessions have ended and it registers again",
                          self.name)
                self.fenced.set()
                return

    async def close(self) -> None:
        """Stop beating, leave the cluster (never-used reservations move), disconnect."""
        await self._beating.cancel()
        await self._subscribed.cancel()
        if self._epoch and not self.fenced.is_set():
            with contextlib.suppress(StoreUnavailable):
                await self._run(self._scripts.deregister)
        await self._link.close()
        await self._redis.aclose()

    async def address(self, node: str) -> tuple[str, float] | None:
        """Where instance ``node`` accepts websockets and Redis's time now (ms); None if
        it is not registered, or its entry is not signed with this cluster's secret."""
        reply = await self._run(self._scripts.nodes, node, check_stale=False)
        entry = reply.get("n")
        if not entry:
            return None
        expected = node_signature(self._secret, node, str(entry.get("address")))
        if not hmac.compare_digest(str(entry.get("sig", "")).encode("ascii", "replace"),
                                   expected.encode("ascii")):
            log.warning("instance %s's entry in Redis is not signed with this cluster's "
                        "secret: not forwarding to it", node)
            return None
        return str(entry["address"]), float(reply["now"])

    async def _listening(self) -> None:
        if not self._subscribed:
            self._subscribed.spawn(self._changes(), "changes")
        with contextlib.suppress(TimeoutError):  # else the waiter's time-out covers it
            await asyncio.wait_for(self._changes_heard.wait(), SOCKET_TIMEOUT)

    async def _changes(self) -> None:
        """Wake the waiters of each token a script announces on the ``changes`` channel
        (any instance's change); re-subscribes after an outage, while the waiters'
        time-outs make them look again meanwhile."""
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._changes_channel)
                    self._changes_heard.set()
                    while True:
                        message = await pubsub.get_message(timeout=SOCKET_TIMEOUT)
                        if message is not None and message["type"] == "message":
                            self.changes.notify(str(message["data"]))
            except (RedisError, OSError) as exc:
                self._changes_heard.clear()
                log.debug("changes: %s; subscribing again", exc)
                await asyncio.sleep(self.heartbeat_interval)

    async def stop_requests(self) -> AsyncIterator[str]:
        """Tokens of this instance's sessions that another instance moved to stopping.

        Each is announced once, at once by a message, or within a second by a scan
        of this instance's stopped sessions (which also catches what was released while
        the subscription was down). Runs until closed, re-subscribing after Redis outages.
        """
        announced: set[str] = set()
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel + self.name)
                    scanned = -SOCKET_TIMEOUT
                    while True:
                        if time.monotonic() - scanned >= SOCKET_TIMEOUT:
                            scanned = time.monotonic()
                            await pubsub.ping()  # the subscription is still alive
                            for token in await self._stopping(announced):
                                yield token
                        message = await pubsub.get_message(timeout=SOCKET_TIMEOUT)
                        if message is not None and message["type"] == "message" \
                                and message["data"] not in announced:
                            announced.add(message["data"])
                            yield str(message["data"])
            except (RedisError, OSError, StoreUnavailable) as exc:
                log.debug("stop requests: %s; subscribing again", exc)
                await asyncio.sleep(self.heartbeat_interval)

    async def _stopping(self, announced: set[str]) -> list[str]:
        """Not yet ``announced`` tokens of this instance that another one is stopping;
        they are added to ``announced``, and gone ones leave it."""
        reply = await self._run(self._scripts.stops, check_stale=False)
        stopping = {str(token) for token in array(reply.get("tokens"))}
        new = stopping - announced
        announced.intersection_update(stopping)
        announced.update(new)
        return sorted(new)

    async def adopted(self) -> list[str]:
        """Tokens of a dead instance's sessions with a Slurm job that moved to this
        one, each returned once: this instance follows their jobs from now on."""
        reply = await self._run(self._scripts.adopted)
        return [str(token) for token in array(reply.get("tokens"))]

    async def remember_nonce(self, nonce: str, at: float,
                             seconds: float = FORWARD_MAX_AGE) -> bool:
        """Record the nonce of a forward signed at ``at`` (Redis ms); False if it was
        recorded already (a replay), or ``at`` is older than ``seconds`` or ahead."""
        reply = await self._run(self._scripts.nonce, nonce, round(at),
                                round(seconds * 1000), round(FORWARD_MAX_AHEAD * 1000),
                                check_stale=False)
        return bool(reply["fresh"])

    # -- the store interface -----------------------------------------------------------

    async def reserve(self, service: str, count: int, options: dict[str, Any],
                      owner: str | None = None) -> Reservation:
        """Take a slot on the least-loaded live instance (ties: this one).

        ``count`` is the cluster's total for a cluster-scoped service; otherwise each
        instance's registered count applies.
        """
        scope = "cluster" if service in self.cluster_scope else "node"
        reply = await self._run(self._scripts.reserve, str(uuid.uuid4()), service, count,
                                scope, json.dumps(options), json.dumps(owner))
        if reply.get("error") == "full":
            raise NoSlotFree(service)
        return self._reservation(reply["r"], reply["now"])

    async def get(self, token: str, ended: bool = False) -> Reservation | None:
        reply = await self._run(self._scripts.read, token, "", "1" if ended else "",
                                check_stale=False)
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def transition(self, token: str, expected: State | tuple[State, ...],
                         new: State) -> Reservation | None:
        states = expected if isinstance(expected, tuple) else (expected,)
        lifecycle.check_all(states, new)  # the scripts check it too
        reply = await self._run(self._scripts.transition, token, ",".join(states), new,
                                uuid.uuid4().hex)
        self._note(reply.get("r"))
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def claim(self, token: str, user: str | None) -> Claim:
        """Claim as the interface says; a token of another instance is taken over.

        It moves here (this instance's lowest free index; a cluster-scoped one keeps
        its index) if it may (reserved) and a local slot is free; otherwise the outcome
        is ``ELSEWHERE`` and ``reservation.node`` names the instance to forward to.
        """
        reply = await self._run(self._scripts.claim, token, json.dumps(user),
                                uuid.uuid4().hex)
        record = reply.get("r")
        if reply["outcome"] in (ClaimOutcome.CLAIMED, ClaimOutcome.REATTACHED):
            self._note(record)
        return Claim(ClaimOutcome(reply["outcome"]),
                     self._reservation(record, reply["now"]) if record else None)

    async def remove(self, token: str, reason: str = "ended") -> Reservation | None:
        self._mine.pop(token, None)
        reply = await self._run(self._scripts.remove, token, reason)
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def reclaim(self, unused_for: float, limit: int = 100) -> list[Reservation]:
        """Remove up to ``limit`` reservations never used for ``unused_for`` seconds
        (Redis's clock), any instance's, reading only those."""
        reply = await self._run(self._scripts.reclaim, round(unused_for * 1000), limit,
                                f"unused for {unused_for:g} s")
        return [self._reservation(r, reply["now"]) for r in array(reply.get("rs"))]

    async def list(self, service: str | None = None) -> list[Reservation]:
        """Every instance's reservations (of ``service``: read through its slots, not
        every reservation), by service, node and index."""
        reply = await self._run(self._scripts.read, "", service or "", "", check_stale=False)
        found = [self._reservation(r, reply["now"]) for r in array(reply.get("rs"))]
        return sorted(found, key=lambda r: (r.service, r.node or "", r.index))

    async def record_job(self, token: str, job: dict[str, Any]) -> Reservation | None:
        reply = await self._run(self._scripts.job, token, json.dumps(job))
        self._note(reply.get("r"))
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def find_job(self, job_id: str) -> Reservation | None:
        reply = await self._run(self._scripts.job, "", job_id, check_stale=False)
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def add_share(self, token: str, mode: str) -> str | None:
        share = str(uuid.uuid4())
        reply = await self._run(self._scripts.share, "add", token, mode, share)
        return share if reply.get("r") else None

    async def find_share(self, share: str) -> Reservation | None:
        reply = await self._run(self._scripts.share, "find", share, check_stale=False)
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def remove_share(self, share: str) -> Reservation | None:
        reply = await self._run(self._scripts.share, "remove", share)
        return self._reservation(reply["r"], reply["now"]) if reply.get("r") else None

    async def record_figures(self, figures: dict[str, dict[str, Any]]) -> None:
        await self._run(self._scripts.figures, json.dumps(
            {token: json.dumps(carried) for token, carried in figures.items()}))

    async def capacity(self, service: str, count: int) -> int:
        """``count`` for a cluster-scoped service, else the sum over live instances."""
        if service in self.cluster_scope:
            return count
        reply = await self._run(self._scripts.nodes, "", check_stale=False)
        return sum(int(n["counts"].get(service, 0)) for n in array(reply.get("nodes"))
                   if reply["now"] - n["seen"] < n["ttl"])

    # -- plumbing ----------------------------------------------------------------------

    async def _run(self, script: str, *args: str | int,
                   check_stale: bool = True) -> dict[str, Any]:
        """Run ``script`` as this instance; Redis failures become StoreUnavailable."""
        head: list[str | int] = [self.name, self._epoch, self._ttl_ms, self._channel]
        try:
            raw = await self._link.script(script, self._keys, [*head, *args])
        except TimeoutError:
            self._available = False
            raise StoreUnavailable(
                f"Redis did not answer within {OPERATION_TIMEOUT:g} s") from None
        except RedisError as exc:
            self._available = False
            raise StoreUnavailable(f"Redis: {type(exc).__name__}: {exc}") from None
        self._available = True
        reply: dict[str, Any] = json.loads(raw)
        if reply.get("error") == "illegal":
            raise IllegalTransition("the store's lifecycle table refused a transition")
        if check_stale and reply.get("error") == "stale":
            raise StaleNode(f"instance {self.name} (epoch {self._epoch}) was cleared from "
                            "the cluster")
        return reply

    def _note(self, record: dict[str, Any] | None) -> None:
        """Keep ``record`` among this instance's sessions while it is one."""
        if record is None:
            return
        if record["node"] == self.name and record["state"] in RUNNING:
            self._mine[record["token"]] = record
        else:
            self._mine.pop(record["token"], None)

    @staticmethod
    def _reservation(record: dict[str, Any], now_ms: float) -> Reservation:
        """A reservation from its record; ``changed`` moves to this process's monotonic
        clock by its age on Redis's clock (only Redis's clock measures time)."""
        return Reservation(
            token=record["token"], service=record["service"], index=int(record["index"]),
            options=json.loads(record["options"]), owner=record["owner"],
            state=State(record["state"]), timestamp=record["timestamp"] / 1000,
            changed=time.monotonic() - (now_ms - record["changed"]) / 1000,
            node=record["node"], end_reason=record.get("end_reason"), job=record.get("job"),
            shares=dict(record.get("shares") or {}), seq=int(record.get("seq", 0)),
            figures=json.loads(record["figures"]) if record.get("figures") else None)
