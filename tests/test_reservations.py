"""The in-memory reservation store: lowest free index, atomic transitions."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from websocketserver.reservations import MemoryStore, NoSlotFree, State


async def test_lowest_free_index_and_exhaustion() -> None:
    store = MemoryStore()
    first = await store.reserve("svc", 2, {"a": "1"}, owner="merlin")
    second = await store.reserve("svc", 2, {})
    assert (first.index, second.index) == (0, 1)
    assert uuid.UUID(first.token) and first.owner == "merlin" and first.options == {"a": "1"}
    with pytest.raises(NoSlotFree):
        await store.reserve("svc", 2, {})
    other = await store.reserve("other", 1, {})
    assert other.index == 0
    await store.remove(first.token)
    assert (await store.reserve("svc", 2, {})).index == 0


async def test_transitions_are_compare_and_set() -> None:
    store = MemoryStore()
    r = await store.reserve("svc", 1, {})
    assert (await store.transition(r.token, State.RESERVED, State.STARTING)).state == "starting"
    assert await store.transition(r.token, State.RESERVED, State.STARTING) is None
    active = await store.transition(r.token, (State.STARTING, State.ACTIVE), State.ACTIVE)
    assert active.state is State.ACTIVE and active.timestamp == r.timestamp
    assert await store.transition("nope", State.RESERVED, State.STARTING) is None


async def test_concurrent_reservations_never_share_an_index() -> None:
    store = MemoryStore()
    results = await asyncio.gather(*(store.reserve("svc", 5, {}) for _ in range(10)),
                                   return_exceptions=True)
    indexes = [r.index for r in results if not isinstance(r, Exception)]
    assert sorted(indexes) == [0, 1, 2, 3, 4]
    assert sum(isinstance(r, NoSlotFree) for r in results) == 5
    assert [r.index for r in await store.list("svc")] == [0, 1, 2, 3, 4]
