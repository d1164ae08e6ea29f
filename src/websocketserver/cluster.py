"""This instance's place in a cluster (``--redis``): what the other parts ask of it.

The shared reservations themselves are :class:`~.redis_store.RedisStore`; this is the
rest of membership: registering at start-up (one line and exit 1 for a duplicate
``--node_name`` or an unreachable Redis), ending here the sessions that another
instance released, and what forwarding a websocket needs (the owner's address, the
secret, a once-only nonce).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .redis_store import DuplicateNode, RedisStore
from .reservations import StoreUnavailable
from .settings import Settings, SettingsError

log = logging.getLogger("websocketserver.cluster")


class Cluster:
    """Membership of this instance; ``start``, then ``close``."""

    def __init__(self, settings: Settings, store: RedisStore) -> None:
        assert settings.cluster_secret is not None
        self.name = settings.node_name
        self.secret = settings.cluster_secret.encode()
        self.store = store
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self, released: Callable[[str], object],
                    fenced: Callable[[], None]) -> None:
        """Register, and call ``released(token)`` for each session of this instance
        that another instance released, ``fenced()`` if this instance is cleared from
        the cluster (its sessions' records are gone: they must end)."""
        try:
            await self.store.start()
        except DuplicateNode as exc:
            raise SettingsError(f"--node_name: {exc}") from None
        except StoreUnavailable as exc:
            raise SettingsError(f"--redis: cannot register this instance: {exc}") from None
        self._watchers = [asyncio.create_task(self._releases(released)),
                          asyncio.create_task(self._rejoin(fenced))]

    async def _releases(self, released: Callable[[str], object]) -> None:
        async for token in self.store.stop_requests():
            released(token)

    async def _rejoin(self, fenced: Callable[[], None]) -> None:
        """A cleared instance (silent too long: a pause, a partition) ends its sessions,
        whose slots the cluster may have booked again, and registers afresh."""
        while True:
            await self.store.fenced.wait()
            fenced()
            while self.store.fenced.is_set():
                try:
                    await self.store.register()
                except StoreUnavailable:
                    await asyncio.sleep(self.store.heartbeat_interval)

    async def owner(self, node: str) -> tuple[str, int] | None:
        """Where instance ``node`` accepts websockets, or None if it is not live."""
        address = await self.store.address(node)
        if address is None:
            return None
        host, _, port = address.rpartition(":")
        return host.strip("[]"), int(port)

    async def fresh(self, nonce: str) -> bool:
        """Whether a forward's nonce was never seen before (then it is recorded)."""
        return await self.store.remember_nonce(nonce)

    async def close(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await self.store.close()
