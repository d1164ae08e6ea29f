"""Tunnel limits and counts shared by the main process and its relay processes.

Every process that accepts websockets (the relays, and the main process for service
tunnels) counts its own tunnels in its own region of one shared mapping, made before
the relays are forked. A check of the limits sums the regions under one lock, a POSIX
record lock on the mapping's file, which the kernel releases if its holder dies: the
limits stay exact with any number of acceptors, and a tunnel costs no message between
processes. A relay also counts there what the main process's metrics show (upgrades,
tunnels opened, bytes of closed tunnels, refusals); the main process reads those
when ``/v1/metrics`` is scraped, and clears the region of a relay that died (its
tunnels died with it).

A region's per-client and per-user counts are open-addressing tables of (key, count)
pairs, the key a hash of the address or name (``hash`` is the same in forked
processes). A key whose count fell to 0 stays as a reusable slot; a table three
quarters full of keys is compacted by its owner.
"""

from __future__ import annotations

import fcntl
import mmap
import os

from ..core.errors import Refused

TOTAL, UPGRADES, OPENED, OPEN, BYTES_UP, BYTES_DOWN, CLIENT_KEYS, USER_KEYS = range(8)
"""Indexes of a region's counters: its live tunnels (the limits' count), then what
the metrics show, then how many slots of each table hold a key."""
REFUSALS = 8
"""Refusals by status: ``REFUSALS + status - 400`` for statuses 400-599."""
_HEAD = REFUSALS + 200
_PAGE = 512  # int64s zeroed at once when a region is cleared


def _capacity(max_total: int) -> int:
    """Slots of a table: at least twice the most tunnels (so it is never more than
    half full of live keys), a power of two. Pages never written take no memory."""
    capacity = 128  # 4 x 128 int64s: whole _PAGEs
    while capacity < 2 * max_total:
        capacity *= 2
    return capacity


def _key(text: str) -> int:
    return hash(text) & 0x7FFF_FFFF_FFFF_FFFF or 1  # 0 marks an empty slot


class SharedCounts:
    """The shared mapping: one region per process, ``processes`` of them."""

    def __init__(self, processes: int, max_total: int) -> None:
        self.processes = processes
        self.capacity = _capacity(max_total)
        self.region_size = _HEAD + 4 * self.capacity  # int64s: head, two tables
        self._fd = os.memfd_create("websocketserver-counts", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, processes * self.region_size * 8)
        self._map = mmap.mmap(self._fd, processes * self.region_size * 8)
        self.ints = memoryview(self._map).cast("q")

    def lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def counter(self, region: int, index: int) -> int:
        """One of a region's counters (``TOTAL`` .. ``REFUSALS + 199``)."""
        return self.ints[region * self.region_size + index]

    def clear(self, region: int) -> int:
        """Forget the live tunnels of a process that died; how many it had open."""
        base = region * self.region_size
        self.lock()
        try:
            lost = self.ints[base + OPEN]
            for index in (TOTAL, OPEN, CLIENT_KEYS, USER_KEYS):
                self.ints[base + index] = 0
            zeros = bytes(8 * _PAGE)
            for start in range(base + _HEAD, base + self.region_size, _PAGE):
                if self._map[8 * start:8 * start + len(zeros)] != zeros:  # written to
                    self._map[8 * start:8 * start + len(zeros)] = zeros
        finally:
            self.unlock()
        return lost


