"""Tunnel limits: how many tunnels the whole server, one client address and one known
user may hold at once (``--max_tunnels``, ``--max_tunnels_per_client``,
``--max_tunnels_per_user``). Pure counting: the main process keeps the only counts,
relay processes report their tunnels' ends to it, so the limits stay exact.
"""

from __future__ import annotations

from collections import Counter

from ..core.errors import Refused


class TunnelLimits:
    """Counts of live tunnels (including ones still starting their service)."""

    def __init__(self, total: int, per_client: int, per_user: int) -> None:
        self.max_total, self.max_per_client, self.max_per_user = total, per_client, per_user
        self.total = 0
        self._clients: Counter[str] = Counter()
        self._users: Counter[str] = Counter()

    def acquire(self, client: str, user: str | None) -> None:
        """Count a new tunnel, or raise :class:`~.errors.Refused` saying which limit."""
        if self.total >= self.max_total:
            raise Refused(503, f"server is at its limit of {self.max_total} tunnels")
        if self._clients[client] >= self.max_per_client:
            raise Refused(429, f"client {client} is at its limit of "
                                     f"{self.max_per_client} tunnels")
        if user is not None and self._users[user] >= self.max_per_user:
            raise Refused(429, f"user {user} is at its limit of "
                                     f"{self.max_per_user} tunnels")
        self.total += 1
        self._clients[client] += 1
        if user is not None:
            self._users[user] += 1

    def release(self, client: str, user: str | None) -> None:
        self.total -= 1
        _decrement(self._clients, client)
        if user is not None:
            _decrement(self._users, user)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]
