"""This instance's place in a cluster (``--redis``): what the other parts ask of it.

The shared reservations themselves are :class:`~.redis_store.RedisStore`; this is the
rest of membership: registering at start-up (one line and exit 1 for a duplicate
``--node_name`` or an unreachable Redis), ending here the sessions that another
instance released, and what forwarding a websocket needs (the owner's address, the
secret, a recent once-only nonce).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .. import processes
from ..sessions.reservations import StoreUnavailable
from ..settings import Settings, SettingsError
from ..tasks import Tasks
from .redis_store import DuplicateNode, RedisStore, WrongSecret

log = logging.getLogger("websocketserver.cluster")

LEASE_TTLS = 1.5
"""A stalled instance's sessions are ended by its supervisor after this many TTLs
without a sign of life: before the cluster may clear it, at 2 x TTL."""


class Cluster:
    """Membership of this instance; ``start``, then ``close``."""

    def __init__(self, settings: Settings, store: RedisStore) -> None:
        assert settings.cluster_secret is not None
        self.name = settings.node_name
        self.secret = settings.cluster_secret.encode()
        self.store = store
        self._watchers = Tasks(log)

    async def start(self, released: Callable[[str], object],
                    fenced: Callable[[str], Awaitable[None]],
                    adopt: Callable[[str], Awaitable[None]]) -> None:
        """Register, and call ``released(token)`` for each session of this instance
        that another instance released, ``await fenced(reason)`` to end every session
        of this instance (it was cleared from the cluster: their records are gone and
        their slots may be booked again), or ``released(token)`` for each session that
        could not be registered again after Redis lost its data; ``await adopt(token)``
        for each session with a Slurm job that a dead instance left to this one."""
        try:
            await self.store.start()
        except DuplicateNode as exc:
            raise SettingsError(f"--node_name: {exc}") from None
        except WrongSecret as exc:
            raise SettingsError(f"--cluster_secret: {exc}") from None
        except StoreUnavailable as exc:
            raise SettingsError(f"--redis: cannot register this instance: {exc.detail}"
                                ) from None
        self._watchers.spawn(self._releases(released), "stop requests")
        self._watchers.spawn(self._rejoin(released, fenced), "rejoin")
        self._watchers.spawn(self._renew_lease(), "lease")
        self._watchers.spawn(self._adoptions(adopt), "adoptions")

    async def _adoptions(self, adopt: Callable[[str], Awaitable[None]]) -> None:
        """Every heartbeat interval, take the sessions a dead instance left here."""
        while True:
            await asyncio.sleep(self.store.heartbeat_interval)
            try:
                for token in await self.store.adopted():
                    await adopt(token)
            except StoreUnavailable as exc:
                log.debug("adoptions: %s", exc.detail)

    async def _renew_lease(self) -> None:
        """Tell the supervisor this instance's event loop runs; if it stalls for
        LEASE_TTLS x TTL, the supervisor ends its sessions' processes, before the
        cluster may clear it (2 x TTL) and book their slots again."""
        seconds = LEASE_TTLS * self.store.heartbeat_ttl
        while True:
            processes.renew_lease(seconds)
            await asyncio.sleep(self.store.heartbeat_interval)

    async def _releases(self, released: Callable[[str], object]) -> None:
        async for token in self.store.stop_requests():
            released(token)

    async def _rejoin(self, released: Callable[[str], object],
                      fenced: Callable[[str], Awaitable[None]]) -> None:
        """A cleared instance (silent too long: a pause, a partition) ends its sessions,
        whose slots the cluster may have booked again, and registers afresh once they
        have ended, never before: an index is never held by two live sessions. After
        Redis lost its data, it registers again with its sessions instead."""
        while True:
            await self.store.fenced.wait()
            restore = self.store.lost
            if not restore:
                await fenced("this instance was cleared from the cluster")
            while self.store.fenced.is_set():
                try:
                    refused = await self.store.register(restore=restore)
                except (StoreUnavailable, DuplicateNode, WrongSecret) as exc:
                    log.warning("registering again: %s", exc)
                    await asyncio.sleep(self.store.heartbeat_interval)
                    continue
                for token in refused:
                    log.warning("a session of this instance could not be registered "
                                "again (its slot was taken meanwhile): ending it")
                    released(token)

    async def owner(self, node: str) -> tuple[str, int, float] | None:
        """Where instance ``node`` accepts websockets, and Redis's time (ms) to sign the
        forward with; None if it is not live (or its entry is not signed)."""
        found = await self.store.address(node)
        if found is None:
            return None
        address, now = found
        host, _, port = address.rpartition(":")
        return host.strip("[]"), int(port), now

    async def fresh(self, nonce: str, at: float) -> bool:
        """Whether a forward signed at ``at`` (Redis ms) is recent and its nonce was
        never seen before (then it is recorded)."""
        return await self.store.remember_nonce(nonce, at)

    async def close(self) -> None:
        await self._watchers.cancel()
        await self.store.close()