class SharedLimits:
    """One process's view: the tunnel limits over every region, its own counts.

    The same interface as :class:`~.tunnel_limits.TunnelLimits` (``acquire``/
    ``release``, one contract suite); ``opened``, ``closed`` and ``refused`` count
    what a relay's metrics show.
    """

    def __init__(self, shared: SharedCounts, region: int, total: int, per_client: int,
                 per_user: int) -> None:
        self.max_total, self.max_per_client, self.max_per_user = total, per_client, per_user
        self._shared = shared
        self._ints = shared.ints
        self._mask = shared.capacity - 1
        self._base = region * shared.region_size
        self._bases = [r * shared.region_size for r in range(shared.processes)]

    @property
    def total(self) -> int:
        """Tunnels counted in every process."""
        return sum(self._ints[base + TOTAL] for base in self._bases)

    def acquire(self, client: str, user: str | None) -> None:
        """Count a new tunnel, or raise :class:`~.errors.Refused` saying which limit."""
        clients, users = _HEAD, _HEAD + 2 * (self._mask + 1)
        client_key = _key(client)
        user_key = _key(user) if user is not None else 0
        self._shared.lock()
        try:
            if self.total >= self.max_total:
                raise Refused(503, f"server is at its limit of {self.max_total} tunnels")
            if self._count(clients, client_key) >= self.max_per_client:
                raise Refused(429, f"client {client} is at its limit of "
                                   f"{self.max_per_client} tunnels")
            if user_key and self._count(users, user_key) >= self.max_per_user:
                raise Refused(429, f"user {user} is at its limit of "
                                   f"{self.max_per_user} tunnels")
            self._ints[self._base + TOTAL] += 1
            self._add(clients, CLIENT_KEYS, client_key, 1)
            if user_key:
                self._add(users, USER_KEYS, user_key, 1)
        finally:
            self._shared.unlock()

    def release(self, client: str, user: str | None) -> None:
        self._shared.lock()
        try:
            self._ints[self._base + TOTAL] -= 1
            self._add(_HEAD, CLIENT_KEYS, _key(client), -1)
            if user is not None:
                self._add(_HEAD + 2 * (self._mask + 1), USER_KEYS, _key(user), -1)
        finally:
            self._shared.unlock()

    # -- what the metrics show (the owner writes, the main process reads) ----------

    def upgraded(self) -> None:
        self._ints[self._base + UPGRADES] += 1

    def opened(self) -> None:
        self._ints[self._base + OPENED] += 1
        self._ints[self._base + OPEN] += 1

    def closed(self, bytes_up: int, bytes_down: int) -> None:
        ints, base = self._ints, self._base
        ints[base + OPEN] -= 1
        ints[base + BYTES_UP] += bytes_up
        ints[base + BYTES_DOWN] += bytes_down

    def refused(self, status: int) -> None:
        if 400 <= status < 600:
            self._ints[self._base + REFUSALS + status - 400] += 1

    # -- the tables ---------------------------------------------------------------

    def _count(self, table: int, key: int) -> int:
        """The live tunnels of ``key`` in every region's ``table``."""
        ints, mask = self._ints, self._mask
        count = 0
        for region in self._bases:
            start = region + table
            slot = key & mask
            while True:
                found = ints[start + 2 * slot]
                if found == key:
                    count += ints[start + 2 * slot + 1]
                    break
                if found == 0:
                    break
                slot = (slot + 1) & mask
        return count

    def _add(self, table: int, used: int, key: int, delta: int) -> None:
        """Add ``delta`` to ``key``'s count in this process's ``table``; ``used``: the
        counter of its slots that hold a key."""
        ints, mask = self._ints, self._mask
        start = self._base + table
        slot, reuse = key & mask, -1
        while True:
            found = ints[start + 2 * slot]
            if found == key:
                ints[start + 2 * slot + 1] += delta
                return
            if found == 0:
                break
            if reuse < 0 and ints[start + 2 * slot + 1] == 0:
                reuse = slot
            slot = (slot + 1) & mask
        if reuse < 0:  # a new key in an empty slot
            if 4 * ints[self._base + used] >= 3 * (mask + 1):
                self._compact(start, used)
                self._add(table, used, key, delta)
                return
            ints[self._base + used] += 1
            reuse = slot
        ints[start + 2 * reuse] = key
        ints[start + 2 * reuse + 1] = delta

    def _compact(self, start: int, used: int) -> None:
        """Drop the keys whose count is 0 from a table (they pile up as clients come
        and go)."""
        ints, size = self._ints, 2 * (self._mask + 1)
        live = [(ints[start + i], ints[start + i + 1]) for i in range(0, size, 2)
                if ints[start + i] and ints[start + i + 1]]
        ints[start:start + size] = memoryview(bytes(8 * size)).cast("q")
        ints[self._base + used] = 0
        table = start - self._base
        for key, count in live:
            self._add(table, used, key, count)
