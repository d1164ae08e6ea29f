"""The tunnel limits' one contract, held by both implementations (in one process, and
shared by the relay processes), and the shared counts across real forked processes."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from websocketserver.core.errors import Refused
from websocketserver.websocket_port.shared_counts import (
    OPEN,
    OPENED,
    REFUSALS,
    TOTAL,
    UPGRADES,
    SharedCounts,
    SharedLimits,
)
from websocketserver.websocket_port.tunnel_limits import Limits, TunnelLimits

MakeLimits = Callable[[int, int, int], Limits]


def in_process(total: int, per_client: int, per_user: int) -> Limits:
    return TunnelLimits(total, per_client, per_user)


def shared(total: int, per_client: int, per_user: int) -> Limits:
    """Region 1 of three: the others (empty) are summed too."""
    return SharedLimits(SharedCounts(3, total), 1, total, per_client, per_user)


@pytest.fixture(params=[in_process, shared], ids=["in_process", "shared"])
def make(request: pytest.FixtureRequest) -> MakeLimits:
    maker: MakeLimits = request.param
    return maker


def test_the_total_limit_refuses_with_503(make: MakeLimits) -> None:
    limits = make(2, 10, 10)
    limits.acquire("a", None)
    limits.acquire("b", None)
    with pytest.raises(Refused) as refused:
        limits.acquire("c", None)
    assert (refused.value.status, refused.value.reason) == (
        503, "server is at its limit of 2 tunnels")
    limits.release("a", None)
    limits.acquire("c", None)
    assert limits.total == 2


def test_per_client_and_per_user_limits_refuse_with_429(make: MakeLimits) -> None:
    limits = make(100, 2, 3)
    limits.acquire("10.0.0.1", "ann")
    limits.acquire("10.0.0.1", "ann")
    with pytest.raises(Refused) as refused:
        limits.acquire("10.0.0.1", None)
    assert (refused.value.status, refused.value.reason) == (
        429, "client 10.0.0.1 is at its limit of 2 tunnels")
    limits.acquire("10.0.0.2", "ann")
    with pytest.raises(Refused) as refused:
        limits.acquire("10.0.0.3", "ann")
    assert refused.value.reason == "user ann is at its limit of 3 tunnels"
    limits.acquire("10.0.0.3", "bob")  # another user, another client
    limits.acquire("10.0.0.3", None)  # anonymous: no per-user count
    assert limits.total == 5


def test_a_refusal_counts_nothing_and_a_release_gives_the_slot_back(make: MakeLimits) -> None:
    limits = make(100, 1, 1)
    limits.acquire("a", "ann")
    for client, user in (("a", None), ("b", "ann")):
        with pytest.raises(Refused):
            limits.acquire(client, user)
    assert limits.total == 1
    limits.release("a", "ann")
    assert limits.total == 0
    limits.acquire("b", "ann")
    limits.acquire("a", None)


def test_many_clients_coming_and_going(make: MakeLimits) -> None:
    """Far more distinct clients over time than the shared tables have slots: the keys
    of clients that left are reused or compacted away, and the counts stay right."""
    limits = make(64, 2, 2)
    for n in range(3000):
        client = f"10.1.{n // 250}.{n % 250}"
        limits.acquire(client, f"user{n}")
        limits.acquire(client, None)
        if n >= 20:  # 20 clients stay at their limit throughout
            limits.release(client, f"user{n}")
            limits.release(client, None)
    assert limits.total == 40
    with pytest.raises(Refused):
        limits.acquire("10.1.0.5", None)
    limits.acquire("10.1.0.25", None)


def test_the_limits_hold_across_forked_processes() -> None:
    """Four processes race for 50 slots of one client, each taking what it can: exactly
    50 are granted; then each gives back half, and the regions add up."""
    counts = SharedCounts(5, 1000)
    go_read, go_write = os.pipe()
    children: list[tuple[int, int]] = []
    for region in range(1, 5):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a relay, as it were
            limits = SharedLimits(counts, region, 1000, 50, 1000)
            taken = 0
            for _ in range(200):
                try:
                    limits.acquire("127.0.0.1", None)
                except Refused:
                    continue
                limits.upgraded()
                limits.opened()
                taken += 1
            os.write(write_end, b"%d" % taken)
            os.read(go_read, 1)  # every process has tried
            for _ in range(taken // 2):
                limits.release("127.0.0.1", None)
                limits.closed(10, 20)
            os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    got = [int(os.read(read_end, 100)) for _, read_end in children]
    assert sum(got) == 50
    os.write(go_write, b"gggg")
    for pid, read_end in children:
        assert os.waitpid(pid, 0)[1] == 0
        os.close(read_end)
    os.close(go_read)
    os.close(go_write)
    main = SharedLimits(counts, 0, 1000, 50, 1000)
    assert main.total == sum(n - n // 2 for n in got)
    assert sum(counts.counter(r, UPGRADES) for r in range(5)) == 50
    assert sum(counts.counter(r, OPENED) for r in range(5)) == 50
    assert sum(counts.counter(r, OPEN) for r in range(5)) == main.total


def test_a_dead_process_region_is_cleared_and_its_slots_are_free() -> None:
    counts = SharedCounts(2, 10)
    relay = SharedLimits(counts, 1, 10, 2, 10)
    main = SharedLimits(counts, 0, 10, 2, 10)
    relay.acquire("a", None)
    relay.opened()
    relay.acquire("a", None)
    relay.opened()
    relay.refused(429)
    with pytest.raises(Refused):
        main.acquire("a", None)
    assert counts.clear(1) == 2  # the relay died with two tunnels open
    assert counts.counter(1, TOTAL) == 0 and counts.counter(1, OPEN) == 0
    assert counts.counter(1, OPENED) == 2 and counts.counter(1, REFUSALS + 29) == 1
    main.acquire("a", None)
    main.acquire("a", None)
    assert main.total == 2
