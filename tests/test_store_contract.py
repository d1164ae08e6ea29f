"""The reservation store's contract, run against every store: memory and Redis (a real
redis-server) pass the same tests, as trio's ``testing/_check_streams.py`` runs one
suite against every stream. What only a cluster has (take-over, fencing, eviction,
several instances) stays in ``test_redis_store.py``.

Each store registers the services of COUNTS; a test reserves them with those counts.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from websocketserver.cluster.redis_store import RedisStore
from websocketserver.core.lifecycle import TRANSITIONS, IllegalTransition, State
from websocketserver.sessions.reservations import (
    ClaimOutcome,
    MemoryStore,
    NoSlotFree,
    ReservationStore,
)

if TYPE_CHECKING:
    from cluster_support import RedisServer

pytest_plugins = ["cluster_support"]

COUNTS = {"one": 1, "two": 2, "five": 5}


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ReservationStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    shared = RedisStore(redis_server.url, "a", "a.test:8080", COUNTS, heartbeat_ttl=1.0,
                        secret=b"contract")
    await shared.start()
    try:
        yield shared
    finally:
        await shared.close()


async def test_lowest_free_index_exhaustion_and_freeing(store: ReservationStore) -> None:
    first = await store.reserve("two", 2, {"a": "1"}, owner="merlin")
    second = await store.reserve("two", 2, {})
    assert (first.index, second.index) == (0, 1)
    assert uuid.UUID(first.token) and first.owner == "merlin" and first.options == {"a": "1"}
    assert first.state is State.RESERVED
    with pytest.raises(NoSlotFree):
        await store.reserve("two", 2, {})
    assert (await store.reserve("one", 1, {})).index == 0  # counted per service
    assert await store.capacity("two", 2) == 2
    await store.remove(first.token)
    assert (await store.reserve("two", 2, {})).index == 0


async def test_concurrent_reservations_never_share_an_index(store: ReservationStore) -> None:
    results = await asyncio.gather(*(store.reserve("five", 5, {}) for _ in range(10)),
                                   return_exceptions=True)
    assert sorted(r.index for r in results if not isinstance(r, BaseException)) == \
           [0, 1, 2, 3, 4]
    assert sum(isinstance(r, NoSlotFree) for r in results) == 5
    assert [r.index for r in await store.list("five")] == [0, 1, 2, 3, 4]
    assert await store.list("one") == []


async def test_transitions_are_compare_and_set(store: ReservationStore) -> None:
    r = await store.reserve("one", 1, {})
    moved = await store.transition(r.token, State.RESERVED, State.STARTING)
    assert moved is not None and moved.state is State.STARTING
    assert await store.transition(r.token, State.RESERVED, State.STARTING) is None
    active = await store.transition(r.token, (State.STARTING, State.DETACHED), State.ACTIVE)
    assert active is not None and active.state is State.ACTIVE
    assert active.timestamp == r.timestamp
    assert await store.transition("nope", State.RESERVED, State.STARTING) is None
    stored = await store.get(r.token)
    assert stored is not None and stored.state is State.ACTIVE


async def test_an_illegal_transition_raises_and_changes_nothing(
        store: ReservationStore) -> None:
    """As h11's state machine: a move the lifecycle table does not list raises, whatever
    the token's state (it is the caller's bug), and the token stays as it was."""
    r = await store.reserve("one", 1, {})
    for old, new in ((State.RESERVED, State.ACTIVE), (State.STOPPING, State.ACTIVE),
                     (State.ACTIVE, State.ACTIVE), (State.RESERVED, State.DETACHED)):
        with pytest.raises(IllegalTransition):
            await store.transition(r.token, old, new)
    with pytest.raises(IllegalTransition):  # one illegal move among legal ones
        await store.transition(r.token, (State.STARTING, State.RESERVED), State.ACTIVE)
    stored = await store.get(r.token)
    assert stored is not None and stored.state is State.RESERVED


async def test_claim_moves_reserved_to_starting_once(store: ReservationStore) -> None:
    r = await store.reserve("one", 1, {})
    results = await asyncio.gather(*(store.claim(r.token, None) for _ in range(10)))
    outcomes = [c.outcome for c in results]
    assert outcomes.count(ClaimOutcome.CLAIMED) == 1
    assert outcomes.count(ClaimOutcome.IN_USE) == 9
    [won] = [c.reservation for c in results if c.outcome is ClaimOutcome.CLAIMED]
    assert won is not None and won.state is State.STARTING and won.token == r.token
    stored = await store.get(r.token)
    assert stored is not None and stored.state is State.STARTING
    assert all(c.reservation is not None and c.reservation.state is State.STARTING
               for c in results)
    unknown = await store.claim("nope", None)
    assert unknown.outcome is ClaimOutcome.UNKNOWN and unknown.reservation is None


async def test_a_claim_and_a_release_racing_one_wins(store: ReservationStore) -> None:
    for _ in range(20):
        r = await store.reserve("one", 1, {})
        claim, released = await asyncio.gather(
            store.claim(r.token, None),
            store.transition(r.token, State.RESERVED, State.STOPPING))
        assert (claim.outcome is ClaimOutcome.CLAIMED) != (released is not None)
        await store.remove(r.token)


async def test_a_users_token_is_refused_to_other_known_users(store: ReservationStore) -> None:
    r = await store.reserve("five", 5, {}, owner="alice")
    assert (await store.claim(r.token, "bob")).outcome is ClaimOutcome.NOT_OWNER
    stored = await store.get(r.token)
    assert stored is not None and stored.state is State.RESERVED  # nothing taken
    assert (await store.claim(r.token, "alice")).outcome is ClaimOutcome.CLAIMED
    assert (await store.claim(r.token, "bob")).outcome is ClaimOutcome.NOT_OWNER  # not 409
    held = await store.reserve("five", 5, {}, owner="alice")
    assert (await store.claim(held.token, None)).outcome is ClaimOutcome.CLAIMED
    anonymous = await store.reserve("five", 5, {})
    assert (await store.claim(anonymous.token, "bob")).outcome is ClaimOutcome.CLAIMED


async def test_a_detached_token_is_reattached_once(store: ReservationStore) -> None:
    r = await store.reserve("one", 1, {}, owner="alice")
    await store.claim(r.token, "alice")
    await store.transition(r.token, State.STARTING, State.ACTIVE)
    assert (await store.claim(r.token, "alice")).outcome is ClaimOutcome.IN_USE  # attached
    await store.transition(r.token, State.ACTIVE, State.DETACHED)
    assert (await store.claim(r.token, "bob")).outcome is ClaimOutcome.NOT_OWNER
    results = await asyncio.gather(*(store.claim(r.token, "alice") for _ in range(10)))
    assert sorted(c.outcome for c in results) == \
           [ClaimOutcome.IN_USE] * 9 + [ClaimOutcome.REATTACHED]
    stored = await store.get(r.token)
    assert stored is not None and stored.state is State.ACTIVE


async def test_an_ended_reservation_stays_readable_with_its_reason(
        store: ReservationStore) -> None:
    """Its slot is free at once; it is gone for everything but ``get(ended=True)``."""
    r = await store.reserve("one", 1, {"k": "v"})
    await store.claim(r.token, None)
    await store.transition(r.token, State.STARTING, State.STOPPING)
    removed = await store.remove(r.token, "service ended")
    assert removed is not None and removed.state is State.STOPPING
    assert await store.get(r.token) is None
    assert await store.list() == []
    assert (await store.claim(r.token, None)).outcome is ClaimOutcome.UNKNOWN
    assert await store.transition(r.token, State.STOPPING, State.ENDED) is None
    assert await store.remove(r.token) is None  # ended once
    ended = await store.get(r.token, ended=True)
    assert ended is not None and ended.state is State.ENDED
    assert (ended.end_reason, ended.options, ended.index) == ("service ended", {"k": "v"}, 0)
    assert (await store.reserve("one", 1, {})).index == 0


async def test_reclaim_ends_only_reservations_unused_for_long_enough(
        store: ReservationStore) -> None:
    old = await store.reserve("five", 5, {})
    used = await store.reserve("five", 5, {})
    await store.claim(used.token, None)
    await asyncio.sleep(0.6)
    new = await store.reserve("five", 5, {})
    assert [r.token for r in await store.reclaim(0.5)] == [old.token]
    assert {r.token for r in await store.list("five")} == {used.token, new.token}
    ended = await store.get(old.token, ended=True)
    assert ended is not None and ended.end_reason == "unused for 0.5 s"
    await asyncio.sleep(0.6)  # used was claimed over 0.5 s ago, but is not reserved
    assert await store.transition(used.token, State.STARTING, State.RESERVED) is not None
    reclaimed = [r.token for r in await store.reclaim(0.5)]  # reserved again just now:
    assert reclaimed == [new.token]                          # its time starts anew


def test_the_lifecycle_table_is_complete_and_ends_once() -> None:
    assert set(TRANSITIONS) == set(State)
    assert TRANSITIONS[State.ENDED] == {}
    assert all(State.ENDED in moves for state, moves in TRANSITIONS.items()
               if state is not State.ENDED)
    assert all(state not in moves for state, moves in TRANSITIONS.items())


async def test_the_redis_scripts_follow_the_table(redis_server: RedisServer) -> None:
    """The Lua refuses exactly what the table forbids, asked directly (without the
    Python check in front of it): the rules are written once, in lifecycle.py."""
    shared = RedisStore(redis_server.url, "a", "a.test:8080", COUNTS, heartbeat_ttl=1.0,
                        secret=b"contract")
    await shared.start()
    try:
        for old, new in itertools.product(State, State):
            if new is State.ENDED:
                continue  # ending is remove()'s
            try:
                await shared._run(shared._scripts.transition, "none", old, new,  # noqa: SLF001
                                  uuid.uuid4().hex)
                refused = False
            except IllegalTransition:
                refused = True
            assert refused == (new not in TRANSITIONS[old]), (old, new)
    finally:
        await shared.close()


async def test_a_job_recorded_in_a_reservation_is_found_by_its_id_while_it_lives(
        store: ReservationStore) -> None:
    """Any instance finds a Slurm job's reservation by the job's id (a report may reach
    any of them); the record follows the reservation through its states and ends with
    it."""
    reservation = await store.reserve("two", 2, {})
    token = reservation.token
    assert await store.find_job("41") is None
    job: dict[str, object] = {"job_id": "41", "secret": "s", "node": None, "port": None}
    recorded = await store.record_job(token, job)
    assert recorded is not None and recorded.job == job
    assert await store.transition(token, State.RESERVED, State.QUEUED) is not None
    found = await store.find_job("41")
    assert found is not None and (found.token, found.state, found.job) == (
        token, State.QUEUED, job)
    job = {**job, "node": "node1", "port": 5901}
    assert (await store.record_job(token, job)) is not None
    got = await store.get(token)
    assert got is not None and got.job == job
    await store.remove(token, "released")
    assert await store.find_job("41") is None
    assert await store.record_job(token, job) is None  # no longer live


async def test_a_page_sees_each_change_once_with_the_next_seq(store: ReservationStore) -> None:
    """Every change a page would see moves the token's seq by one (the events' ids,
    the same on every instance), and wakes who waits for it; a change it would not see
    (a job record's report time) moves nothing."""
    r = await store.reserve("two", 2, {})
    assert r.seq == 1
    waiting = asyncio.ensure_future(store.wait_change(r.token, 1, 10))
    await asyncio.sleep(0.2)  # waiting (the Redis store has subscribed)
    claimed = (await store.claim(r.token, None)).reservation
    assert claimed is not None and claimed.seq == 2
    woken = await asyncio.wait_for(waiting, 5)
    assert woken is not None and (woken.seq, woken.state) == (2, State.STARTING)
    job = {"job_id": "9", "queue_reason": None, "expected_start": None, "job_node": None,
           "last_report": 1.0}
    assert (await store.record_job(r.token, job)) is not None
    assert (await store.record_job(r.token, {**job, "last_report": 2.0})) is not None
    got = await store.get(r.token)
    assert got is not None and got.seq == 2  # nothing a page sees changed
    assert (await store.record_job(r.token, {**job, "job_node": "n1"})) is not None
    got = await store.get(r.token)
    assert got is not None and got.seq == 3
    unchanged = await store.wait_change(r.token, 3, 0.2)  # times out: as it is
    assert unchanged is not None and unchanged.seq == 3
    await store.transition(r.token, State.STARTING, State.STOPPING)
    await store.remove(r.token, "released")
    ended = await store.wait_change(r.token, 4, 5)
    assert ended is not None and (ended.state, ended.seq, ended.end_reason) == (
        State.ENDED, 5, "released")


async def test_share_tokens_find_their_reservation_until_revoked_or_ended(
        store: ReservationStore) -> None:
    """Any instance finds a share token's reservation (a viewer may reach any of them);
    a revoked share or an ended reservation's finds nothing."""
    r = await store.reserve("two", 2, {})
    view, control = await store.add_share(r.token, "view"), await store.add_share(r.token,
                                                                                   "control")
    assert view and control and len({view, control, r.token}) == 3
    assert await store.add_share("nope", "view") is None
    found = await store.find_share(view)
    assert found is not None and found.token == r.token
    assert found.shares == {view: "view", control: "control"}
    assert found.seq == r.seq  # nothing a page is shown
    revoked = await store.remove_share(view)
    assert revoked is not None and revoked.token == r.token
    assert await store.find_share(view) is None and await store.remove_share(view) is None
    got = await store.get(r.token)
    assert got is not None and got.shares == {control: "control"}
    await store.remove(r.token, "released")
    assert await store.find_share(control) is None


async def test_a_sessions_figures_are_kept_with_its_reservation_without_an_event(
        store: ReservationStore) -> None:
    """What a session carried, written by its instance, is read back by any instance
    as written (an empty list stays a list), follows the reservation through its states
    and is no change a page sees; a token not live is skipped."""
    r = await store.reserve("two", 2, {})
    assert r.figures is None
    figures = {"bytes_up": 5, "bytes_down": 7, "viewers": [], "client": "10.0.0.9",
               "backend": "127.0.0.1:5901", "pid": None}
    await store.record_figures({r.token: figures, "not-a-token": {"bytes_up": 1}})
    claimed = (await store.claim(r.token, None)).reservation
    assert claimed is not None and claimed.figures == figures and claimed.seq == 2
    await store.record_figures({r.token: {**figures, "bytes_up": 9}})
    [listed] = await store.list("two")
    assert listed.figures == {**figures, "bytes_up": 9} and listed.seq == 2
    assert await store.get("not-a-token") is None
