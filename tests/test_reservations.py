"""The in-memory reservation store: lowest free index, atomic transitions and claims."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from websocketserver.reservations import (
    ClaimOutcome,
    MemoryStore,
    NoSlotFree,
    Reservation,
    State,
    may_see,
    may_use,
)


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


async def test_claim_moves_reserved_to_starting_once() -> None:
    store = MemoryStore()
    r = await store.reserve("svc", 1, {})
    results = await asyncio.gather(*(store.claim(r.token, None) for _ in range(10)))
    outcomes = [c.outcome for c in results]
    assert outcomes.count(ClaimOutcome.CLAIMED) == 1
    assert outcomes.count(ClaimOutcome.IN_USE) == 9
    [won] = [c.reservation for c in results if c.outcome is ClaimOutcome.CLAIMED]
    assert won is not None and won.state is State.STARTING and won.token == r.token
    assert (await store.get(r.token)).state is State.STARTING
    assert all(c.reservation.state is State.STARTING for c in results)
    unknown = await store.claim("nope", None)
    assert unknown.outcome is ClaimOutcome.UNKNOWN and unknown.reservation is None


async def test_claim_yields_to_concurrent_transitions() -> None:
    """A claim and a release racing for a reserved token: exactly one of them wins."""
    store = MemoryStore()
    for _ in range(20):
        r = await store.reserve("svc", 1, {})
        claim, released = await asyncio.gather(
            store.claim(r.token, None), store.transition(r.token, State.RESERVED,
                                                         State.STOPPING))
        assert (claim.outcome is ClaimOutcome.CLAIMED) != (released is not None)
        await store.remove(r.token)


async def test_claim_of_a_users_token_is_refused_to_other_known_users() -> None:
    store = MemoryStore()
    r = await store.reserve("svc", 3, {}, owner="alice")
    bob = await store.claim(r.token, "bob")
    assert bob.outcome is ClaimOutcome.NOT_OWNER
    assert (await store.get(r.token)).state is State.RESERVED  # nothing taken
    assert (await store.claim(r.token, "alice")).outcome is ClaimOutcome.CLAIMED
    assert (await store.claim(r.token, "bob")).outcome is ClaimOutcome.NOT_OWNER  # not 409
    held = await store.reserve("svc", 3, {}, owner="alice")
    assert (await store.claim(held.token, None)).outcome is ClaimOutcome.CLAIMED
    anonymous = await store.reserve("svc", 3, {})
    assert (await store.claim(anonymous.token, "bob")).outcome is ClaimOutcome.CLAIMED


def test_who_may_use_and_see_a_token() -> None:
    alices = Reservation("t", "svc", 0, {}, owner="alice")
    anonymous = Reservation("u", "svc", 1, {})
    assert may_use(alices, "alice") and may_use(alices, None) and not may_use(alices, "bob")
    assert may_see(alices, "alice") and not may_see(alices, None)
    assert not may_see(alices, "bob")
    assert all(may_use(anonymous, u) and may_see(anonymous, u) for u in (None, "bob"))


async def test_claim_reattaches_a_detached_token_once() -> None:
    """Detached -> active by the same atomic claim: of simultaneous reconnects one wins."""
    store = MemoryStore()
    r = await store.reserve("svc", 1, {}, owner="alice")
    await store.claim(r.token, "alice")
    await store.transition(r.token, State.STARTING, State.ACTIVE)
    assert (await store.claim(r.token, "alice")).outcome is ClaimOutcome.IN_USE  # attached
    await store.transition(r.token, State.ACTIVE, State.DETACHED)
    assert (await store.claim(r.token, "bob")).outcome is ClaimOutcome.NOT_OWNER
    results = await asyncio.gather(*(store.claim(r.token, "alice") for _ in range(10)))
    outcomes = sorted(c.outcome for c in results)
    assert outcomes == [ClaimOutcome.IN_USE] * 9 + [ClaimOutcome.REATTACHED]
    assert (await store.get(r.token)).state is State.ACTIVE
